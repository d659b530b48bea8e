"""Token blocks (:mod:`sparsing_utils.blocks`): chunked tokenization, splits, errors (fast: a
character-level tokenizer; the real tokenizer is marked real_model)."""
from __future__ import annotations

import json

import pytest
import torch

import sparsing_utils.blocks as blocks_module
from sparsing_utils.blocks import (
    TokenBlocks,
    blocks_from_text,
    make_blocks,
    tokenize_text,
)
from sparsing_utils.sources import load_text


def _prose(n_lines: int = 4000) -> str:
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards", "quietly", "hex", "jovial", "bumpkins"]
    lines = []
    for i in range(n_lines):
        line = " ".join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 9))
        lines.append(("    " if i % 5 == 0 else "") + f"{i}: {line}.")
    return "\n".join(lines) + "\n"


@pytest.fixture
def prose_file(tmp_path):
    path = tmp_path / "prose.txt"
    path.write_text(_prose(), encoding="utf-8")
    return path


# -- tokenization ----------------------------------------------------------------------


def test_chunked_tokenization_equals_whole(tiny_tokenizer):
    text = _prose(6000)
    assert len(text) > 3 * blocks_module._CHUNK_CHARS
    whole = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = tokenize_text(tiny_tokenizer, text)
    assert ids.dtype == torch.long and ids.tolist() == whole


def test_chunk_grid_is_prefix_stable():
    text = _prose(8000)
    full = blocks_module._chunks(text, complete=True)
    assert "".join(full) == text
    for k in (50_000, 100_001, 150_000):
        part = blocks_module._chunks(text[:k], complete=False)
        assert part == full[: len(part)]
        assert sum(map(len, part)) > k - 2 * blocks_module._CHUNK_CHARS


def test_chunk_cuts_avoid_whitespace_runs():
    # no newline and no single space between words: cuts fall before a whitespace run, never inside
    text = ("x:" + " " * 40 + "'y',") * 5000
    chunks = blocks_module._chunks(text, complete=True)
    assert len(chunks) > 3 and "".join(chunks) == text
    for chunk, nxt in zip(chunks[:-1], chunks[1:], strict=True):
        assert not chunk[-1].isspace() and nxt[0] == " "


# -- blocks ----------------------------------------------------------------------------


def test_make_blocks_shapes_and_stream(tiny_tokenizer, prose_file):
    blocks = make_blocks(tiny_tokenizer, str(prose_file), tokens=1000, block_len=64)
    assert isinstance(blocks, TokenBlocks)
    assert blocks.input_ids.shape == (15, 64) and blocks.input_ids.dtype == torch.long
    assert blocks.attention_mask.dtype == torch.long and bool((blocks.attention_mask == 1).all())
    assert len(blocks) == 15 and blocks.n_tokens == 15 * 64 and blocks.block_len == 64 and blocks.offset == 0
    stream = tokenize_text(tiny_tokenizer, prose_file.read_text())
    assert torch.equal(blocks.input_ids.flatten(), stream[: 15 * 64])
    again = make_blocks(tiny_tokenizer, str(prose_file), tokens=1000, block_len=64)
    assert torch.equal(again.input_ids, blocks.input_ids)


def test_lazy_all_split_matches_full_read(tiny_tokenizer):
    lazy = make_blocks(tiny_tokenizer, "pydoc", tokens=4096, block_len=128)
    full = blocks_from_text(tiny_tokenizer, load_text("pydoc")[0], tokens=4096, block_len=128)
    assert torch.equal(lazy.input_ids, full.input_ids)
    assert lazy.stream_tokens is None and full.stream_tokens is not None


def test_stdlib_blocks_are_code(tiny_tokenizer):
    blocks = make_blocks(tiny_tokenizer, "stdlib", tokens=2048, block_len=256)
    text = tiny_tokenizer.decode(blocks.input_ids[0])
    assert "import" in text or "def " in text or '"""' in text


def test_calibration_and_evaluation_are_disjoint_halves(tiny_tokenizer, prose_file):
    stream = tokenize_text(tiny_tokenizer, prose_file.read_text())
    total = stream.numel()
    cal = make_blocks(tiny_tokenizer, str(prose_file), tokens=2000, block_len=100, split="calibration")
    ev = make_blocks(tiny_tokenizer, str(prose_file), tokens=2000, block_len=100, split="evaluation")
    cut = int(total * 0.5)
    assert cal.offset == 0 and ev.offset == cut
    assert cal.stream_tokens == cut and ev.stream_tokens == total - cut
    assert torch.equal(cal.input_ids.flatten(), stream[:2000])
    assert torch.equal(ev.input_ids.flatten(), stream[cut : cut + 2000])
    assert cal.split == "calibration" and ev.to_dict()["calibration_fraction"] == 0.5
    ev30 = make_blocks(tiny_tokenizer, str(prose_file), tokens=2000, block_len=100, split="evaluation", calibration_fraction=0.3)
    assert ev30.offset == int(total * 0.3)


def test_splits_tokenize_the_source_once(tiny_tokenizer, prose_file, monkeypatch):
    blocks_module._STREAM_CACHE.clear()
    calls = []
    original = blocks_module.tokenize_text
    monkeypatch.setattr(blocks_module, "tokenize_text", lambda *a, **k: calls.append(1) or original(*a, **k))
    make_blocks(tiny_tokenizer, str(prose_file), tokens=500, block_len=100, split="calibration")
    make_blocks(tiny_tokenizer, str(prose_file), tokens=500, block_len=100, split="evaluation")
    assert len(calls) == 1
    prose_file.write_text(_prose(3000))  # a changed file is tokenized again
    make_blocks(tiny_tokenizer, str(prose_file), tokens=500, block_len=100, split="evaluation")
    assert len(calls) == 2


