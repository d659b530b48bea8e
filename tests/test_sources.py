"""Text sources (:mod:`sparsing_utils.sources`): built-in, local files, ``hf:`` datasets (fast)."""
from __future__ import annotations

import gzip
import json
import sys
import sysconfig
import types
from pathlib import Path

import pytest

from sparsing_utils import sources
from sparsing_utils.blocks import make_blocks
from sparsing_utils.hub import HubUnreachableError, looks_like_path
from sparsing_utils.sources import (
    BUILTIN_SOURCES,
    MissingDependencyError,
    SourceNotFoundError,
    UnknownSourceError,
    load_text,
    stdlib_files,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


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
    assert sources._parse_hf("hf:wikitext") == ("wikitext", None, None)
    assert sources._parse_hf("hf:wikitext:wikitext-2-raw-v1") == ("wikitext", "wikitext-2-raw-v1", None)
    assert sources._parse_hf("hf:roneneldan/TinyStories:validation") == ("roneneldan/TinyStories", None, "validation")
    assert sources._parse_hf("hf:wikitext:wikitext-2-raw-v1:test") == ("wikitext", "wikitext-2-raw-v1", "test")
    with pytest.raises(ValueError, match="missing dataset name"):
        sources._parse_hf("hf:")


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




# -- the one path rule (shared with models) -----------------------------------------------


@pytest.mark.parametrize("spec,suffixes,expected", [
    ("corpus.txt", (".txt",), True),
    ("Corpus.TXT", (".txt",), True),
    ("missing.gguf", (".gguf",), True),
    ("corpus.txt", (".gguf",), False),
    ("./x", (), True),
    ("../x", (), True),
    ("~/x", (), True),
    ("/abs/x", (), True),
    (".", (), True),
    ("a\\b", (), True),
    ("models/a/b", (), True),  # more than one '/': not a hub id
    ("org/name", (), False),  # a hub id
    ("pydoc", (), False),  # a name
    (".hidden", (), False),
])
def test_looks_like_path(spec, suffixes, expected):
    assert looks_like_path(spec, suffixes) is expected
