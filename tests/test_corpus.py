"""The training corpus builder (scripts/build_corpus.py) and the markup converters
(sparsing_utils/textclean.py), on tiny inputs made here: a few prose documents in a ``.jsonl.xz``
archive, a few ``.py`` files in a temporary code root, and a byte-level BPE of 320 tokens trained
on them. Offline; no apt-get (the prose stage's Debian download is not exercised here).
"""
from __future__ import annotations

import json
import lzma
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import build_corpus as bc

from sparsing_utils import textclean

PROSE = [
    "The quick brown fox jumps over the lazy dog. " * 12 + "\n\nA second paragraph follows here.",
    "It was the best of times, it was the worst of times, it was the age of wisdom. " * 8,
    "Call me Ishmael. Some years ago, never mind how long precisely, I thought I would sail about. " * 6,
    "Configuration files are read at start-up; a missing file is reported and the defaults are used. " * 7,
    "In the beginning the Universe was created. This has made a lot of people very angry. " * 9,
    "Ünïcödé text — with “quotes”, an emoji 🙂 and a literal <|endoftext|> inside the document. " * 5,
    "All happy families are alike; each unhappy family is unhappy in its own way. " * 10,
    "The function returns the number of bytes written, or -1 if an error occurred and errno is set. " * 6,
]
CODE = {
    "pkg/__init__.py": "from .core import add\n__all__ = ['add']\n",
    "pkg/core.py": "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n    return a + b\n\n\nclass Box:\n    pass\n",
    "pkg/util.py": "import os\n\n\ndef home():\n    return os.path.expanduser('~')\n",
    "pkg/copy_of_core.py": "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n    return a + b\n\n\nclass Box:\n    pass\n",
    "pkg/tests/test_core.py": "def test_add():\n    assert 1 + 1 == 2\n",
    "pkg/test_helpers.py": "x = 1\n",
    "pkg/_vendor/six.py": "PY3 = True\n",
    "pkg/latin1.py": b"# caf\xe9\nx = 1\n",
    "pkg/data.py": "TABLE = '" + "x" * 5000 + "'\n",
    "pkg/empty.py": "   \n",
    "mod.py": "print('hello')\nfor i in range(3):\n    print(i * i)\n",
    "other.py": "import sys\nsys.exit(0)\n",
}


# ----------------------------------------------------------------------------------------
# fixtures: tiny inputs
# ----------------------------------------------------------------------------------------


def write_archive(path: Path, texts: list[str]) -> Path:
    reports = [bc.SourceReport("tiny", "file", "1", n_files=len(texts), n_docs=len(texts),
                               n_chars=sum(map(len, texts)))]
    docs = [{"source": "tiny", "path": f"doc{i}.txt", "text": t} for i, t in enumerate(texts)]
    bc.write_prose_archive(path, docs, reports, max_mib=10)
    return path


def write_code(root: Path) -> Path:
    for rel, content in CODE.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
    (root / "pkg" / "dangling.py").symlink_to(root / "nowhere.py")  # unreadable: dropped, not a crash
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpus")
    archive = write_archive(tmp / "prose.jsonl.xz", PROSE)
    code = write_code(tmp / "code")
    texts = PROSE + [c for c in CODE.values() if isinstance(c, str)]
    tok = bc.train_tokenizer(texts, vocab_size=320)
    tok_path = tmp / "tokenizer.json"
    tok_path.write_text(tok.to_str())
    return {"tmp": tmp, "archive": archive, "code": code, "tokenizer": tok_path}


def shard_args(inputs, out: Path, *extra: str) -> list[str]:
    return ["shards", "--prose-archive", str(inputs["archive"]), "--code-root", str(inputs["code"]),
            "--tokenizer", str(inputs["tokenizer"]), "--out", str(out), "--workers", "1",
            "--heldout-prose", "0.3", "--heldout-code", "0.3", "--min-heldout-tokens", "0", *extra]


@pytest.fixture(scope="module")
def built(inputs):
    out = inputs["tmp"] / "out1"
    assert bc.main(shard_args(inputs, out)) == 0
    return out


def read_docs(path: Path, eos_id: int) -> list[np.ndarray]:
    ids = np.fromfile(path, dtype="<u2")
    assert len(ids) == 0 or ids[-1] == eos_id, "every document, the last one too, ends with EOS"
    cuts = np.flatnonzero(ids == eos_id)
    return [ids[a + 1 if i else 0:b] for i, (a, b) in enumerate(zip(np.r_[-1, cuts[:-1]], cuts))]


