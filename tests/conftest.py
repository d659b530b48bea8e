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
