"""Text sources and token blocks (fast: a character-level tokenizer; real tokenizer marked real_model)."""
from __future__ import annotations

import gzip
import json
import sys
import sysconfig
import types
from pathlib import Path

import pytest
import torch

from sparsing_utils import corpora
from sparsing_utils.corpora import (
    BUILTIN_SOURCES,
    MissingDependencyError,
    SourceNotFoundError,
    TokenBlocks,
    UnknownSourceError,
    blocks_from_text,
    load_text,
    make_blocks,
    stdlib_files,
    tokenize_text,
)
from sparsing_utils.models import HubUnreachableError

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def _prose(n_lines: int = 4000) -> str:
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jovial bumpkins".split()
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


# -- sources ---------------------------------------------------------------------------


def test_builtin_names():
    assert set(BUILTIN_SOURCES) == {"pydoc", "stdlib"}
    assert all(isinstance(v, str) and v for v in BUILTIN_SOURCES.values())


def test_pydoc_is_sorted_topics_and_deterministic():
    from pydoc_data.topics import topics

    text, desc = load_text("pydoc")
    assert text == "\n\n".join(topics[k] for k in sorted(topics))
    assert load_text("pydoc")[0] == text
    assert desc.startswith("pydoc:") and "pydoc_data.topics" in desc
    short, desc_short = load_text("pydoc", max_chars=1000)
    assert short == text[:1000] and "first 1,000" in desc_short


def test_stdlib_files_sorted_without_tests_or_site_packages():
    files = stdlib_files()
    assert len(files) > 100
    root = Path(sysconfig.get_paths()["stdlib"])
    names = [f.relative_to(root).as_posix() for f in files]
    assert names == sorted(names)
    assert all(n.endswith(".py") for n in names)
    for part in ("test", "tests", "site-packages", "idle_test"):
        assert not any(part in Path(n).parts[:-1] for n in names), part


def test_stdlib_reads_lazily_and_exactly_max_chars(monkeypatch):
    opened = []
    original = Path.read_text

    def spy(self, *args, **kwargs):
        opened.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", spy)
    text, desc = load_text("stdlib", max_chars=5000)
    assert len(text) == 5000
    assert len(opened) < 20  # only the first few files, not the whole library
    first = stdlib_files()[0]
    assert text.startswith(original(first, encoding="utf-8", errors="replace")[:100])
    assert desc.startswith("stdlib:") and f"of {len(stdlib_files())} files" in desc


def test_txt_file_and_crlf(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"line one\r\nline two\r\n")
    text, desc = load_text(str(path))
    assert text == "line one\nline two\n"
    assert "a.txt" in desc
    assert load_text(path, max_chars=4)[0] == "line"


def test_compressed_txt(tmp_path):
    path = tmp_path / "b.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("compressed text\n")
    assert load_text(str(path))[0] == "compressed text\n"


def test_jsonl_default_and_custom_field(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"text": "first", "q": "a"}, {"text": "second", "q": "b"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    text, desc = load_text(str(path))
    assert text == "first\n\nsecond"
    assert "2 records" in desc
    assert load_text(str(path), text_field="q")[0] == "a\n\nb"


def test_jsonl_missing_field_lists_fields(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"query": "x", "gold": 1}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no field 'text'.*fields found: \['gold', 'query'\]"):
        load_text(str(path))


def test_jsonl_bad_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_text(str(path))


def test_json_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}]), encoding="utf-8")
    assert load_text(str(path))[0] == "a\n\nb"


def test_not_utf8(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        load_text(str(path))


def test_folder_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="is a folder"):
        load_text(str(tmp_path))


def test_unknown_source_lists_forms():
    with pytest.raises(UnknownSourceError, match=r"unknown text source 'wikipedia'.*pydoc, stdlib.*\.jsonl.*hf:NAME"):
        load_text("wikipedia")
    with pytest.raises(ValueError, match="blocks_from_text"):
        load_text("Once upon a time there was a raw string passed as a source.")


def test_missing_file_is_file_not_found_and_value_error():
    with pytest.raises(FileNotFoundError, match="no_such.txt"):
        load_text("../shared/data/no_such.txt")
    with pytest.raises(ValueError, match="accepted"):
        load_text("missing.jsonl")
    assert issubclass(SourceNotFoundError, FileNotFoundError) and issubclass(SourceNotFoundError, ValueError)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present")
