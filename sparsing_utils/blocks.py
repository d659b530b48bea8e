"""Token blocks: a text source -> deterministic fixed-length token blocks (:func:`make_blocks`).

The text (from :func:`~sparsing_utils.sources.load_text`, or a raw string for
:func:`blocks_from_text`) is tokenized without special tokens into one token stream, which is
cut into consecutive, non-overlapping ``block_len`` pieces (no padding, no BOS). ``tokens`` is
the token budget: ``tokens // block_len`` blocks are taken (rounded *down*; at least one block
is required). ``split="calibration"`` uses the first ``calibration_fraction`` of the stream,
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

import collections
import dataclasses
import itertools
import operator
import os
import re
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .sources import BUILTIN_SOURCES, load_text

__all__ = [
    "SPLITS",
    "TokenBlocks",
    "blocks_from_text",
    "make_blocks",
    "tokenize_text",
]

SPLITS = ("all", "calibration", "evaluation")
_CHUNK_CHARS = 1 << 15


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

    def to(self, device: str | torch.device) -> TokenBlocks:
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


@dataclass(frozen=True)
class _BlockPlan:
    """How blocks are cut from a token stream: the checked cutting arguments of :func:`make_blocks`
    and :func:`blocks_from_text` (both take the same ones)."""

    tokens: int
    block_len: int
    split: str
    calibration_fraction: float
    seed: int
    shuffle: bool

    @property
    def n_blocks(self) -> int:
        return self.tokens // self.block_len


def _check_args(tokens: int, block_len: int, split: str, calibration_fraction: float, seed: int,
                shuffle: bool) -> _BlockPlan:
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
    return _BlockPlan(tokens, block_len, split, calibration_fraction, seed, shuffle)


def _tokenizer_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def _blocks_from_stream(
    ids: torch.Tensor, plan: _BlockPlan, *, complete: bool, source: str, description: str, tokenizer: Any
) -> TokenBlocks:
    tokens, block_len, n_blocks, split = plan.tokens, plan.block_len, plan.n_blocks, plan.split
    calibration_fraction, seed, shuffle = plan.calibration_fraction, plan.seed, plan.shuffle
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
    plan = _check_args(tokens, block_len, split, calibration_fraction, seed, shuffle)
    _check_text(text, source)
    ids = tokenize_text(tokenizer, text)
    return _blocks_from_stream(ids, plan, complete=True, source=source,
                               description=description or f"raw text ({len(text):,} chars)", tokenizer=tokenizer)


# The splits need the whole source tokenized (the full stdlib takes ~10 s); remember the last
# two complete streams so calibration and evaluation blocks of one source tokenize it once.
_STREAM_CACHE: collections.OrderedDict[tuple, tuple[weakref.ref, torch.Tensor, str]] = collections.OrderedDict()
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
    plan = _check_args(tokens, block_len, split, calibration_fraction, seed, shuffle)
    spec = os.fspath(source_or_text)
    lazy = split == "all" and not shuffle
    need = plan.n_blocks * plan.block_len
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
    return _blocks_from_stream(ids, plan, complete=complete, source=spec, description=description, tokenizer=tokenizer)
