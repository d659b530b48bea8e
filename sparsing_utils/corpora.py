"""Text sources -> deterministic fixed-length token blocks.

Sources (:func:`load_text`)
---------------------------
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

Blocks (:func:`make_blocks`, :func:`blocks_from_text`)
------------------------------------------------------
The text is tokenized without special tokens into one token stream, which is cut into
consecutive, non-overlapping ``block_len`` pieces (no padding, no BOS). ``tokens`` is the token
budget: ``tokens // block_len`` blocks are taken (rounded *down*; at least one block is
required). ``split="calibration"`` uses the first ``calibration_fraction`` of the stream,
``split="evaluation"`` the rest, so thresholds calibrated on one split are measured on disjoint
text; ``split="all"`` uses the whole stream from its start (it is then the only split that can
stop reading the source early).

Tokenization runs in chunks of about 32k characters cut just after a newline that starts an
unindented line (so chunk starts never split a word or a whitespace run). The chunk grid
depends only on the text, so a longer read of the same source gives the same leading tokens.
For byte-level BPE tokenizers (GPT-2, Llama-3, SmolLM2) the result equals tokenizing the whole
text at once; SentencePiece tokenizers may differ by a prefix-space token at chunk starts.
"""
from __future__ import annotations

import bz2
import collections
import dataclasses
import gzip
import itertools
import json
import lzma
import operator
import os
import re
import sys
import sysconfig
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from .models import HubUnreachableError, hub_offline

__all__ = [
    "BUILTIN_SOURCES",
    "HF_DEFAULT_MAX_CHARS",
    "MissingDependencyError",
    "SourceNotFoundError",
    "TokenBlocks",
    "UnknownSourceError",
    "blocks_from_text",
    "load_text",
    "make_blocks",
    "stdlib_files",
    "tokenize_text",
]

BUILTIN_SOURCES: dict[str, str] = {
    "pydoc": "English prose: Python's documentation topics (pydoc_data.topics), joined in sorted key order",
    "stdlib": "Python code: the standard library's .py sources (sorted paths, tests and site-packages excluded)",
}

HF_DEFAULT_MAX_CHARS = 20_000_000
SPLITS = ("all", "calibration", "evaluation")
_HF_SPLIT_NAMES = {"train", "validation", "valid", "dev", "test"}
_STDLIB_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_CHUNK_CHARS = 1 << 15
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


# --------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------


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
        import datasets  # noqa: F401  (optional dependency)
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


def _looks_like_path(spec: str) -> bool:
    return (
        "/" in spec
        or "\\" in spec
        or spec.startswith((".", "~"))
        or Path(spec).suffix.lower() in {".txt", ".jsonl", ".json", ".ndjson", ".gz", ".bz2", ".xz", ".raw", ".tokens", ".md"}
    )


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
    if _looks_like_path(spec):
        raise SourceNotFoundError(f"text file {spec!r} not found (resolved to {path.absolute()}); accepted: {_accepted()}")
    shown = spec if len(spec) <= 80 else spec[:77] + "..."
    hint = " (to cut a raw string into blocks, call blocks_from_text)" if any(c.isspace() for c in spec) else ""
    raise UnknownSourceError(f"unknown text source {shown!r}; accepted: {_accepted()}{hint}")


# --------------------------------------------------------------------------------------
# tokenization
# --------------------------------------------------------------------------------------

# Chunk cuts that no byte-level BPE pre-tokenizer regex (GPT-2, Llama-3, Qwen2) merges across:
# after a newline that follows a non-space and precedes an (optionally single-space-indented)
# non-space; failing that, between a non-space and a following space or tab.
_CUTS = (re.compile(r"\S\n(?= ?\S)"), re.compile(r"\S(?=[ \t])"))


def _cut(text: str, lo: int, limit: int) -> int:
    """The last preferred cut in ``(lo, limit]``; reads at most ``text[lo : limit + 2]``."""
    for pattern in _CUTS:
        best = None
        for match in pattern.finditer(text, lo, limit + 2):
            if match.end() > limit:
                break
            best = match.end()
        if best is not None:
            return best
    return limit