@pytest.mark.parametrize("rel", ["wikitext-2/test.txt", "tinyshakespeare/input.txt"])
def test_shared_data_paths(rel, monkeypatch, tiny_tokenizer):
    monkeypatch.chdir(REPO)
    spec = f"../shared/data/{rel}"
    text, desc = load_text(spec, max_chars=10_000)
    assert len(text) == 10_000 and Path(rel).name in desc
    blocks = make_blocks(tiny_tokenizer, spec, tokens=4096, block_len=512, split="evaluation")
    assert blocks.input_ids.shape == (8, 512)


def test_max_chars_validation():
    with pytest.raises(ValueError, match="max_chars"):
        load_text("pydoc", max_chars=0)


# -- Hugging Face datasets ---------------------------------------------------------------


def test_parse_hf():
    assert corpora._parse_hf("hf:wikitext") == ("wikitext", None, None)
    assert corpora._parse_hf("hf:wikitext:wikitext-2-raw-v1") == ("wikitext", "wikitext-2-raw-v1", None)
    assert corpora._parse_hf("hf:roneneldan/TinyStories:validation") == ("roneneldan/TinyStories", None, "validation")
    assert corpora._parse_hf("hf:wikitext:wikitext-2-raw-v1:test") == ("wikitext", "wikitext-2-raw-v1", "test")
    with pytest.raises(ValueError, match="missing dataset name"):
        corpora._parse_hf("hf:")


def test_hf_offline_error():
    # conftest sets HF_HUB_OFFLINE=1
    with pytest.raises(HubUnreachableError, match=r"unreachable.*built-in source \(pydoc, stdlib\) or a local"):
        load_text("hf:wikitext:wikitext-2-raw-v1:test")


def _online(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)


def test_hf_without_datasets_package(monkeypatch):
    _online(monkeypatch)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(MissingDependencyError, match="pip install datasets"):
        load_text("hf:wikitext")


def test_hf_streaming_with_fake_datasets(monkeypatch):
    _online(monkeypatch)
    calls = []

    def load_dataset(name, config, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        rows = [{"text": f"row {i}", "other": i} for i in range(100)]
        if split is None:
            return {"train": rows, "test": rows[:3]}
        return rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    text, desc = load_text("hf:some/data")
    assert calls[-1] == ("some/data", None, None, True)
    assert text == "row 0\n\nrow 1\n\nrow 2" and "hf:some/data:test" in desc
    text, _ = load_text("hf:some/data:cfg:train", max_chars=12)
    assert calls[-1] == ("some/data", "cfg", "train", True)
    assert text == "row 0\n\nrow 1"[:12]
    with pytest.raises(ValueError, match="fields found: \\['other', 'text'\\]"):
        load_text("hf:some/data:train", text_field="body")


def test_hf_network_failure_is_clear(monkeypatch):
    _online(monkeypatch)

    def load_dataset(*args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(ValueError, match="could not load Hugging Face dataset 'x'.*built-in source"):
        load_text("hf:x")


# -- tokenization ----------------------------------------------------------------------


def test_chunked_tokenization_equals_whole(tiny_tokenizer):
    text = _prose(6000)
    assert len(text) > 3 * corpora._CHUNK_CHARS
    whole = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = tokenize_text(tiny_tokenizer, text)
    assert ids.dtype == torch.long and ids.tolist() == whole


def test_chunk_grid_is_prefix_stable():
    text = _prose(8000)
    full = corpora._chunks(text, complete=True)
    assert "".join(full) == text
    for k in (50_000, 100_001, 150_000):
        part = corpora._chunks(text[:k], complete=False)
        assert part == full[: len(part)]
        assert sum(map(len, part)) > k - 2 * corpora._CHUNK_CHARS


def test_chunk_cuts_avoid_whitespace_runs():
    # no newline and no single space between words: cuts fall before a whitespace run, never inside
    text = ("x:" + " " * 40 + "'y',") * 5000
    chunks = corpora._chunks(text, complete=True)
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
    corpora._STREAM_CACHE.clear()
    calls = []
    original = corpora.tokenize_text
    monkeypatch.setattr(corpora, "tokenize_text", lambda *a, **k: calls.append(1) or original(*a, **k))
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