def decoded_docs(out: Path, name: str):
    from tokenizers import Tokenizer

    meta = json.loads((out / "meta.json").read_text())
    tok = Tokenizer.from_file(str(out / meta["tokenizer"]))
    return [tok.decode(d.tolist(), skip_special_tokens=False) for d in read_docs(out / name, meta["eos_id"])]


# ----------------------------------------------------------------------------------------
# shards
# ----------------------------------------------------------------------------------------


def test_meta_matches_files(built):
    meta = json.loads((built / "meta.json").read_text())
    assert meta["format"] == "sparsing-shards/1" and meta["dtype"] == "uint16"
    assert meta["vocab_size"] == 320 and meta["eos_id"] == 0
    total = 0
    for split in ("train", "heldout_prose", "heldout_code"):
        info = meta["splits"][split]
        n = sum((built / f).stat().st_size // 2 for f in info["files"])
        assert n == info["tokens"] == sum(info["tokens_by_domain"].values())
        total += n
    assert meta["unique_tokens"]["total"] == meta["splits"]["train"]["tokens"]
    assert sorted(meta["splits"]["train"]["files"]) == ["train_code.bin", "train_prose.bin"]
    ids = np.concatenate([np.fromfile(built / f, dtype="<u2") for f in
                          ("train_prose.bin", "train_code.bin", "heldout_prose.bin", "heldout_code.bin")])
    assert len(ids) == total and ids.max() < meta["vocab_size"]
    train = np.concatenate([np.fromfile(built / f, dtype="<u2") for f in ("train_prose.bin", "train_code.bin")])
    assert meta["unique_tokens"]["distinct_ids_used"] == len(np.unique(train))



def test_tokenizer_is_copied_beside_the_shards(inputs, built):
    assert (built / "tokenizer.json").read_bytes() == inputs["tokenizer"].read_bytes()


def test_roundtrip_and_eos_between_documents(built):
    """Decoding each EOS-delimited document gives back one input document exactly; the literal
    string <|endoftext|> inside a document is text, not a document break."""
    prose = decoded_docs(built, "train_prose.bin") + decoded_docs(built, "heldout_prose.bin")
    assert sorted(prose) == sorted(PROSE)
    code = decoded_docs(built, "train_code.bin") + decoded_docs(built, "heldout_code.bin")
    kept = {"pkg/__init__.py", "pkg/core.py", "pkg/util.py", "mod.py", "other.py"}
    assert sorted(code) == sorted(CODE[k] for k in kept)


def test_code_filters_and_dedupe(built):
    meta = json.loads((built / "meta.json").read_text())
    assert meta["code_dropped"] == {"duplicate": 1, "empty": 1, "long_lines": 1, "not_utf8": 1,
                                    "test_or_generated_name": 1, "test_or_vendored_dirs": 2, "unreadable": 1}
    assert meta["domains"]["code"]["docs"]["train"] + meta["domains"]["code"]["docs"]["heldout"] == 5


def test_heldout_is_disjoint_and_follows_the_hash_rule(built):
    for domain in ("prose", "code"):
        train = decoded_docs(built, f"train_{domain}.bin")
        held = decoded_docs(built, f"heldout_{domain}.bin")
        assert held, f"held-out {domain} is empty at fraction 0.3 on this input"
        assert not set(train) & set(held)
        for text in held:
            assert bc.heldout_key(bc.sha256(text.encode())) < 0.3
        for text in train:
            assert bc.heldout_key(bc.sha256(text.encode())) >= 0.3


def test_build_twice_gives_identical_bytes(inputs, built):
    out2 = inputs["tmp"] / "out2"
    assert bc.main(shard_args(inputs, out2)) == 0
    for name in ("meta.json", "tokenizer.json", "train_prose.bin", "train_code.bin", "heldout_prose.bin",
                 "heldout_code.bin"):
        assert (built / name).read_bytes() == (out2 / name).read_bytes(), name


def test_crash_mid_build_leaves_no_meta(inputs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert bc.main(shard_args(inputs, out)) == 0
    assert (out / "meta.json").exists()
    calls = []

    def crash(path, arrays):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real(path, arrays)

    real = bc.atomic_write_tokens
    monkeypatch.setattr(bc, "atomic_write_tokens", crash)
    with pytest.raises(OSError, match="simulated"):
        bc.main(shard_args(inputs, out))
    assert not (out / "meta.json").exists(), "an interrupted rebuild must not leave the old meta.json"
    assert not list(out.glob(".*.tmp")), "no temporary file is left behind"


def test_atomic_file_keeps_the_old_file_when_a_write_fails(tmp_path):
    path = tmp_path / "x.bin"
    bc.atomic_write_bytes(path, b"old")
    with pytest.raises(OSError, match="simulated"), bc.atomic_file(path) as handle:
        handle.write(b"half")
        raise OSError("disk full (simulated)")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]
    assert bc.atomic_write_tokens(path, [np.arange(3), np.arange(2)]) == 5
    assert np.fromfile(path, dtype="<u2").tolist() == [0, 1, 2, 0, 1]
    assert oct(path.stat().st_mode & 0o777) == "0o644"


# ----------------------------------------------------------------------------------------
# bad input: a clear error before heavy work
# ----------------------------------------------------------------------------------------


def _error(capsys, argv) -> str:
    assert bc.main(argv) == 2
    return capsys.readouterr().err


def test_missing_code_root(inputs, tmp_path, capsys):
    argv = shard_args(inputs, tmp_path / "out")
    argv[argv.index("--code-root") + 1] = str(tmp_path / "nope")
    err = _error(capsys, argv)
    assert "code root" in err and "--code-root" in err
    assert not (tmp_path / "out").exists(), "nothing is written before the inputs are checked"


def test_empty_prose_archive(inputs, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl.xz"
    empty.write_bytes(lzma.compress(json.dumps({"format": bc.PROSE_FORMAT, "n_docs": 0}).encode() + b"\n"))
    argv = shard_args(inputs, tmp_path / "out")
    argv[argv.index("--prose-archive") + 1] = str(empty)
    assert "holds no documents" in _error(capsys, argv)
    argv[argv.index("--prose-archive") + 1] = str(tmp_path / "missing.jsonl.xz")
    assert "not found" in _error(capsys, argv)
    (tmp_path / "junk.xz").write_bytes(b"not xz at all")
    argv[argv.index("--prose-archive") + 1] = str(tmp_path / "junk.xz")
    assert "not a readable .xz" in _error(capsys, argv)


def test_truncated_archive_is_detected(inputs, tmp_path, capsys):
    archive = tmp_path / "short.jsonl.xz"
    lines = lzma.decompress(inputs["archive"].read_bytes()).decode().splitlines(keepends=True)
    archive.write_bytes(lzma.compress("".join(lines[:-2]).encode()))  # header still says len(PROSE)
    argv = shard_args(inputs, tmp_path / "out")
    argv[argv.index("--prose-archive") + 1] = str(archive)
    assert "truncated or corrupt" in _error(capsys, argv)
    assert not (tmp_path / "out" / "meta.json").exists()


def test_tokenizer_missing_or_too_large(inputs, tmp_path, capsys):
    from tokenizers import Tokenizer, models

    argv = shard_args(inputs, tmp_path / "out")
    argv[argv.index("--tokenizer") + 1] = str(tmp_path / "none.json")
    assert "not found" in _error(capsys, argv)
    vocab = {bc.EOS: 0, **{f"w{i}": i + 1 for i in range(70_000)}}
    big = tmp_path / "big.json"
    big.write_text(Tokenizer(models.WordLevel(vocab, unk_token=bc.EOS)).to_str())
    argv[argv.index("--tokenizer") + 1] = str(big)
    assert "uint16" in _error(capsys, argv)
    with pytest.raises(bc.CorpusError, match="vocab-size"):
        bc.train_tokenizer(["abc"], vocab_size=70_000)


def test_heldout_fraction_out_of_range(inputs, tmp_path, capsys):
    argv = shard_args(inputs, tmp_path / "out")
    argv[argv.index("--heldout-code") + 1] = "0.7"
    assert "--heldout-code" in _error(capsys, argv)


# ----------------------------------------------------------------------------------------
# pieces
# ----------------------------------------------------------------------------------------


def test_heldout_key_is_a_fraction_of_the_hash():
    assert bc.heldout_key("0" * 64) == 0.0
    assert bc.heldout_key("8" + "0" * 63) == 0.5
    assert bc.heldout_key("f" * 64) < 1.0


def test_split_long_cuts_at_paragraphs():
    text = "\n\n".join(f"paragraph {i} " + "x" * 30 for i in range(40))
    pieces = bc.split_long(text, 200)
    assert all(len(p) <= 200 for p in pieces)
    assert "\n\n".join(pieces) == text
    assert all(p.startswith("paragraph") for p in pieces)


def test_files_digest_ignores_order():
    a = [("b.py", 3, "x"), ("a.py", 2, "y")]
    assert bc.files_digest(a) == bc.files_digest(a[::-1]) != bc.files_digest(a[:1])


def test_list_code_files_drops_tests_and_vendored(inputs):
    rels, dropped = bc.list_code_files(inputs["code"])
    assert "pkg/tests/test_core.py" not in rels and "pkg/_vendor/six.py" not in rels
    assert "pkg/test_helpers.py" not in rels and rels == sorted(rels)
    assert dropped == {"test_or_vendored_dirs": 2, "test_or_generated_name": 1}


def test_prose_archive_header_and_documents(inputs):
    header = bc.read_prose_header(inputs["archive"])
    assert header["n_docs"] == len(PROSE) and header["format"] == bc.PROSE_FORMAT
    assert [d["text"] for d in bc.read_prose_docs(inputs["archive"])] == PROSE


def test_head_share_numbers():
    s = bc.head_share(256, 6, 8192)
    assert s["non_embedding_params"] == 12 * 256 * 256 * 6 == 4_718_592
    assert s["head_params"] == 2_097_152
    assert s["head_flop_share"] == pytest.approx(2_097_152 / (4_718_592 + 2_097_152))


# ----------------------------------------------------------------------------------------
# textclean
# ----------------------------------------------------------------------------------------


def test_html_drops_navigation_keeps_prose_and_code():
    page = """<html><head><title>T</title><script>var x = 1;</script></head><body>
    <div class="related"><a href="x">next</a></div>
    <nav>Menu</nav>
    <div class="body"><h1>Title<a class="headerlink" href="#t">¶</a></h1>
    <p>First   paragraph &amp; more
    text.</p><ul><li><p>item one</p></li><li>item two</li></ul>
    <pre>def f(x):
    return x</pre></div>
    <div class="sphinxsidebar"><p>Search</p></div><footer>(c) 2024</footer></body></html>"""
    assert textclean.to_text(page, "html") == (
        "Title\n\nFirst paragraph & more text.\n\n- item one\n\n- item two\n\ndef f(x):\n    return x")


def test_rst_reduces_markup():
    src = """.. _label:

Title
=====

See :func:`open` and :ref:`the guide <guide>`, ``code`` and **bold** text.

.. note::

   Keep this note.

.. toctree::
   :maxdepth: 2

   hidden

.. function:: spam(x)

   Describe spam.

Example::

    print(1)
"""
    assert textclean.to_text(src, "rst") == (
        "Title\n\nSee open and the guide, code and bold text.\n\n   Keep this note.\n\nspam(x)\n\n"
        "   Describe spam.\n\nExample:\n\n    print(1)")


def test_pod_and_man_and_info():
    pod = "=head1 NAME\n\nperlfoo - B<bold> and C<< $x->y >> and L<perlsyn/Loops>\n\n  my $x = 1;\n\n=cut\n\ncode\n"
    assert textclean.to_text(pod, "pod") == "NAME\n\nperlfoo - bold and $x->y and perlsyn/Loops\n\n  my $x = 1;"
    man = '.\\" comment\n.TH FOO 1\n.SH NAME\nfoo \\- do\nthings\n.PP\n.B bold\nword \\(em end\n.nf\nkeep\nlines\n.fi\n'
    assert textclean.to_text(man, "man") == "NAME\n\nfoo - do things\n\nbold word \u2014 end\nkeep\nlines"
    info = "This is x.info, produced by makeinfo.\n\x1f\nFile: x.info,  Node: Top\n\nHello *note Intro::.\n\n* Menu:\n\n* A:: a\n\x1f\nTag Table:\nNode: Top\x7f1\n"
    assert textclean.to_text(info, "info") == "Hello see Intro."


def test_english_score_separates_languages():
    en = "The file is opened when the program starts, and it is closed at the end of the run."
    de = "Die Datei wird beim Start des Programms geöffnet und am Ende des Laufs geschlossen."
    assert textclean.english_score(en) > 0.3
    assert textclean.english_score(de) < 0.05
    assert textclean.english_score("") == 0.0


def test_empty_heldout_split_is_an_error_before_writing(inputs, tmp_path, capsys):
    argv = shard_args(inputs, tmp_path / "out")
    argv[argv.index("--heldout-prose") + 1] = "1e-12"
    assert "held-out prose split is empty" in _error(capsys, argv)
    assert not list((tmp_path / "out").glob("*.bin")) and not (tmp_path / "out" / "meta.json").exists()
