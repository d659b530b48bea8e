"""Text sources: a spec string -> ``(text, description)`` (:func:`load_text`).

``"pydoc"``
    English prose, offline: the documentation topics shipped with Python
    (``pydoc_data.topics.topics``), joined in sorted key order (~465k chars, ~113k SmolLM2 tokens).
``"stdlib"``
    Python code, offline: the standard library's ``.py`` files (sorted relative paths; folders
    named ``test``/``tests``/``idle_test`` and ``site-packages`` excluded), concatenated; read
    lazily, only as many files as the request needs (~12 MB in all).
a local file
    ``.jsonl``/``.ndjson`` (one JSON object per line; the ``text_field`` of each record, records
    joined by a blank line), ``.json`` (a list of such records), anything else read as UTF-8
    text. ``.gz``/``.bz2``/``.xz`` compressed files are read transparently.
``"hf:NAME[:CONFIG][:SPLIT]"``
    a Hugging Face dataset, streamed (needs ``pip install datasets`` and the network). With
    one suffix it is read as the split when it is a usual split name (train, validation,
    valid, dev, test), else as the config. Without a split: test, then validation, then train.
    At most :data:`HF_DEFAULT_MAX_CHARS` characters are read unless ``max_chars`` says otherwise.

Token blocks are cut from these texts in :mod:`sparsing_utils.blocks`.
"""
from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import sys
import sysconfig
from pathlib import Path
from typing import Any

from .hub import HubUnreachableError, hub_offline, looks_like_path

__all__ = [
    "BUILTIN_SOURCES",
    "HF_DEFAULT_MAX_CHARS",
    "MissingDependencyError",
    "SourceNotFoundError",
    "UnknownSourceError",
    "load_text",
    "stdlib_files",
]

BUILTIN_SOURCES: dict[str, str] = {
    "pydoc": "English prose: Python's documentation topics (pydoc_data.topics), joined in sorted key order",
    "stdlib": "Python code: the standard library's .py sources (sorted paths, tests and site-packages excluded)",
}

HF_DEFAULT_MAX_CHARS = 20_000_000
_HF_SPLIT_NAMES = {"train", "validation", "valid", "dev", "test"}
_STDLIB_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
# File types read as text sources (a missing spec ending in one of them is a missing file).
_TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".ndjson", ".gz", ".bz2", ".xz", ".raw", ".tokens", ".md")
_ACCEPTED_FORMS = (
    "a built-in name ({names}), a path to a local .txt/.jsonl file (also .json, .gz/.bz2/.xz), "
    "or hf:NAME[:CONFIG][:SPLIT] for a Hugging Face dataset (online)"
)


class UnknownSourceError(ValueError):
    """A text source that is neither built in, nor a file, nor ``hf:...``."""


class SourceNotFoundError(FileNotFoundError, ValueError):
    """A path-like text source that does not exist (a ``FileNotFoundError`` and a ``ValueError``)."""


class MissingDependencyError(ImportError, ValueError):
    """An optional package is needed (an ``ImportError`` and a ``ValueError``)."""


def _accepted() -> str:
    return _ACCEPTED_FORMS.format(names=", ".join(sorted(BUILTIN_SOURCES)))


def _python_version() -> str:
    return ".".join(map(str, sys.version_info[:3]))


def _pydoc(max_chars: int | None) -> tuple[str, str]:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    full = len(text)
    if max_chars is not None:
        text = text[:max_chars]
    cut = "" if len(text) == full else f", first {len(text):,} of {full:,} chars"
    return text, f"pydoc: English prose, Python {_python_version()} pydoc_data.topics ({len(topics)} topics{cut})"


