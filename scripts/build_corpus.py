#!/usr/bin/env python
"""Build the training corpus of the training lab (issue 8): English prose + Python code, a
byte-level BPE tokenizer and packed ``uint16`` token shards (format: notes/TRAINING_INTERFACES.md,
``sparsing-shards/1``).

Stages (``python scripts/build_corpus.py STAGE ...``):

``prose``
    Gather English prose from Debian documentation packages (``apt-get download`` +
    ``dpkg-deb -x`` into ``--cache``; the table :data:`PROSE_SOURCES`) and from plain-text files
    read by path (tinyshakespeare), convert the markup to text (:mod:`sparsing_utils.textclean`),
    drop short and non-English pages, split very long documents, drop exact duplicates, and write
    ONE compressed archive (``--prose-archive``, ``.jsonl.xz``: a header line with the manifest,
    then one ``{"source", "path", "text"}`` per document). This is what travels to the GPU machine.
``tokenizer``
    Train the byte-level BPE (HF ``tokenizers``) on a deterministic sample of the TRAIN split of
    both domains and write ``--tokenizer`` (default ``data/tokenizer/tokenizer.json``, committed).
``vocab``
    The vocabulary-size study behind the choice: train at several sizes on the same sample,
    measure chars/token on held-out prose and code, write ``data/tokenizer/vocab_study.json``.
``shards``
    Tokenize the prose archive and the code roots (``--code-root``, default: the running
    interpreter's stdlib + site-packages) with the committed tokenizer, in ``--workers``
    processes, into ``--out``: ``train_prose.bin``, ``train_code.bin``, ``heldout_prose.bin``,
    ``heldout_code.bin`` (flat little-endian uint16, EOS after every document), ``tokenizer.json``,
    ``meta.json`` (written last; a folder without it is incomplete) and ``timing.json``.
``all``
    prose, tokenizer, shards.

Determinism: inputs are read in sorted path order; the held-out split is a hash rule on each
document's content (:func:`heldout_key`), stable across machines; nothing is random. Two builds
from the same inputs give byte-identical shards and meta.json (timings go to timing.json).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import hashlib
import importlib.metadata
import io
import json
import lzma
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # runs from a checkout without installing the package
# sparsing_utils.textclean is imported inside the prose-stage functions only: importing the package
# loads torch, which the tokenization workers of the shards stage must not wait for.

SHARDS_FORMAT = "sparsing-shards/1"
PROSE_FORMAT = "sparsing-prose/1"
BUILDER_VERSION = "1"
EOS = "<|endoftext|>"
DTYPE = np.dtype("<u2")
MAX_VOCAB = 1 << 16  # uint16 token ids

DEFAULT_CORPUS_DIR = REPO / ".corpus"
DEFAULT_CACHE = DEFAULT_CORPUS_DIR / "cache"
DEFAULT_PROSE_ARCHIVE = DEFAULT_CORPUS_DIR / "prose.jsonl.xz"
DEFAULT_SHARDS = DEFAULT_CORPUS_DIR / "shards"
DEFAULT_TOKENIZER = REPO / "data" / "tokenizer" / "tokenizer.json"
DEFAULT_VOCAB_STUDY = REPO / "data" / "tokenizer" / "vocab_study.json"
DEFAULT_SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"

# ----------------------------------------------------------------------------------------
# the sources
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProseSource:
    """One Debian package: which files of it are read (regex on the path inside the package,
    minus ``exclude``) and in which markup (a key of ``textclean.CONVERTERS``)."""

    package: str
    markup: str
    include: str
    exclude: str | None = None


_SPHINX_JUNK = r"/(_sources|_modules|_static|_images|_downloads)/|/(genindex|search|py-modindex|np-modindex)\.html$"

# Ordered roughly by how much natural prose a page holds; every package is in Debian 12 ("bookworm") main.
PROSE_SOURCES: tuple[ProseSource, ...] = (
    # literature and lore
    ProseSource("dict-devil", "text", r"^usr/share/dictd/devil\.dict\.dz$"),
    ProseSource("fortunes", "fortune", r"^usr/share/games/fortunes/[a-z-]+$", r"/ascii-art$"),
    ProseSource("crawl-common", "text", r"^usr/share/crawl/dat/descript/[a-z_]+\.txt$"),
    ProseSource("cfi-en", "html", r"^usr/share/doc/cfi-en/html/.*\.html?$"),
    ProseSource("jargon", "info", r"^usr/share/info/jargon\.info\.gz$"),
    ProseSource("dict-foldoc", "text", r"^usr/share/dictd/foldoc\.dict\.dz$"),
    # books, manuals and guides
    ProseSource("debian-handbook", "html", r"^usr/share/doc/debian-handbook/html/en-US/.*\.html$"),
    ProseSource("debian-reference-en", "html", r"^usr/share/debian-reference/.*\.en\.html$"),
    ProseSource("debian-history", "html", r"^usr/share/doc/debian-history/docs/.*\.en\.html$"),
    ProseSource("debian-faq", "html", r"^usr/share/doc/debian/FAQ/.*\.html$"),
    ProseSource("debian-policy", "html", r"^usr/share/doc/debian-policy/[^/]+\.html/.*\.html$", _SPHINX_JUNK),
    ProseSource("developers-reference", "html", r"^usr/share/developers-reference/[^/]*\.html$", _SPHINX_JUNK),
    ProseSource("maint-guide", "html", r"^usr/share/doc/maint-guide/html/.*\.en\.html$"),
    ProseSource("harden-doc", "html", r"^usr/share/doc/harden-doc/html/en-US/.*\.html$"),
    ProseSource("installation-guide-amd64", "html", r"^usr/share/doc/installation-guide-amd64/en/.*\.html$"),
    ProseSource("gnu-standards", "info", r"^usr/share/info/.*\.info\.gz$"),
    ProseSource("bash-doc", "info", r"^usr/share/info/.*\.info\.gz$"),
    ProseSource("autoconf-doc", "info", r"^usr/share/info/.*\.info.*\.gz$"),
    ProseSource("automake", "info", r"^usr/share/info/.*\.info.*\.gz$"),
    ProseSource("binutils-doc", "info", r"^usr/share/info/.*\.info.*\.gz$"),
    ProseSource("guile-3.0-doc", "info", r"^usr/share/info/.*\.info.*\.gz$"),
    ProseSource("sbcl-doc", "info", r"^usr/share/info/.*\.info.*\.gz$"),
    ProseSource("vim-runtime", "text", r"^usr/share/vim/vim90/doc/.*\.txt$"),
    ProseSource("python3.11-doc", "rst", r"^usr/share/doc/python3\.11/html/_sources/.*\.rst\.txt$"),
    ProseSource("linux-doc-6.1", "rst", r"^usr/share/doc/linux-doc-6\.1/html/_sources/.*\.rst\.txt$",
                r"/_sources/translations/"),
    ProseSource("llvm-15-doc", "rst", r"^usr/share/doc/llvm-15-doc/html/_sources/.*\.rst\.txt$",
                r"/_sources/AMDGPU/"),
    ProseSource("cmake-doc", "rst", r"^usr/share/doc/cmake-data/html/_sources/.*\.rst\.txt$"),
    ProseSource("docutils-doc", "rst", r"^usr/share/doc/docutils-doc/docs/.*\.txt$"),
    ProseSource("rust-doc", "html",
                r"^usr/share/doc/rust-doc/html/(book|reference|nomicon|rust-by-example|edition-guide|rustc|rustdoc|"
                r"embedded-book|cargo)/.*\.html$",
                r"/(print|toc|404)\.html$"),
    ProseSource("perl-doc", "pod", r"^usr/share/perl/[^/]+/pod/.*\.pod$"),
    ProseSource("postgresql-doc-15", "html", r"^usr/share/doc/postgresql-doc-15/html/.*\.html$"),
    ProseSource("exim4-doc-html", "html", r"^usr/share/doc/exim4-doc-html/spec_html/.*\.html$"),
    ProseSource("postfix-doc", "html", r"^usr/share/doc/postfix/html/.*\.html$"),
    ProseSource("bind9-doc", "html", r"^usr/share/doc/bind9-doc/arm/.*\.html$", _SPHINX_JUNK),
    ProseSource("gimp-help-en", "html", r"^usr/share/gimp/2\.0/help/en/.*\.html$"),
    ProseSource("libreoffice-help-en-us", "html", r"^usr/share/libreoffice/help/en-US/.*\.html$"),
    ProseSource("gnome-user-docs", "mallard", r"^usr/share/help/C/.*\.page$"),
    ProseSource("gnome-devel-docs", "mallard", r"^usr/share/help/C/.*\.page$"),
    ProseSource("gnucash-docs", "html", r"^usr/share/doc/gnucash-docs/gnucash-(guide|help)-en/.*\.html$"),
    ProseSource("lilypond-doc-html", "html", r"^usr/share/doc/lilypond/html/Documentation/.*\.html$",
                r"/Documentation/(internals|music-glossary|snippets)/"),
    ProseSource("wireshark-doc", "html", r"^usr/share/doc/wireshark/ws[ud]g_html_chunked/.*\.html$"),
    ProseSource("ffmpeg-doc", "html", r"^usr/share/doc/ffmpeg/(manual|developer-info)/.*\.html$"),
    ProseSource("apache2-doc", "html", r"^usr/share/doc/apache2-doc/manual/en/.*\.html$"),
    ProseSource("git-doc", "html", r"^usr/share/doc/git-doc/.*\.html$"),
    ProseSource("zsh-doc", "html", r"^usr/share/doc/zsh-common/html/.*\.html$"),
    ProseSource("sqlite3-doc", "html", r"^usr/share/doc/sqlite3/.*\.html$"),
    ProseSource("nodejs-doc", "text", r"^usr/share/doc/nodejs/api/.*\.md\.gz$", r"/all\.md\.gz$"),
    ProseSource("erlang-doc", "html", r"^usr/share/doc/erlang-doc/(doc/.*|lib/[^/]+/doc/html/[^/]+)\.html$"),
    ProseSource("racket-doc", "html", r"^usr/share/doc/racket/(guide|reference|more|quick|continue|style|ts-guide|"
                r"scribble|getting-started|htdp-langs|foreign|inside|web-server|datalog|db|net|json|math)/.*\.html$"),
    ProseSource("ghc-doc", "html", r"^usr/share/doc/ghc-doc/html/users_guide/.*\.html$", _SPHINX_JUNK),
    ProseSource("haskell98-report", "html", r"^usr/share/doc/haskell98-report/html/.*\.html$"),
    ProseSource("octave-doc", "html", r"^usr/share/doc/octave/octave\.html/.*\.html$"),
    ProseSource("maxima-doc", "html", r"^usr/share/doc/maxima-doc/html/.*\.html$"),
    ProseSource("r-doc-html", "html", r"^usr/share/R/doc/manual/.*\.html$"),
    ProseSource("gnuplot-doc", "html", r"^usr/share/doc/gnuplot/htmldocs/.*\.html$"),
    ProseSource("kicad-doc-en", "html", r"^usr/share/doc/kicad/help/en/.*\.html$"),
    # Python projects' documentation (user guides and API pages)
    ProseSource("python-django-doc", "html", r"^usr/share/doc/python-django-doc/html/.*\.html$", _SPHINX_JUNK),
    ProseSource("python-sqlalchemy-doc", "html", r"^usr/share/doc/python-sqlalchemy-doc/html/.*\.html$",
                _SPHINX_JUNK),
    ProseSource("python-flask-doc", "html", r"^usr/share/doc/python-flask-doc/html/.*\.html$", _SPHINX_JUNK),
    ProseSource("python-werkzeug-doc", "html", r"^usr/share/doc/python-werkzeug-doc/html/.*\.html$", _SPHINX_JUNK),
    ProseSource("python-jinja2-doc", "html", r"^usr/share/doc/python-jinja2-doc/html/.*\.html$", _SPHINX_JUNK),
    ProseSource("python-requests-doc", "html", r"^usr/share/doc/python-requests-doc/html/.*\.html$", _SPHINX_JUNK),
    ProseSource("python-setuptools-doc", "html", r"^usr/share/doc/python-setuptools-doc/html/.*\.html$",
                _SPHINX_JUNK),
    ProseSource("sphinx-doc", "html", r"^usr/share/doc/sphinx-doc/html/.*\.html$", _SPHINX_JUNK),
    ProseSource("python-sklearn-doc", "html", r"^usr/share/doc/python-sklearn-doc/html/.*\.html$",
                _SPHINX_JUNK + r"|/auto_examples/"),
    ProseSource("python-scipy-doc", "html", r"^usr/share/doc/python-scipy-doc/html/.*\.html$", _SPHINX_JUNK),
    ProseSource("python-pandas-doc", "html", r"^usr/share/doc/python-pandas-doc/html/.*\.html$", _SPHINX_JUNK),
    ProseSource("python-sympy-doc", "html", r"^usr/share/doc/python-sympy-doc/html/.*\.html$", _SPHINX_JUNK),
    ProseSource("python-statsmodels-doc", "html", r"^usr/share/doc/python-statsmodels-doc/html/.*\.html$",
                _SPHINX_JUNK),
    ProseSource("python-astropy-doc", "html", r"^usr/share/doc/python-astropy-doc/html/.*\.html$", _SPHINX_JUNK),
    ProseSource("python-dask-doc", "html", r"^usr/share/doc/python-dask-doc/html/.*\.html$", _SPHINX_JUNK),
    ProseSource("python-xarray-doc", "html", r"^usr/share/doc/python-xarray-doc/html/.*\.html$", _SPHINX_JUNK),
    # reference pages
    ProseSource("manpages", "man", r"^usr/share/man/man\d/.*\.gz$"),
    ProseSource("manpages-dev", "man", r"^usr/share/man/man\d/.*\.gz$"),
    ProseSource("libssl-doc", "man", r"^usr/share/man/man\d/.*\.gz$"),
)

# Code: what is dropped from a code root, and why (one table; counts per reason go to meta.json).
CODE_DROP_DIRS = frozenset({
    "__pycache__", ".git",
    "test", "tests", "idle_test", "testsuite",      # test suites: fixtures, generated cases, huge parametrizations
    "_vendor", "vendor", "vendored", "_vendored",   # copies of other projects (counted once, where they live)
    "site-packages", "dist-packages",               # under the stdlib root: a separate root, not stdlib
})
CODE_DROP_FILES = re.compile(r"^(test_.*|.*_test|conftest|.*_pb2)\.py$")  # tests, generated protobuf
CODE_MAX_BYTES = 1_000_000           # larger .py files are generated tables (unicode data, lexer maps)
CODE_LONG_LINE = 1000                # a line this long is data, not code ...
CODE_MAX_LONG_SHARE = 0.3            # ... and a file with more than this share of bytes in such lines is dropped

# Prose: what is kept.
PROSE_MIN_CHARS = 400                # index pages, stubs, redirects
PROSE_MIN_ENGLISH = 0.12             # textclean.english_score below this: not English (or a table/word list)
PROSE_MAX_DOC_CHARS = 100_000        # longer documents are cut at paragraph breaks (finer held-out sampling)

HELDOUT_FRACTION = {"prose": 0.04, "code": 0.03}
TOKENIZER_SAMPLE_CHARS = {"prose": 16_000_000, "code": 16_000_000}


class CorpusError(ValueError):
    """Bad input for a stage: says what is wrong and what to do."""


# ----------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def heldout_key(content_sha256: str) -> float:
    """The split rule: a document is held out when this number (its content hash read as a
    fraction in [0, 1)) is below the domain's held-out fraction. It depends only on the content,
    so every machine puts the same document in the same split, and duplicates fall together."""
    return int(content_sha256[:13], 16) / float(1 << 52)  # 52 bits: exact in a double, always < 1


def files_digest(entries: Iterable[tuple[str, int, str]]) -> str:
    """sha256 over the sorted ``(path, size, sha256)`` list of a source's files: the manifest's check."""
    h = hashlib.sha256()
    for path, size, digest in sorted(entries):
        h.update(f"{path}\t{size}\t{digest}\n".encode())
    return h.hexdigest()


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary handle on a temporary file beside ``path``, renamed to ``path`` when the block ends
    (removed if it raises): readers see the old file or the new one. (Not the package's
    ``jsonio.atomic_write_bytes``: importing the package loads torch, see above.)"""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as handle:
        handle.write(data)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def atomic_write_tokens(path: Path, arrays: list[np.ndarray]) -> int:
    n = 0
    with atomic_file(path) as handle:
        for arr in arrays:
            handle.write(np.ascontiguousarray(arr, dtype=DTYPE).tobytes())
            n += len(arr)
    return n