def _chunks(text: str, complete: bool) -> list[str]:
    """Deterministic chunk grid; an undetermined tail is dropped when the text is not complete.

    Each cut depends only on ``text[start : start + _CHUNK_CHARS + 2]``, so a prefix of a longer
    text has the same chunks as long as that window lies inside the prefix.
    """
    out, start, n = [], 0, len(text)
    while start < n:
        limit = start + _CHUNK_CHARS
        if complete and limit >= n:
            out.append(text[start:])
            break
        if not complete and limit + 2 > n:
            break
        cut = _cut(text, start + _CHUNK_CHARS // 2, limit)
        out.append(text[start:cut])
        start = cut
    return out


def _encode(tokenizer: Any, chunks: list[str]) -> list[int]:
    if not chunks:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        # the Rust tokenizer directly, without offsets: same ids as tokenizer(...), ~2x faster
        encodings = backend.encode_batch_fast(chunks, add_special_tokens=False)
        return list(itertools.chain.from_iterable(e.ids for e in encodings))
    try:
        encoded = tokenizer(chunks, add_special_tokens=False, verbose=False)
    except TypeError:  # tokenizers without a verbose switch
        encoded = tokenizer(chunks, add_special_tokens=False)
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return list(itertools.chain.from_iterable(ids))


def tokenize_text(tokenizer: Any, text: str, *, complete: bool = True) -> torch.Tensor:
    """Token ids of ``text`` (no special tokens) as a 1-D LongTensor, tokenized in chunks.

    ``complete=False`` means ``text`` is a prefix of a longer text: the last, undetermined
    chunk is left out so the ids are a prefix of the ids of the full text.
    """
    return torch.tensor(_encode(tokenizer, _chunks(text, complete)), dtype=torch.long)


# --------------------------------------------------------------------------------------
# blocks
# --------------------------------------------------------------------------------------


@dataclass
class TokenBlocks:
    """Fixed-length token blocks: ``input_ids`` and ``attention_mask`` are ``[n_blocks, block_len]``.

    ``attention_mask`` is 1 for real tokens, 0 for padding (blocks made here have none).
    ``offset`` is the position in the source's token stream where the (first) block starts;
    ``block_index`` lists the block positions in the split when blocks were sampled
    (``shuffle=True``), else it is ``None`` and the blocks are consecutive from ``offset``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    source: str
    n_tokens: int
    block_len: int
    offset: int = 0
    description: str = ""
    split: str = "all"
    calibration_fraction: float | None = None
    stream_tokens: int | None = None  # tokens in the split's stream, when the whole source was read
    seed: int = 0
    shuffle: bool = False
    tokenizer: str = ""
    block_index: list[int] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2 or self.input_ids.shape != self.attention_mask.shape:
            raise ValueError(
                f"input_ids and attention_mask must be 2-D of one shape, got {tuple(self.input_ids.shape)} "
                f"and {tuple(self.attention_mask.shape)}"
            )

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_blocks(self) -> int:
        return len(self)

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def to(self, device: str | torch.device) -> "TokenBlocks":
        """A copy with the tensors on ``device``."""
        return dataclasses.replace(self, input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device))

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(input_ids, attention_mask)`` slices of at most ``batch_size`` blocks, in order."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        for start in range(0, len(self), batch_size):
            yield self.input_ids[start : start + batch_size], self.attention_mask[start : start + batch_size]

    def to_dict(self) -> dict[str, Any]:
        """Metadata for results (JSON-friendly, no tensors)."""
        return {
            "source": self.source,
            "description": self.description,
            "tokenizer": self.tokenizer,
            "split": self.split,
            "calibration_fraction": self.calibration_fraction,
            "n_blocks": len(self),
            "block_len": self.block_len,
            "n_tokens": self.n_tokens,
            "offset": self.offset,
            "stream_tokens": self.stream_tokens,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "block_index": self.block_index,
        }


def _as_int(value: Any, name: str) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _check_args(tokens: int, block_len: int, split: str, calibration_fraction: float) -> tuple[int, int, int]:
    block_len, tokens = _as_int(block_len, "block_len"), _as_int(tokens, "tokens")
    if block_len < 2:
        raise ValueError(f"block_len must be an integer of at least 2 (a next-token loss needs two tokens), got {block_len!r}")
    if tokens < block_len:
        raise ValueError(
            f"tokens={tokens!r} is smaller than block_len={block_len}: the budget must hold at least one block; "
            f"raise --tokens or lower --block-len"
        )
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 < float(calibration_fraction) < 1.0:
        raise ValueError(f"calibration_fraction must be in (0, 1), got {calibration_fraction!r}")
    return tokens, block_len, tokens // block_len


def _tokenizer_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def _blocks_from_stream(
    ids: torch.Tensor,
    *,
    complete: bool,
    n_blocks: int,
    block_len: int,
    tokens: int,
    split: str,
    calibration_fraction: float,
    seed: int,
    shuffle: bool,
    source: str,
    description: str,
    tokenizer: Any,
) -> TokenBlocks:
    total = int(ids.numel())
    if split == "all":
        start, stop = 0, total
    else:
        cut = int(total * calibration_fraction)
        start, stop = (0, cut) if split == "calibration" else (cut, total)
    available = stop - start
    where = "" if split == "all" else f" in the {split} split ({calibration_fraction:g} of {total:,} tokens)"
    if available < block_len:
        raise ValueError(
            f"text has {available:,} tokens{where}, need at least block_len={block_len}; "
            f"lower --block-len or use a longer source"
        )
    n_available = available // block_len
    if n_blocks > n_available:
        raise ValueError(
            f"asked for {tokens:,} tokens ({n_blocks} blocks of {block_len}) but the source has only "
            f"{available:,} (split {split}): lower --tokens or use a longer source"
        )
    grid = ids[start : start + n_available * block_len].view(n_available, block_len)
    if shuffle:
        gen = torch.Generator().manual_seed(int(seed))
        index = torch.randperm(n_available, generator=gen)[:n_blocks].sort().values
        chosen = grid[index].clone()
        block_index = [int(i) for i in index]
    else:
        chosen = grid[:n_blocks].clone()
        block_index = None
    return TokenBlocks(
        input_ids=chosen,
        attention_mask=torch.ones_like(chosen),
        source=source,
        n_tokens=int(chosen.numel()),
        block_len=block_len,
        offset=start,
        description=description,
        split=split,
        calibration_fraction=None if split == "all" else float(calibration_fraction),
        stream_tokens=available if complete else None,
        seed=int(seed),
        shuffle=bool(shuffle),
        tokenizer=_tokenizer_name(tokenizer),
        block_index=block_index,
    )


def _check_text(text: str, source: str) -> None:
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"text source {source!r} is empty (no non-whitespace characters): pass a non-empty text")


def blocks_from_text(
    tokenizer: Any,
    text: str,
    *,
    tokens: int,
    block_len: int = 512,
    split: str = "all",
    calibration_fraction: float = 0.5,
    seed: int = 0,
    shuffle: bool = False,
    source: str = "text",
    description: str = "",
) -> TokenBlocks:
    """Blocks from a raw string (see :func:`make_blocks` for the arguments)."""
    tokens, block_len, n_blocks = _check_args(tokens, block_len, split, calibration_fraction)
    _check_text(text, source)
    ids = tokenize_text(tokenizer, text)
    return _blocks_from_stream(
        ids,
        complete=True,
        n_blocks=n_blocks,
        block_len=block_len,
        tokens=tokens,
        split=split,
        calibration_fraction=calibration_fraction,
        seed=seed,
        shuffle=shuffle,
        source=source,
        description=description or f"raw text ({len(text):,} chars)",
        tokenizer=tokenizer,
    )


# The splits need the whole source tokenized (the full stdlib takes ~10 s); remember the last
# two complete streams so calibration and evaluation blocks of one source tokenize it once.
_STREAM_CACHE: "collections.OrderedDict[tuple, tuple[weakref.ref, torch.Tensor, str]]" = collections.OrderedDict()
_STREAM_CACHE_SIZE = 2


def _stream_key(tokenizer: Any, spec: str, text_field: str, max_chars: int | None) -> tuple | None:
    if spec.startswith("hf:"):
        return None  # remote data may change; not cached
    stamp: tuple = ()
    if spec not in BUILTIN_SOURCES:
        try:
            st = Path(spec).expanduser().stat()
        except OSError:
            return None
        stamp = (str(Path(spec).expanduser().resolve()), st.st_size, st.st_mtime_ns)
    try:
        size = len(tokenizer)
    except TypeError:
        size = None
    return (id(tokenizer), _tokenizer_name(tokenizer), size, spec, stamp, text_field, max_chars)


def _stream_cache_get(tokenizer: Any, spec: str, text_field: str, max_chars: int | None):
    key = _stream_key(tokenizer, spec, text_field, max_chars)
    entry = _STREAM_CACHE.get(key) if key is not None else None
    if entry is None or entry[0]() is not tokenizer:
        return None
    _STREAM_CACHE.move_to_end(key)
    return entry[1], entry[2]


def _stream_cache_put(tokenizer: Any, spec: str, text_field: str, max_chars: int | None, ids, description) -> None:
    key = _stream_key(tokenizer, spec, text_field, max_chars)
    if key is None:
        return
    try:
        ref = weakref.ref(tokenizer)
    except TypeError:
        return
    _STREAM_CACHE[key] = (ref, ids, description)
    _STREAM_CACHE.move_to_end(key)
    while len(_STREAM_CACHE) > _STREAM_CACHE_SIZE:
        _STREAM_CACHE.popitem(last=False)


def make_blocks(
    tokenizer: Any,
    source_or_text: str | os.PathLike,
    *,
    tokens: int,
    block_len: int = 512,
    split: str = "all",
    calibration_fraction: float = 0.5,
    seed: int = 0,
    shuffle: bool = False,
    text_field: str = "text",
    max_chars: int | None = None,
) -> TokenBlocks:
    """Deterministic fixed-length token blocks from a text source.

    Args:
        tokenizer: a Hugging Face tokenizer (called with ``add_special_tokens=False``).
        source_or_text: a source spec for :func:`load_text` (built-in name, file path, ``hf:...``);
            for a raw string use :func:`blocks_from_text`.
        tokens: token budget; ``tokens // block_len`` blocks are taken (rounded down, >= 1).
        block_len: tokens per block (>= 2).
        split: ``"all"`` (the stream from its start), ``"calibration"`` (the first
            ``calibration_fraction`` of the stream) or ``"evaluation"`` (the rest).
        calibration_fraction: where the stream is cut for the two splits, in (0, 1).
        seed: used only with ``shuffle=True``; recorded in the metadata.
        shuffle: sample ``tokens // block_len`` blocks at random (seeded, kept in stream order)
            from the split's block grid instead of taking the first ones.
        text_field: the field read from ``.jsonl``/``.json``/``hf:`` records.
        max_chars: read at most this many characters of the source (bounds ``stdlib``/``hf:``).

    With ``split="all"`` and ``shuffle=False`` only as much of the source is read and tokenized
    as the budget needs; the splits need the whole source (the cut depends on its length).
    """
    tokens, block_len, n_blocks = _check_args(tokens, block_len, split, calibration_fraction)
    spec = os.fspath(source_or_text)
    lazy = split == "all" and not shuffle
    need = n_blocks * block_len
    budget = None
    if lazy:
        budget = max(need * 8, 4 * _CHUNK_CHARS)  # generous chars-per-token guess, grown if short
        if max_chars is not None:
            budget = min(budget, max_chars)
    cached = None if lazy else _stream_cache_get(tokenizer, spec, text_field, max_chars)
    if cached is not None:
        ids, description = cached
        complete = True
    else:
        while True:
            limit = budget if lazy else max_chars
            text, description = load_text(spec, text_field=text_field, max_chars=limit)
            _check_text(text, spec)
            complete = limit is None or len(text) < limit or (max_chars is not None and limit >= max_chars)
            ids = tokenize_text(tokenizer, text, complete=complete)
            if complete or ids.numel() >= need:
                break
            budget *= 4
            if max_chars is not None:
                budget = min(budget, max_chars)
        if not lazy:
            _stream_cache_put(tokenizer, spec, text_field, max_chars, ids, description)
    return _blocks_from_stream(
        ids,
        complete=complete,
        n_blocks=n_blocks,
        block_len=block_len,
        tokens=tokens,
        split=split,
        calibration_fraction=calibration_fraction,
        seed=seed,
        shuffle=shuffle,
        source=spec,
        description=description,
        tokenizer=tokenizer,
    )