def test_shuffle_is_seeded(tiny_tokenizer, prose_file):
    kw = dict(tokens=640, block_len=64, shuffle=True)
    a = make_blocks(tiny_tokenizer, str(prose_file), seed=1, **kw)
    b = make_blocks(tiny_tokenizer, str(prose_file), seed=1, **kw)
    c = make_blocks(tiny_tokenizer, str(prose_file), seed=2, **kw)
    assert torch.equal(a.input_ids, b.input_ids) and a.block_index == b.block_index
    assert a.block_index != c.block_index and a.block_index == sorted(a.block_index)
    stream = tokenize_text(tiny_tokenizer, prose_file.read_text())
    for row, i in zip(a.input_ids, a.block_index, strict=True):
        assert torch.equal(row, stream[i * 64 : (i + 1) * 64])


def test_tokens_round_down(tiny_tokenizer, prose_file):
    blocks = make_blocks(tiny_tokenizer, str(prose_file), tokens=199, block_len=100)
    assert blocks.input_ids.shape == (1, 100)


def test_blocks_batches_to_and_dict(tiny_tokenizer, prose_file):
    blocks = make_blocks(tiny_tokenizer, str(prose_file), tokens=700, block_len=100)
    parts = list(blocks.batches(3))
    assert [p[0].shape[0] for p in parts] == [3, 3, 1]
    assert torch.equal(torch.cat([p[0] for p in parts]), blocks.input_ids)
    assert torch.equal(torch.cat([p[1] for p in parts]), blocks.attention_mask)
    moved = blocks.to("meta")
    assert moved.input_ids.device.type == "meta" and blocks.input_ids.device.type == "cpu"
    meta = blocks.to_dict()
    json.dumps(meta)
    assert meta["n_blocks"] == 7 and meta["n_tokens"] == 700 and meta["tokenizer"] == "tiny-char-tokenizer"
    assert not any(isinstance(v, torch.Tensor) for v in meta.values())
    with pytest.raises(ValueError, match="batch_size"):
        list(blocks.batches(0))


def test_padding_counts_in_n_tokens_only_through_the_mask():
    ids = torch.arange(8).view(2, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    blocks = TokenBlocks(input_ids=ids, attention_mask=mask, source="x", n_tokens=int(mask.sum()), block_len=4)
    assert blocks.n_tokens == 6 and len(blocks) == 2
    with pytest.raises(ValueError, match="one shape"):
        TokenBlocks(input_ids=ids, attention_mask=mask[:1], source="x", n_tokens=0, block_len=4)


# -- errors ----------------------------------------------------------------------------


def test_error_empty_text(tiny_tokenizer, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="is empty"):
        make_blocks(tiny_tokenizer, str(empty), tokens=128, block_len=64)
    with pytest.raises(ValueError, match="is empty"):
        blocks_from_text(tiny_tokenizer, "", tokens=128, block_len=64)


def test_error_text_too_short(tiny_tokenizer):
    with pytest.raises(ValueError, match=r"text has 11 tokens, need at least block_len=64; lower --block-len or use a longer source"):
        blocks_from_text(tiny_tokenizer, "hello world", tokens=128, block_len=64)


def test_error_budget_larger_than_text(tiny_tokenizer):
    text = "abcdefghij" * 30  # 300 tokens
    with pytest.raises(ValueError, match=r"asked for 1,000 tokens \(10 blocks of 100\) but the source has only 300 \(split all\): lower --tokens"):
        blocks_from_text(tiny_tokenizer, text, tokens=1000, block_len=100)
    with pytest.raises(ValueError, match=r"only 150 \(split evaluation\)"):
        blocks_from_text(tiny_tokenizer, text, tokens=200, block_len=100, split="evaluation")


def test_error_budget_larger_than_builtin(tiny_tokenizer):
    with pytest.raises(ValueError, match=r"but the source has only [\d,]+ \(split all\)"):
        make_blocks(tiny_tokenizer, "pydoc", tokens=10_000_000, block_len=512)


def test_error_arguments(tiny_tokenizer):
    with pytest.raises(ValueError, match="tokens=100 is smaller than block_len=512"):
        blocks_from_text(tiny_tokenizer, "x" * 2000, tokens=100, block_len=512)
    with pytest.raises(ValueError, match="block_len must be an integer of at least 2"):
        blocks_from_text(tiny_tokenizer, "x" * 2000, tokens=100, block_len=1)
    with pytest.raises(ValueError, match="split must be one of"):
        blocks_from_text(tiny_tokenizer, "x" * 2000, tokens=100, block_len=10, split="train")
    with pytest.raises(ValueError, match="calibration_fraction"):
        blocks_from_text(tiny_tokenizer, "x" * 2000, tokens=100, block_len=10, split="evaluation", calibration_fraction=1.0)
    with pytest.raises(ValueError, match="tokens must be an integer"):
        blocks_from_text(tiny_tokenizer, "x" * 2000, tokens=100.0, block_len=10)


def test_error_unknown_source_in_make_blocks(tiny_tokenizer):
    with pytest.raises(ValueError, match="unknown text source"):
        make_blocks(tiny_tokenizer, "not-a-source", tokens=128, block_len=64)


# -- real tokenizer --------------------------------------------------------------------


@pytest.mark.real_model
def test_smollm2_chunked_tokenization_equals_whole(smollm2_tokenizer):
    text, _ = load_text("pydoc")
    whole = smollm2_tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    assert tokenize_text(smollm2_tokenizer, text).tolist() == whole
    code, _ = load_text("stdlib", max_chars=400_000)
    whole = smollm2_tokenizer(code, add_special_tokens=False, verbose=False)["input_ids"]
    assert tokenize_text(smollm2_tokenizer, code).tolist() == whole