def split_long(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` into pieces of at most ``max_chars`` at paragraph breaks (else line breaks,
    else hard), so that a whole book does not fall into one split."""
    pieces = []
    while len(text) > max_chars:
        cut = text.rfind("\n\n", max_chars // 2, max_chars)
        if cut < 0:
            cut = text.rfind("\n", max_chars // 2, max_chars)
        if cut < 0:
            cut = max_chars
        pieces.append(text[:cut].strip("\n"))
        text = text[cut:].strip("\n")
    if text:
        pieces.append(text)
    return pieces


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------
# stage: prose
# ----------------------------------------------------------------------------------------


def _deb_path(debs: Path, package: str) -> Path | None:
    found = sorted(debs.glob(f"{package}_*.deb"))
    return found[-1] if found else None


def fetch_package(package: str, cache: Path) -> tuple[Path, str, str]:
    """``apt-get download`` (once, into ``cache/debs``) + ``dpkg-deb -x`` (once, into ``cache/x``).
    Returns (extracted root, version, sha256 of the .deb)."""
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    deb = _deb_path(debs, package)
    if deb is None:
        _log(f"  apt-get download {package}")
        result = subprocess.run(["apt-get", "download", package], cwd=debs, capture_output=True, text=True,
                                check=False)
        deb = _deb_path(debs, package)
        if result.returncode != 0 or deb is None:
            raise CorpusError(f"apt-get download {package} failed: {result.stderr.strip()[-500:]}. "
                              "Run 'apt-get update' first, or drop the package from PROSE_SOURCES")
    version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True,
                             check=True).stdout.strip()
    root = cache / "x" / f"{package}_{version}"
    if not (root / ".complete").exists():
        tmp = Path(tempfile.mkdtemp(dir=cache / "x" if (cache / "x").exists() else cache, prefix=".extract."))
        try:
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
            (tmp / ".complete").write_text(version)
            if root.exists():
                shutil.rmtree(root)
            root.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return root, version, sha256(deb.read_bytes())


def select_files(root: Path, include: str, exclude: str | None) -> list[str]:
    """Regular files (no symlinks) under ``root`` whose relative posix path matches, sorted."""
    inc, exc = re.compile(include), re.compile(exclude) if exclude else None
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        for name in filenames:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            full = Path(dirpath) / name
            if inc.search(rel) and not (exc and exc.search(rel)) and full.is_file() and not full.is_symlink():
                found.append(rel)
    return sorted(found)


def _convert_one(task: tuple[str, str, str]) -> tuple[str, int, str, str | None, str]:
    """(path, relative path, markup) -> (rel, size, sha256 of the file, text or None, why dropped)."""
    from sparsing_utils import textclean

    full, rel, markup = task
    raw = Path(full).read_bytes()
    size, digest = len(raw), sha256(raw)
    if full.endswith((".gz", ".dz")):  # .dz: dictzip, gzip-compatible
        raw = gzip.decompress(raw)
    try:
        source = raw.decode("utf-8")
    except UnicodeDecodeError:
        return rel, size, digest, None, "not_utf8"
    return rel, size, digest, textclean.to_text(source, markup), ""


@dataclass
class SourceReport:
    name: str
    kind: str
    version: str
    n_files: int = 0
    n_docs: int = 0
    n_chars: int = 0
    files_sha256: str = ""
    package_sha256: str = ""
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)

    def drop(self, why: str, n: int = 1) -> None:
        self.dropped[why] = self.dropped.get(why, 0) + n


def _keep_docs(report: SourceReport, rel: str, text: str, seen: set[str], out: list[dict]) -> None:
    from sparsing_utils import textclean

    if len(text) < PROSE_MIN_CHARS:
        report.drop("short")
        return
    if textclean.english_score(text) < PROSE_MIN_ENGLISH:
        report.drop("not_english")
        return
    pieces = split_long(text, PROSE_MAX_DOC_CHARS)
    for i, piece in enumerate(pieces):
        digest = sha256(piece.encode())
        if digest in seen:
            report.drop("duplicate")
            continue
        seen.add(digest)
        path = rel if len(pieces) == 1 else f"{rel}#{i:03d}"
        out.append({"source": report.name, "path": path, "text": piece})
        report.n_docs += 1
        report.n_chars += len(piece)


def _text_file(raw: bytes, path: Path) -> str:
    from sparsing_utils import textclean

    try:
        return textclean.to_text(raw.decode("utf-8"), "text")
    except UnicodeDecodeError as err:
        raise CorpusError(f"{path} is not UTF-8 text ({err})") from err


def gather_prose(sources: Iterable[ProseSource], text_files: Iterable[tuple[str, Path]], cache: Path,
                 workers: int) -> tuple[list[dict], list[SourceReport]]:
    docs: list[dict] = []
    reports: list[SourceReport] = []
    seen: set[str] = set()
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for src in sources:
            t0 = time.perf_counter()
            root, version, deb_sha = fetch_package(src.package, cache)
            rels = select_files(root, src.include, src.exclude)
            if not rels:
                raise CorpusError(f"{src.package} {version}: no file matches {src.include!r}; fix PROSE_SOURCES")
            report = SourceReport(src.package, "debian", version, n_files=len(rels), package_sha256=deb_sha)
            entries = []
            tasks = [(str(root / rel), rel, src.markup) for rel in rels]
            for rel, size, digest, text, why in pool.imap(_convert_one, tasks, chunksize=8):
                entries.append((rel, size, digest))
                if text is None:
                    report.drop(why)
                else:
                    _keep_docs(report, rel, text, seen, docs)
            report.files_sha256 = files_digest(entries)
            reports.append(report)
            _log(f"  {src.package} {version}: {report.n_files} files -> {report.n_docs} docs, "
                 f"{report.n_chars / 1e6:.1f} M chars, dropped {report.dropped} ({time.perf_counter() - t0:.0f} s)")
    for name, path in text_files:
        raw = path.read_bytes()
        report = SourceReport(name, "file", "", n_files=1)
        report.files_sha256 = files_digest([(path.name, len(raw), sha256(raw))])
        _keep_docs(report, path.name, _text_file(raw, path), seen, docs)
        reports.append(report)
        _log(f"  {name}: {report.n_docs} docs, {report.n_chars / 1e6:.1f} M chars")
    return docs, reports


def write_prose_archive(path: Path, docs: list[dict], reports: list[SourceReport], max_mib: float) -> dict:
    """One ``.jsonl.xz``: a header line (format, manifest, cleaning rules), then the documents."""
    header = {
        "format": PROSE_FORMAT,
        "n_docs": len(docs),
        "n_chars": sum(len(d["text"]) for d in docs),
        "sources": [dataclasses.asdict(r) for r in reports],
        "cleaning": {"min_chars": PROSE_MIN_CHARS, "min_english_score": PROSE_MIN_ENGLISH,
                     "max_doc_chars": PROSE_MAX_DOC_CHARS, "converters": "sparsing_utils/textclean.py",
                     "dedupe": "exact, sha256 of the cleaned text, first occurrence kept (sources in table order)"},
        "builder": {"script": "scripts/build_corpus.py", "version": BUILDER_VERSION},
    }
    raw = io.BytesIO()
    raw.write((json.dumps(header, ensure_ascii=False) + "\n").encode())
    for doc in docs:
        raw.write((json.dumps(doc, ensure_ascii=False) + "\n").encode())
    data = raw.getvalue()
    _log(f"  compressing {len(data) / 2**20:.1f} MiB (xz -9) ...")
    packed = lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=9)
    if len(packed) > max_mib * 2**20:
        by_size = sorted(reports, key=lambda r: -r.n_chars)[:8]
        raise CorpusError(
            f"the prose archive would be {len(packed) / 2**20:.1f} MiB, over --max-archive-mib {max_mib}; "
            "drop sources from PROSE_SOURCES (largest: "
            + ", ".join(f"{r.name} {r.n_chars / 1e6:.0f}M chars" for r in by_size) + ")")
    atomic_write_bytes(path, packed)
    return {"raw_bytes": len(data), "compressed_bytes": len(packed), **{k: header[k] for k in ("n_docs", "n_chars")}}


def read_prose_header(path: Path) -> dict:
    """The archive's header line (cheap: only the first line is decompressed)."""
    if not path.exists():
        raise CorpusError(f"prose archive {path} not found; build it with 'scripts/build_corpus.py prose' "
                          "(or pass --prose-archive)")
    try:
        with lzma.open(path, "rt", encoding="utf-8") as handle:
            first = handle.readline()
    except (lzma.LZMAError, EOFError) as err:
        raise CorpusError(f"prose archive {path} is not a readable .xz file ({err}); rebuild it") from err
    try:
        header = json.loads(first) if first.strip() else {}
    except json.JSONDecodeError:
        header = {}
    if header.get("format") != PROSE_FORMAT:
        raise CorpusError(f"prose archive {path} has no {PROSE_FORMAT!r} header line; rebuild it with the prose stage")
    if not header.get("n_docs"):
        raise CorpusError(f"prose archive {path} holds no documents; rebuild it with the prose stage")
    return header


def read_prose_docs(path: Path) -> Iterator[dict]:
    with lzma.open(path, "rt", encoding="utf-8") as handle:
        handle.readline()
        for line in handle:
            yield json.loads(line)


def stage_prose(args) -> None:
    t0 = time.perf_counter()
    text_files = []
    if not args.no_shakespeare:
        if not args.shakespeare.is_file():
            raise CorpusError(f"tinyshakespeare not found at {args.shakespeare}; pass --shakespeare PATH "
                              "or --no-shakespeare")
        text_files.append(("tinyshakespeare", args.shakespeare))
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise CorpusError(f"{tool} not found: the prose stage needs a Debian system (build the archive "
                              "there and carry it)")
    sources = [s for s in PROSE_SOURCES if not args.packages or s.package in args.packages]
    unknown = set(args.packages or ()) - {s.package for s in PROSE_SOURCES}
    if unknown:
        raise CorpusError(f"unknown packages {sorted(unknown)}; known: {[s.package for s in PROSE_SOURCES]}")
    docs, reports = gather_prose(sources, text_files, args.cache, args.workers)
    if not docs:
        raise CorpusError("no prose document survived the filters")
    stats = write_prose_archive(args.prose_archive, docs, reports, args.max_archive_mib)
    _log(f"prose: {stats['n_docs']} docs, {stats['n_chars'] / 1e6:.1f} M chars, raw {stats['raw_bytes'] / 2**20:.1f} "
         f"MiB, xz {stats['compressed_bytes'] / 2**20:.1f} MiB -> {args.prose_archive} "
         f"({time.perf_counter() - t0:.0f} s)")


# ----------------------------------------------------------------------------------------
# code roots
# ----------------------------------------------------------------------------------------


def default_code_roots() -> list[Path]:
    """The running interpreter's stdlib and site-packages (``sysconfig``), existing and distinct."""
    paths = sysconfig.get_paths()
    roots: list[Path] = []
    for key in ("stdlib", "purelib", "platlib"):
        p = Path(paths[key]).resolve()
        if p.is_dir() and p not in roots:
            roots.append(p)
    return roots


def list_code_files(root: Path) -> tuple[list[str], dict[str, int]]:
    """Sorted relative paths of the ``.py`` files of ``root`` minus the dropped folders/names."""
    found, dropped = [], {"test_or_vendored_dirs": 0, "test_or_generated_name": 0}
    for dirpath, dirnames, filenames in os.walk(root):
        kept = sorted(d for d in dirnames if d not in CODE_DROP_DIRS and not d.endswith((".dist-info", ".egg-info")))
        dropped["test_or_vendored_dirs"] += sum(d in CODE_DROP_DIRS for d in dirnames)
        dirnames[:] = kept
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        for name in filenames:
            if not name.endswith(".py"):
                continue
            if CODE_DROP_FILES.match(name):
                dropped["test_or_generated_name"] += 1
                continue
            found.append(name if rel_dir == "." else f"{rel_dir}/{name}")
    return sorted(found), dropped


def code_owners(root: Path) -> dict[str, tuple[str, str]]:
    """relative path -> (distribution name, version), from the RECORD files of the distributions in ``root``."""
    owners: dict[str, tuple[str, str]] = {}
    for dist in sorted(importlib.metadata.distributions(path=[str(root)]),
                       key=lambda d: (d.metadata["Name"] or "", d.version or "")):
        for f in dist.files or ():
            rel = Path(os.path.normpath(f)).as_posix()
            if rel.endswith(".py") and not rel.startswith(".."):
                owners.setdefault(rel, (dist.metadata["Name"], dist.version))
    return owners


def code_root_label(root: Path) -> str:
    paths = {k: Path(v).resolve() for k, v in sysconfig.get_paths().items() if k in ("stdlib", "purelib", "platlib")}
    for key, p in paths.items():
        if root == p:
            return "stdlib" if key == "stdlib" else "site-packages"
    return root.as_posix()


# ----------------------------------------------------------------------------------------
# tokenization workers
# ----------------------------------------------------------------------------------------

_TOKENIZER = None


def _init_worker(tokenizer_path: str) -> None:
    global _TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core does the parallelism
    from tokenizers import Tokenizer

    _TOKENIZER = text_encoder(Tokenizer.from_file(tokenizer_path))


def text_encoder(tok):
    """``tok`` set to read ``<|endoftext|>`` inside a document as plain text (Python sources that
    mention the string exist), so that the only EOS ids in a shard are document ends."""
    tok.encode_special_tokens = True
    return tok


def _encode(texts: list[str]) -> list[np.ndarray]:
    encode = getattr(_TOKENIZER, "encode_batch_fast", _TOKENIZER.encode_batch)
    return [np.asarray(e.ids, dtype=DTYPE) for e in encode(texts, add_special_tokens=False)]


def _code_check(raw: bytes) -> tuple[str | None, str]:
    """(text, "") or (None, why the file is dropped)."""
    if len(raw) > CODE_MAX_BYTES:
        return None, "too_large"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not_utf8"
    if not text.strip():
        return None, "empty"
    long_bytes = sum(len(line) for line in text.split("\n") if len(line) > CODE_LONG_LINE)
    if long_bytes > CODE_MAX_LONG_SHARE * len(text):
        return None, "long_lines"
    return text, ""


def _code_task(paths: list[str]) -> list[tuple[int, str, str, np.ndarray | None]]:
    """Read, check and tokenize code files -> (size, sha256, why dropped, tokens or None) per file."""
    out: list = []
    texts, slots = [], []
    for path in paths:
        try:
            raw = Path(path).read_bytes()
        except OSError:  # a dangling symlink, a file removed meanwhile, no permission
            out.append([0, "", "unreadable", None, 0])
            continue
        text, why = _code_check(raw)
        out.append([len(raw), sha256(raw), why, None, len(text) if text else 0])
        if text is not None:
            texts.append(text)
            slots.append(len(out) - 1)
    for slot, ids in zip(slots, _encode(texts)):
        out[slot][3] = ids
    return [tuple(x) for x in out]


def _prose_task(texts: list[str]) -> list[np.ndarray]:
    return _encode(texts)


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


# ----------------------------------------------------------------------------------------
# stage: shards
# ----------------------------------------------------------------------------------------


def load_tokenizer(path: Path):
    """A checked HF ``tokenizers.Tokenizer``: exists, has ``<|endoftext|>``, ids fit uint16."""
    from tokenizers import Tokenizer

    if not path.is_file():
        raise CorpusError(f"tokenizer {path} not found; train one with 'scripts/build_corpus.py tokenizer' "
                          "or pass --tokenizer data/tokenizer/tokenizer.json (committed)")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises plain Exception subclasses
        raise CorpusError(f"tokenizer {path} cannot be loaded ({err}); retrain it with the tokenizer stage") from err
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if vocab > MAX_VOCAB:
        raise CorpusError(f"tokenizer {path} has {vocab} tokens; shards are uint16, so at most {MAX_VOCAB}. "
                          "Train a smaller vocabulary (--vocab-size)")
    if tok.token_to_id(EOS) is None:
        raise CorpusError(f"tokenizer {path} has no {EOS!r} token; train it with this script")
    if not hasattr(tok, "encode_special_tokens"):
        raise CorpusError("tokenizers >= 0.19 is needed (Tokenizer.encode_special_tokens); upgrade it")
    return tok


def _check_code_roots(roots: list[Path]) -> list[Path]:
    out = []
    for root in roots:
        if not root.is_dir():
            raise CorpusError(f"code root {root} is not a directory; pass existing folders with --code-root "
                              "(default: this interpreter's stdlib and site-packages)")
        r = root.resolve()
        if r not in out:
            out.append(r)
    if not out:
        raise CorpusError("no code root; pass --code-root DIR")
    return out


def collect_code(roots: list[Path], pool, chunk: int) -> tuple[list[dict], list[dict], dict[str, int]]:
    """Tokenized, deduplicated code documents in sorted order (roots in the given order), the
    per-(root, distribution) manifest and the drop counts."""
    docs: list[dict] = []
    seen: set[str] = set()
    dropped: dict[str, int] = {}
    groups: dict[tuple[str, str], dict] = {}
    for root in roots:
        rels, skipped = list_code_files(root)
        for k, v in skipped.items():
            dropped[k] = dropped.get(k, 0) + v
        owners = code_owners(root)
        label = code_root_label(root)
        stdlib_version = ".".join(map(str, sys.version_info[:3])) if label == "stdlib" else ""
        tasks = [[str(root / rel) for rel in part] for part in _chunks(rels, chunk)]
        results = pool.imap(_code_task, tasks)
        for part, res in zip(_chunks(rels, chunk), results):
            for rel, (size, digest, why, ids, n_chars) in zip(part, res):
                if label == "stdlib":
                    name, version = "python-stdlib", stdlib_version
                else:
                    name, version = owners.get(rel, ("(no distribution)", ""))
                g = groups.setdefault((label, name), {"name": name, "kind": "python-code", "root": label,
                                                       "version": version, "n_files": 0, "n_docs": 0,
                                                       "n_chars": 0, "entries": []})
                g["n_files"] += 1
                g["entries"].append((rel, size, digest))
                if ids is None:
                    dropped[why] = dropped.get(why, 0) + 1
                    continue
                if digest in seen:
                    dropped["duplicate"] = dropped.get("duplicate", 0) + 1
                    continue
                seen.add(digest)
                g["n_docs"] += 1
                g["n_chars"] += n_chars
                docs.append({"sha256": digest, "ids": ids, "chars": n_chars})
    manifest = []
    for g in groups.values():
        g["files_sha256"] = files_digest(g.pop("entries"))
        manifest.append(g)
    return docs, manifest, dropped


def collect_prose(archive: Path, header: dict, pool, chunk: int) -> list[dict]:
    docs: list[dict] = []
    batch: list[str] = []
    pending = []

    def submit():
        pending.append((list(batch), pool.apply_async(_prose_task, (list(batch),))))
        batch.clear()

    for doc in read_prose_docs(archive):
        batch.append(doc["text"])
        if len(batch) >= chunk:
            submit()
    if batch:
        submit()
    for texts, res in pending:
        for text, ids in zip(texts, res.get()):
            docs.append({"sha256": sha256(text.encode()), "ids": ids, "chars": len(text)})
    if len(docs) != header["n_docs"]:
        raise CorpusError(f"prose archive {archive}: header says {header['n_docs']} documents, found {len(docs)}; "
                          "the file is truncated or corrupt, rebuild it")
    return docs


def split_docs(docs: list[dict], fraction: float, eos_id: int) -> dict[str, dict]:
    """Route each document by :func:`heldout_key`; EOS after every document."""
    eos = np.array([eos_id], dtype=DTYPE)
    out = {s: {"arrays": [], "tokens": 0, "docs": 0, "chars": 0} for s in ("train", "heldout")}
    for doc in docs:
        s = out["heldout" if heldout_key(doc["sha256"]) < fraction else "train"]
        s["arrays"] += [doc["ids"], eos]
        s["tokens"] += len(doc["ids"]) + 1
        s["docs"] += 1
        s["chars"] += doc["chars"]
    return out


def stage_shards(args) -> dict:
    t_start = time.perf_counter()
    # every check before any heavy work
    tok = load_tokenizer(args.tokenizer)
    header = read_prose_header(args.prose_archive)
    roots = _check_code_roots(args.code_root or default_code_roots())
    for name, frac in (("prose", args.heldout_prose), ("code", args.heldout_code)):
        if not 0.0 < frac < 0.5:
            raise CorpusError(f"--heldout-{name} {frac}: must be in (0, 0.5)")
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise CorpusError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # from here on the folder is incomplete until meta.json
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    eos_id = tok.token_to_id(EOS)
    timing: dict[str, float] = {}

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(args.workers, initializer=_init_worker, initargs=(str(args.tokenizer),)) as pool:
        t0 = time.perf_counter()
        prose_docs = collect_prose(args.prose_archive, header, pool, chunk=64)
        timing["prose_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        code_docs, code_manifest, code_dropped = collect_code(roots, pool, chunk=64)
        timing["code_s"] = time.perf_counter() - t0
    if not code_docs:
        raise CorpusError(f"no .py file survived the filters in {[str(r) for r in roots]}")

    t0 = time.perf_counter()
    splits = {"prose": split_docs(prose_docs, args.heldout_prose, eos_id),
              "code": split_docs(code_docs, args.heldout_code, eos_id)}
    for name in splits:
        if splits[name]["heldout"]["docs"] == 0:
            raise CorpusError(f"the held-out {name} split is empty; raise --heldout-{name}")
        if splits[name]["heldout"]["tokens"] < args.min_heldout_tokens:
            _log(f"WARNING: held-out {name} has {splits[name]['heldout']['tokens']:,} tokens, "
                 f"below --min-heldout-tokens {args.min_heldout_tokens:,}; raise --heldout-{name}")
    files = {}
    for domain, parts in splits.items():
        for split, part in parts.items():
            name = f"{split}_{domain}.bin"
            n = atomic_write_tokens(out / name, part["arrays"])
            assert n == part["tokens"]
            files[(split, domain)] = name
    atomic_write_bytes(out / "tokenizer.json", args.tokenizer.read_bytes())
    timing["write_s"] = time.perf_counter() - t0

    counts = {d: np.zeros(vocab_size, dtype=np.int64) for d in splits}
    for domain, parts in splits.items():
        for arr in parts["train"]["arrays"]:
            counts[domain] += np.bincount(arr, minlength=vocab_size)

    train_tokens = {d: splits[d]["train"]["tokens"] for d in splits}
    total_train = sum(train_tokens.values())
    meta = {
        "format": SHARDS_FORMAT,
        "tokenizer": "tokenizer.json",
        "tokenizer_sha256": sha256(args.tokenizer.read_bytes()),
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "pad_id": eos_id,
        "dtype": "uint16",
        "domains": {
            d: {"heldout_fraction": (args.heldout_prose if d == "prose" else args.heldout_code),
                "heldout_rule": "int(sha256(content).hexdigest()[:13], 16) / 2**52 < heldout_fraction",
                "docs": {s: splits[d][s]["docs"] for s in ("train", "heldout")},
                "chars": {s: splits[d][s]["chars"] for s in ("train", "heldout")},
                "tokens": {s: splits[d][s]["tokens"] for s in ("train", "heldout")},
                "chars_per_token": round(sum(splits[d][s]["chars"] for s in ("train", "heldout"))
                                         / max(1, sum(splits[d][s]["tokens"] for s in ("train", "heldout"))), 4)}
            for d in splits},
        "splits": {
            "train": {"files": [files[("train", d)] for d in splits], "tokens": total_train,
                      "tokens_by_domain": train_tokens},
            **{f"heldout_{d}": {"files": [files[("heldout", d)]], "tokens": splits[d]["heldout"]["tokens"],
                                "tokens_by_domain": {d: splits[d]["heldout"]["tokens"]}} for d in splits},
        },
        "sources": header["sources"] + code_manifest,
        "code_dropped": dict(sorted(code_dropped.items())),
        "unique_tokens": {
            "definition": "tokens of the deduplicated train split (EOS included); every document is there "
                          "once, so a run of T tokens makes T / total epochs",
            "total": total_train,
            "by_domain": train_tokens,
            "distinct_ids_used": int(np.count_nonzero(sum(counts.values()))),
            "distinct_ids_used_by_domain": {d: int(np.count_nonzero(c)) for d, c in counts.items()},
            "epochs_at": {f"{t / 1e9:g}B": round(t / total_train, 2) for t in (2e8, 5e8, 1e9, 2e9, 4e9)},
        },
        "builder": {
            "script": "scripts/build_corpus.py", "version": BUILDER_VERSION,
            "args": {"prose_archive_sha256": sha256(args.prose_archive.read_bytes()),
                     "code_roots": [str(r) for r in roots], "heldout_prose": args.heldout_prose,
                     "heldout_code": args.heldout_code, "code_drop_dirs": sorted(CODE_DROP_DIRS),
                     "code_drop_files": CODE_DROP_FILES.pattern, "code_max_bytes": CODE_MAX_BYTES,
                     "code_long_line": CODE_LONG_LINE, "code_max_long_share": CODE_MAX_LONG_SHARE},
            "python": ".".join(map(str, sys.version_info[:3])),
            "tokenizers": importlib.metadata.version("tokenizers"),
        },
    }
    timing["total_s"] = time.perf_counter() - t_start
    n_tok = sum(p["tokens"] for parts in splits.values() for p in parts.values())
    timing["tokens"] = n_tok
    timing["tokens_per_s_tokenize"] = n_tok / max(1e-9, timing["prose_s"] + timing["code_s"])
    timing["workers"] = args.workers
    atomic_write_json(out / "timing.json", timing)
    atomic_write_json(out / "meta.json", meta)  # last: the folder is complete
    _log(f"shards -> {out}: train {total_train:,} tokens ({train_tokens}), held-out prose "
         f"{splits['prose']['heldout']['tokens']:,}, code {splits['code']['heldout']['tokens']:,}; "
         f"{timing['total_s']:.1f} s, {timing['tokens_per_s_tokenize'] / 1e6:.2f} M tokens/s with {args.workers} workers")
    return meta


# ----------------------------------------------------------------------------------------
# stage: tokenizer (and the vocabulary study)
# ----------------------------------------------------------------------------------------


def tokenizer_sample(archive: Path, roots: list[Path], chars: dict[str, int],
                     heldout: dict[str, float]) -> dict[str, list[str]]:
    """Deterministic training sample per domain: TRAIN-split documents taken in order of their
    content hash (a fixed pseudo-random order) until the domain's character budget is met; long
    code files are cut to 20k chars so that no single file dominates."""
    by_domain: dict[str, list[tuple[str, str]]] = {"prose": [], "code": []}
    for doc in read_prose_docs(archive):
        digest = sha256(doc["text"].encode())
        if heldout_key(digest) >= heldout["prose"]:
            by_domain["prose"].append((digest, doc["text"]))
    seen = set()
    for root in roots:
        rels, _ = list_code_files(root)
        for rel in rels:
            try:
                raw = (root / rel).read_bytes()
            except OSError:
                continue
            text, _ = _code_check(raw)
            digest = sha256(raw)
            if text is None or digest in seen or heldout_key(digest) < heldout["code"]:
                continue
            seen.add(digest)
            by_domain["code"].append((digest, text[:20_000]))
    sample = {}
    for domain, items in by_domain.items():
        items.sort()
        taken, total = [], 0
        for _, text in items:
            if total >= chars[domain]:
                break
            taken.append(text)
            total += len(text)
        sample[domain] = taken
    return sample


def heldout_texts(archive: Path, roots: list[Path], heldout: dict[str, float], chars: int) -> dict[str, list[str]]:
    """Held-out documents (the first ``chars`` per domain in hash order) to measure chars/token on."""
    out: dict[str, list[tuple[str, str]]] = {"prose": [], "code": []}
    for doc in read_prose_docs(archive):
        digest = sha256(doc["text"].encode())
        if heldout_key(digest) < heldout["prose"]:
            out["prose"].append((digest, doc["text"]))
    for root in roots:
        for rel in list_code_files(root)[0]:
            try:
                raw = (root / rel).read_bytes()
            except OSError:
                continue
            text, _ = _code_check(raw)
            if text is not None and heldout_key(sha256(raw)) < heldout["code"]:
                out["code"].append((sha256(raw), text))
    result = {}
    for domain, items in out.items():
        items = sorted(set(items))
        taken, total = [], 0
        for _, text in items:
            if total >= chars:
                break
            taken.append(text)
            total += len(text)
        result[domain] = taken
    return result


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE (GPT-2 pre-tokenization regex, no prefix space, no normalization, so that
    decoding gives the exact text back), ``<|endoftext|>`` = id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not 256 + 1 < vocab_size <= MAX_VOCAB:
        raise CorpusError(f"--vocab-size {vocab_size}: must be in (257, {MAX_VOCAB}] (256 bytes + EOS; uint16 shards)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def chars_per_token(tok, texts: list[str]) -> float:
    tok = text_encoder(tok)
    n_tokens = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    return sum(map(len, texts)) / max(1, n_tokens)


def stage_tokenizer(args) -> None:
    t0 = time.perf_counter()
    read_prose_header(args.prose_archive)
    roots = _check_code_roots(args.code_root or default_code_roots())
    heldout = {"prose": args.heldout_prose, "code": args.heldout_code}
    sample = tokenizer_sample(args.prose_archive, roots, TOKENIZER_SAMPLE_CHARS if args.sample_chars is None
                              else {"prose": args.sample_chars, "code": args.sample_chars}, heldout)
    texts = sample["prose"] + sample["code"]
    tok = train_tokenizer(texts, args.vocab_size)
    atomic_write_bytes(args.tokenizer, tok.to_str().encode())
    evaluation = heldout_texts(args.prose_archive, roots, heldout, chars=2_000_000)
    cpt = {d: round(chars_per_token(tok, t), 3) for d, t in evaluation.items()}
    _log(f"tokenizer: vocab {tok.get_vocab_size()}, trained on {sum(map(len, sample['prose'])) / 1e6:.1f} M prose + "
         f"{sum(map(len, sample['code'])) / 1e6:.1f} M code chars; held-out chars/token {cpt} -> {args.tokenizer} "
         f"({time.perf_counter() - t0:.0f} s)")


def head_share(d_model: int, n_layers: int, vocab: int, tied: bool = True) -> dict[str, float]:
    """Share of the embedding / LM head in the parameters and forward FLOPs per token of a
    Llama-style model with d_ff = 8/3 d (SwiGLU, 3 matrices) and full attention (4 d^2): the
    non-embedding parameters are N = 12 d^2 L (norms neglected); the head costs 2 d V FLOPs per
    token against 2 N for the body (attention scores neglected)."""
    n_body = 12 * d_model * d_model * n_layers
    head = d_model * vocab
    params = n_body + head * (1 if tied else 2)
    return {"non_embedding_params": n_body, "head_params": head, "head_param_share": head * (1 if tied else 2) / params,
            "head_flop_share": head / (n_body + head)}


def stage_vocab(args) -> None:
    """Train the same sample at several vocabulary sizes; chars/token on held-out text per domain."""
    read_prose_header(args.prose_archive)
    roots = _check_code_roots(args.code_root or default_code_roots())
    heldout = {"prose": args.heldout_prose, "code": args.heldout_code}
    chars = TOKENIZER_SAMPLE_CHARS if args.sample_chars is None else {"prose": args.sample_chars,
                                                                        "code": args.sample_chars}
    sample = tokenizer_sample(args.prose_archive, roots, chars, heldout)
    evaluation = heldout_texts(args.prose_archive, roots, heldout, chars=2_000_000)
    rows = []
    for vocab in args.vocab_sizes:
        t0 = time.perf_counter()
        tok = train_tokenizer(sample["prose"] + sample["code"], vocab)
        row = {"vocab_size": vocab, "train_s": round(time.perf_counter() - t0, 1)}
        row.update({f"chars_per_token_{d}": round(chars_per_token(tok, t), 3) for d, t in evaluation.items()})
        rows.append(row)
        _log(f"  vocab {vocab}: {row}")
    shapes = [(128, 6), (192, 6), (256, 6), (256, 8), (320, 12), (320, 16)]
    table = []
    for d, n_layers in shapes:
        for row in rows:
            share = head_share(d, n_layers, row["vocab_size"])
            # FLOPs per character of text (prose), forward: (2N + 2dV) / (chars per token)
            flops_per_char = 2 * (share["non_embedding_params"] + share["head_params"]) / row["chars_per_token_prose"]
            table.append({"d_model": d, "n_layers": n_layers, "vocab_size": row["vocab_size"], **share,
                          "fwd_flops_per_prose_char": round(flops_per_char)})
    result = {"sample_chars": {d: sum(map(len, t)) for d, t in sample.items()},
              "eval_chars": {d: sum(map(len, t)) for d, t in evaluation.items()},
              "tokenizers": rows, "head_share": table,
              "command": "python scripts/build_corpus.py vocab --vocab-sizes " + " ".join(map(str, args.vocab_sizes))
              + ("" if args.sample_chars is None else f" --sample-chars {args.sample_chars}")}
    atomic_write_json(args.vocab_study, result)
    _log(f"vocab study -> {args.vocab_study}")


# ----------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("stage", choices=["prose", "tokenizer", "vocab", "shards", "all"])
    p.add_argument("--out", type=Path, default=DEFAULT_SHARDS, help="shards folder (default .corpus/shards)")
    p.add_argument("--prose-archive", type=Path, default=DEFAULT_PROSE_ARCHIVE)
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="downloaded .deb files and their extraction")
    p.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    p.add_argument("--code-root", type=Path, action="append",
                   help="a folder of .py files (repeatable); default: this interpreter's stdlib + site-packages")
    p.add_argument("--shakespeare", type=Path, default=DEFAULT_SHAKESPEARE)
    p.add_argument("--no-shakespeare", action="store_true")
    p.add_argument("--packages", nargs="*", help="only these Debian packages of PROSE_SOURCES (prose stage)")
    p.add_argument("--max-archive-mib", type=float, default=48.0)
    p.add_argument("--heldout-prose", type=float, default=HELDOUT_FRACTION["prose"])
    p.add_argument("--heldout-code", type=float, default=HELDOUT_FRACTION["code"])
    p.add_argument("--min-heldout-tokens", type=int, default=2_000_000)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--vocab-sizes", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    p.add_argument("--vocab-study", type=Path, default=DEFAULT_VOCAB_STUDY)
    p.add_argument("--sample-chars", type=int, default=None, help="tokenizer training chars per domain")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stages = ["prose", "tokenizer", "shards"] if args.stage == "all" else [args.stage]
    run = {"prose": stage_prose, "tokenizer": stage_tokenizer, "vocab": stage_vocab, "shards": stage_shards}
    try:
        for stage in stages:
            _log(f"== {stage}")
            run[stage](args)
    except CorpusError as err:
        print(f"build_corpus: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
