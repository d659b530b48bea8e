"""Shared fixtures.

- ``tiny_llama``: a tiny random ``LlamaForCausalLM`` (hidden 24, 3 layers, FFN 37, 4 heads /
  2 kv heads, vocab 101, seed 0, float32, eval mode); built fresh for each test (~10 ms).
- ``tiny_tokenizer``: a character-level fast tokenizer whose 100 ids fit ``tiny_llama``'s
  vocabulary (``<unk>`` 0, ``<eos>`` 1, ``<pad>`` 2, then printable ASCII).
- ``smollm2``: the real SmolLM2-135M (a :class:`sparsing_utils.models.LoadedModel`), loaded
  once per session; tests using it are marked ``real_model`` automatically (mark them
  explicitly as well, for readers).
- ``smollm2_tokenizer``: only SmolLM2's tokenizer, loaded once per session (fast once the
  conversion cache exists); also marked ``real_model``.
- :func:`build_tiny_family`: a tiny random model of one architecture family (Llama, Mistral,
  Qwen2, Gemma, Phi-3, GPT-2, OPT, GPT-NeoX), hidden 24, 2 layers, ``d_ff`` 37, built from
  that family's transformers config class; ``tiny_family`` is the parametrized fixture.
- ``trained_llama``: a tiny Llama *trained* (Adam, a few seconds) on a character-level
  second-order Markov chain over ``tiny_tokenizer``'s letters, so that its FFN matters and
  PPL-p% is meaningful; session-scoped (treat as read-only: deep-copy before editing). Holds
  the final model, an earlier checkpoint (Algorithm 1), evaluation/calibration token blocks
  and :func:`markov_text` to write text files for the CLI.
- :class:`Blocks`: a minimal TokenBlocks-like object (``input_ids``, ``attention_mask``).

The hub is never contacted: ``HF_HUB_OFFLINE=1`` is set before anything imports transformers.
"""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import string

import pytest
import torch

_REAL_MODEL_FIXTURES = {"smollm2", "smollm2_tokenizer"}


_DEFAULT_THREADS = torch.get_num_threads()


def pytest_runtest_setup(item):
    """Tiny-model tests run on one intra-op thread (before any of their fixtures are set up):
    their matrices are too small to gain from more, and on a busy machine spinning threads
    made them 5-10x slower. Real-model and notebook tests keep the default."""
    heavy = item.get_closest_marker("real_model") or item.get_closest_marker("notebook")
    torch.set_num_threads(_DEFAULT_THREADS if heavy else 1)


def pytest_runtest_teardown(item, nextitem):
    torch.set_num_threads(_DEFAULT_THREADS)


def pytest_collection_modifyitems(config, items):
    """Mark every test that uses a real-model fixture as ``real_model`` (so ``-m 'not real_model'`` works)."""
    for item in items:
        if _REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real_model)


TINY_VOCAB = 101


def build_tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=24,
        num_hidden_layers=3,
        intermediate_size=37,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=TINY_VOCAB,
        max_position_embeddings=512,
        hidden_act="silu",
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    return model.eval()


@pytest.fixture
def tiny_llama():
    """A tiny random LlamaForCausalLM (fresh per test, so tests may modify it)."""
    return build_tiny_llama(seed=0)


def build_tiny_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {"<unk>": 0, "<eos>": 1, "<pad>": 2}
    for c in chars:
        vocab[c] = len(vocab)
    assert len(vocab) <= TINY_VOCAB
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")
    tok.name_or_path = "tiny-char-tokenizer"
    return tok


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Character-level tokenizer (100 ids) matching ``tiny_llama``'s vocabulary."""
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (LoadedModel, float32, cpu), loaded once per session."""
    from sparsing_utils.models import load_model

    return load_model("smollm2", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's tokenizer alone, loaded once per session."""
    from sparsing_utils.models import load_tokenizer

    return load_tokenizer("smollm2")


# ---------------------------------------------------------------------------------------
# Tiny random models of each FFN family (tests/test_ffn.py, tests/test_rules.py)
# ---------------------------------------------------------------------------------------

TINY_FAMILIES = ("llama", "mistral", "qwen2", "gemma", "phi3", "gpt2", "opt", "gpt_neox")
TINY_FAMILY_VOCAB = 50
TINY_D_FF = 37
# Whether the family's FFN is gated (a = act(W_gate x) * (W_up x)) or plain (a = act(W_in x)).
GATED_FAMILIES = {"llama", "mistral", "qwen2", "gemma", "phi3"}