def stdlib_files() -> list[Path]:
    """The standard library ``.py`` files in the order the ``"stdlib"`` source reads them."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_EXCLUDED_DIRS]
        rel = Path(dirpath).relative_to(root)
        found += [(rel / name).as_posix() for name in filenames if name.endswith(".py")]
    return [root / rel for rel in sorted(found)]


def _stdlib(max_chars: int | None) -> tuple[str, str]:
    files = stdlib_files()
    parts: list[str] = []
    total = used = 0
    for path in files:
        if max_chars is not None and total >= max_chars:
            break
        piece = path.read_text(encoding="utf-8", errors="replace")
        if parts:
            piece = "\n\n" + piece
        parts.append(piece)
        total += len(piece)
        used += 1
    text = "".join(parts)
    if max_chars is not None:
        text = text[:max_chars]
    return text, (
        f"stdlib: Python code, Python {_python_version()} standard library sources "
        f"({used} of {len(files)} files, {len(text):,} chars)"
    )


def _open_text(path: Path):
    suffix = path.suffix.lower()
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(suffix, open)
    return opener(path, "rt", encoding="utf-8")  # universal newlines: CRLF -> \n


def _inner_suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in {".gz", ".bz2", ".xz"}:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _record_text(record: Any, text_field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise ValueError(f"{where} is a JSON {type(record).__name__}, not an object with a {text_field!r} field")
    if text_field not in record:
        raise ValueError(
            f"{where} has no field {text_field!r}; fields found: {sorted(record)}. "
            f"Pass text_field=<one of them> (--text-field)"
        )
    value = record[text_field]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {text_field!r} is a {type(value).__name__}, not a string")
    return value


def _read_file(path: Path, text_field: str, max_chars: int | None) -> tuple[str, str]:
    kind = _inner_suffix(path)
    try:
        with _open_text(path) as handle:
            if kind in {".jsonl", ".ndjson"}:
                texts, total, n = [], 0, 0
                for lineno, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}: line {lineno} is not valid JSON ({err})") from err
                    piece = _record_text(record, text_field, f"{path}: record on line {lineno}")
                    texts.append(piece)
                    n += 1
                    total += len(piece) + 2
                    if max_chars is not None and total >= max_chars:
                        break
                text = "\n\n".join(texts)
                detail = f"field {text_field!r} of {n:,} records"
            elif kind == ".json":
                data = json.load(handle)
                records = data if isinstance(data, list) else [data]
                text = "\n\n".join(
                    _record_text(rec, text_field, f"{path}: record {i}") for i, rec in enumerate(records, 1)
                )
                detail = f"field {text_field!r} of {len(records):,} records"
            else:
                text = handle.read() if max_chars is None else handle.read(max_chars)
                detail = "text"
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err}); convert it to UTF-8 first") from err
    if max_chars is not None:
        text = text[:max_chars]
    return text, f"{path.name}: {path} ({detail}, {len(text):,} chars)"


def _parse_hf(spec: str) -> tuple[str, str | None, str | None]:
    parts = spec[len("hf:"):].split(":")
    if not parts[0]:
        raise ValueError(f"{spec!r}: missing dataset name; use hf:NAME[:CONFIG][:SPLIT], e.g. hf:wikitext:wikitext-2-raw-v1:test")
    if len(parts) > 3:
        raise ValueError(f"{spec!r}: too many ':' parts; use hf:NAME[:CONFIG][:SPLIT]")
    name = parts[0]
    config = split = None
    if len(parts) == 2:
        if parts[1].lower() in _HF_SPLIT_NAMES:
            split = parts[1]
        else:
            config = parts[1]
    elif len(parts) == 3:
        config, split = parts[1] or None, parts[2] or None
    return name, config, split


def _load_hf(spec: str, text_field: str, max_chars: int | None) -> tuple[str, str]:
    name, config, split = _parse_hf(spec)
    if hub_offline():
        raise HubUnreachableError(
            f"cannot load Hugging Face dataset {name!r}: the hub is unreachable (offline mode, HF_HUB_OFFLINE=1). "
            f"Pass a built-in source ({', '.join(sorted(BUILTIN_SOURCES))}) or a local .txt/.jsonl file instead"
        )
    try:
        import datasets  # optional dependency
    except ImportError as err:
        raise MissingDependencyError(
            f"{spec!r} needs the `datasets` package: `pip install datasets` (or pass a built-in source "
            f"({', '.join(sorted(BUILTIN_SOURCES))}) or a local .txt/.jsonl file)"
        ) from err
    limit = HF_DEFAULT_MAX_CHARS if max_chars is None else max_chars
    try:
        loaded = datasets.load_dataset(name, config, split=split, streaming=True)
        if split is None:
            keys = list(loaded.keys())
            split = next((k for k in ("test", "validation", "train") if k in keys), sorted(keys)[0] if keys else None)
            if split is None:
                raise ValueError(f"dataset {name!r} has no splits")
            loaded = loaded[split]
        texts, total, n = [], 0, 0
        for record in loaded:
            piece = _record_text(record, text_field, f"{spec}: record {n + 1}")
            texts.append(piece)
            n += 1
            total += len(piece) + 2
            if total >= limit:
                break
    except (ValueError, HubUnreachableError):
        raise
    except Exception as err:
        raise ValueError(
            f"could not load Hugging Face dataset {name!r} (config {config!r}, split {split!r}): "
            f"{type(err).__name__}: {err}. If the hub is unreachable, pass a built-in source "
            f"({', '.join(sorted(BUILTIN_SOURCES))}) or a local .txt/.jsonl file"
        ) from err
    text = "\n\n".join(texts)[:limit]
    label = ":".join(p for p in (name, config, split) if p)
    return text, f"hf:{label}: Hugging Face dataset, field {text_field!r} of {n:,} records ({len(text):,} chars)"


def load_text(
    source: str | os.PathLike, *, text_field: str = "text", max_chars: int | None = None
) -> tuple[str, str]:
    """Read a text source; return ``(text, description)``.

    ``max_chars`` truncates the text (and lets ``"stdlib"``/``hf:`` stop reading early).
    Raises :class:`UnknownSourceError` (a ``ValueError``) for an unknown name,
    :class:`SourceNotFoundError` (``FileNotFoundError`` and ``ValueError``) for a missing file.
    """
    if max_chars is not None and (not isinstance(max_chars, int) or max_chars < 1):
        raise ValueError(f"max_chars must be a positive integer or None, got {max_chars!r}")
    spec = os.fspath(source)
    if not isinstance(spec, str):
        raise TypeError(f"source must be a string or path, got {type(source).__name__}")
    if spec in BUILTIN_SOURCES:
        return _pydoc(max_chars) if spec == "pydoc" else _stdlib(max_chars)
    if spec.startswith("hf:"):
        return _load_hf(spec, text_field, max_chars)
    path = Path(spec).expanduser()
    if path.is_file():
        return _read_file(path, text_field, max_chars)
    if path.exists():
        raise ValueError(f"text source {spec!r} is a folder, not a file; accepted: {_accepted()}")
    if looks_like_path(spec, _TEXT_SUFFIXES):
        raise SourceNotFoundError(f"text file {spec!r} not found (resolved to {path.absolute()}); accepted: {_accepted()}")
    shown = spec if len(spec) <= 80 else spec[:77] + "..."
    hint = " (to cut a raw string into blocks, call blocks_from_text)" if any(c.isspace() for c in spec) else ""
    raise UnknownSourceError(f"unknown text source {shown!r}; accepted: {_accepted()}{hint}")