def build_tiny_family(family: str, seed: int = 0):
    """A tiny random causal LM of ``family`` (hidden 24, 2 layers, d_ff 37, vocab 50, float32,
    eval mode). Weights use initializer std 0.2 (instead of 0.02), so that editing one FFN
    neuron visibly changes the logits."""
    import transformers as tf

    common = {"vocab_size": TINY_FAMILY_VOCAB, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    llama_like = {"hidden_size": 24, "num_hidden_layers": 2, "intermediate_size": TINY_D_FF,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
                  "initializer_range": 0.2, **common}
    if family == "llama":
        config, cls = tf.LlamaConfig(hidden_act="silu", **llama_like), tf.LlamaForCausalLM
    elif family == "mistral":
        config, cls = tf.MistralConfig(hidden_act="silu", sliding_window=None, **llama_like), tf.MistralForCausalLM
    elif family == "qwen2":
        config, cls = tf.Qwen2Config(hidden_act="silu", **llama_like), tf.Qwen2ForCausalLM
    elif family == "gemma":
        config, cls = tf.GemmaConfig(hidden_act="gelu_pytorch_tanh", head_dim=6, **llama_like), tf.GemmaForCausalLM
    elif family == "phi3":
        config, cls = tf.Phi3Config(hidden_act="silu", **llama_like), tf.Phi3ForCausalLM
    elif family == "gpt2":
        config = tf.GPT2Config(n_embd=24, n_layer=2, n_head=4, n_inner=TINY_D_FF, n_positions=64,
                               activation_function="gelu_new", initializer_range=0.2, **common)
        cls = tf.GPT2LMHeadModel
    elif family == "opt":
        config = tf.OPTConfig(hidden_size=24, num_hidden_layers=2, ffn_dim=TINY_D_FF, num_attention_heads=4,
                              word_embed_proj_dim=24, max_position_embeddings=64, activation_function="relu",
                              init_std=0.2, **common)
        cls = tf.OPTForCausalLM
    elif family == "gpt_neox":
        config = tf.GPTNeoXConfig(hidden_size=24, num_hidden_layers=2, intermediate_size=TINY_D_FF,
                                  num_attention_heads=4, max_position_embeddings=64, hidden_act="gelu",
                                  initializer_range=0.2, **common)
        cls = tf.GPTNeoXForCausalLM
    else:
        raise KeyError(family)
    torch.manual_seed(seed)
    return cls(config).to(torch.float32).eval()


@pytest.fixture(params=TINY_FAMILIES)
def tiny_family(request):
    """``(family name, tiny random model)`` for every family in :data:`TINY_FAMILIES`."""
    return request.param, build_tiny_family(request.param)


class Blocks:
    """A minimal TokenBlocks-like object: ``input_ids`` and ``attention_mask`` ``[n_blocks, block_len]``."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        self.input_ids = input_ids
        self.attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask


# ---------------------------------------------------------------------------------------
# A tiny *trained* Llama (tests/test_metric.py, tests/test_cli_measure.py)
# ---------------------------------------------------------------------------------------

MARKOV_LETTERS = "abcdefghijklmnopqrstuvwx"  # 24 symbols; the chain's alphabet


def markov_ids(n: int, seed: int, table_seed: int = 1234) -> torch.Tensor:
    """``n`` symbols (0..23) of a fixed second-order Markov chain: each pair of previous
    symbols has three possible successors with probabilities 0.7 / 0.2 / 0.1 (the table
    depends only on ``table_seed``; ``seed`` picks the sample path)."""
    k = len(MARKOV_LETTERS)
    table = torch.randint(0, k, (k, k, 3), generator=torch.Generator().manual_seed(table_seed)).tolist()
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(0, k, (2,), generator=g).tolist()
    choice = torch.multinomial(torch.tensor([0.7, 0.2, 0.1]), n, replacement=True, generator=g).tolist()
    out = first + [0] * (n - 2)
    for t in range(2, n):
        out[t] = table[out[t - 2]][out[t - 1]][choice[t]]
    return torch.tensor(out[:n], dtype=torch.long)


def markov_text(n: int, seed: int) -> str:
    """The chain as letters (one ``tiny_tokenizer`` token per character)."""
    return "".join(MARKOV_LETTERS[i] for i in markov_ids(n, seed).tolist())


class TrainedLlama:
    """What the ``trained_llama`` fixture holds."""

    def __init__(self, model, early, letter_ids, eval_ids, cal_ids, train_seconds):
        self.model = model  # final checkpoint
        self.early = early  # an earlier checkpoint of the same run (Algorithm 1)
        self.letter_ids = letter_ids  # token id of each chain symbol in tiny_tokenizer
        self.eval_ids = eval_ids  # [16, 64] held-out evaluation blocks
        self.cal_ids = cal_ids  # [16, 64] held-out calibration blocks (another sample path)
        self.train_seconds = train_seconds

    def blocks(self, which: str = "eval") -> Blocks:
        return Blocks(self.eval_ids if which == "eval" else self.cal_ids)


def train_tiny_llama(steps: int = 300, early_step: int = 120, seed: int = 0) -> TrainedLlama:
    """Train a tiny Llama (hidden 32, 2 layers, d_ff 37, vocab 101) with Adam on the Markov
    chain, one thread-independent seed; ~3-5 s on two CPU cores."""
    import time

    from transformers import LlamaConfig, LlamaForCausalLM

    start = time.perf_counter()
    tok = build_tiny_tokenizer()
    letter_ids = torch.tensor(tok.convert_tokens_to_ids(list(MARKOV_LETTERS)))
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=TINY_D_FF, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=TINY_VOCAB, max_position_embeddings=128, hidden_act="silu",
                         bos_token_id=None, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    data = letter_ids[markov_ids(64 * 400, seed=1)].view(-1, 64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is as fast and immune to a busy machine
    try:
        early = _train_loop(model, data, opt, gen, steps, early_step)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    for m in (model, early):
        for p in m.parameters():
            p.requires_grad_(False)
    eval_ids = letter_ids[markov_ids(16 * 64, seed=99)].view(16, 64)
    cal_ids = letter_ids[markov_ids(16 * 64, seed=7)].view(16, 64)
    return TrainedLlama(model, early, letter_ids, eval_ids, cal_ids, time.perf_counter() - start)


def _train_loop(model, data, opt, gen, steps, early_step):
    import copy

    early = None
    for step in range(steps):
        batch = data[torch.randint(0, data.shape[0], (16,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step + 1 == early_step:
            early = copy.deepcopy(model).eval()
    return early


@pytest.fixture(scope="session")
def trained_llama():
    """A tiny Llama trained on a Markov chain (session-scoped: deep-copy before editing)."""
    return train_tiny_llama()
