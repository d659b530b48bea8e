"""Packed token shards: the training corpus on disk, its batches and its held-out blocks.

The format (``sparsing-shards/1``, written by ``scripts/build_corpus.py``; see
``notes/TRAINING_INTERFACES.md`` of the project) is a folder with ``meta.json`` (written last:
a folder without it is incomplete), ``tokenizer.json`` and flat little-endian ``uint16`` token
files, one per split and domain (``train_prose.bin``, ``train_code.bin``, ``heldout_prose.bin``,
``heldout_code.bin``), documents joined with ``eos_id`` after each one.

Batches (:class:`PackedSampler`): each domain's training stream is cut into consecutive,
non-overlapping blocks of ``seq_len + 1`` tokens sharing one boundary token (block ``b`` covers
``[b*seq_len, b*seq_len + seq_len + 1)``: inputs are its first ``seq_len`` tokens, targets its last
``seq_len``). Every epoch visits each block once in a fresh random order. A global batch of ``B``
sequences takes a fixed ``B_d`` of them from each domain (the mixture weights, rounded by largest
remainder), so domain ``d``'s ``k``-th sample is ``k = step * B_d + j`` and lies in epoch
``k // n_blocks_d``. Everything is a pure function of ``(seed, step, rank, world)``: resuming at a
step needs no saved data state. A run of ``D`` tokens makes ``D * w_d / (n_blocks_d * seq_len)``
epochs over domain ``d`` (:meth:`PackedSampler.epochs`).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["FORMAT", "Corpus", "PackedSampler", "open_corpus", "write_corpus"]

FORMAT = "sparsing-shards/1"
_DTYPE = np.dtype("<u2")
_BUILD_HINT = "build it with `python scripts/build_corpus.py shards ...` (see the README, 'Training lab')"


@dataclass
class Corpus:
    """An opened corpus folder: memory-mapped token arrays per split and domain."""

    path: Path
    meta: dict
    train: dict[str, np.ndarray]  # domain -> [tokens] uint16 (memmap)
    heldout: dict[str, np.ndarray]

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.meta["eos_id"])

    @property
    def domains(self) -> list[str]:
        return sorted(self.train)

    def tokenizer_path(self) -> Path | None:
        name = self.meta.get("tokenizer")
        return None if not name else self.path / name

    def summary(self) -> dict:
        """What a run records about its corpus (small, JSON-friendly)."""
        return {
            "path": str(self.path),
            "format": self.meta.get("format"),
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "train_tokens": {d: len(a) for d, a in sorted(self.train.items())},
            "heldout_tokens": {d: len(a) for d, a in sorted(self.heldout.items())},
            "unique_tokens": self.meta.get("unique_tokens"),
            "builder": self.meta.get("builder"),
            "sources": [{k: s.get(k) for k in ("name", "version", "n_files", "n_chars", "sha256") if k in s}
                        for s in self.meta.get("sources", []) if isinstance(s, dict)],
        }

    def heldout_blocks(self, tokens: Mapping[str, int], block_len: int):
        """The first ``tokens[d] // block_len`` consecutive blocks of each held-out domain ``d``,
        concatenated in the order given, as a :class:`~sparsing_utils.TokenBlocks`
        (``input_ids``/``attention_mask`` ``[n_blocks, block_len]``, no padding). The same
        tokens for every run that shares the corpus."""
        import sparsing_utils as su

        if block_len < 2:
            raise ValueError(f"block_len must be >= 2, got {block_len}")
        parts, names = [], []
        for domain, n in tokens.items():
            if domain not in self.heldout:
                raise ValueError(f"the corpus {self.path} has no held-out split for domain {domain!r}; "
                                 f"it has {sorted(self.heldout)}")
            n_blocks = int(n) // block_len
            have = len(self.heldout[domain]) // block_len
            if n_blocks < 1 or n_blocks > have:
                raise ValueError(f"asked for {n} held-out {domain} tokens in blocks of {block_len}; the corpus "
                                 f"has {have} such blocks ({len(self.heldout[domain])} tokens): ask for fewer")
            arr = np.asarray(self.heldout[domain][: n_blocks * block_len], dtype=np.int64)
            parts.append(torch.from_numpy(arr).view(n_blocks, block_len))
            names.append(f"{domain}:{n_blocks}x{block_len}")
        ids = torch.cat(parts)
        return su.TokenBlocks(
            input_ids=ids, attention_mask=torch.ones_like(ids), source=f"shards:{self.path}",
            n_tokens=int(ids.numel()), block_len=block_len, description="held-out " + " + ".join(names),
            split="heldout", tokenizer=str(self.meta.get("tokenizer") or ""),
        )


def _split_domains(meta: dict, split: str) -> dict[str, tuple[str, int | None]]:
    """``{domain: (file name, token count or None)}`` of one split, from the forms meta.json may take:
    ``files`` as ``{domain: name}``, as a list of ``{"file"/"name", "domain", "tokens"}``, or as a list
    of names ``<split>_<domain>.bin`` (held-out splits ``heldout_<domain>`` name their domain)."""
    entry = meta["splits"][split]
    files = entry.get("files", [])
    by_domain = dict(entry.get("tokens_by_domain") or {})
    out: dict[str, tuple[str, int | None]] = {}
    if isinstance(files, Mapping):
        for domain, name in files.items():
            out[domain] = (name, by_domain.get(domain))
        return out
    fixed = split[len("heldout_"):] if split.startswith("heldout_") else None
    for f in files:
        if isinstance(f, Mapping):
            name = f.get("file") or f.get("name")
            domain = f.get("domain") or fixed
            count = f.get("tokens", by_domain.get(domain))
        else:
            name = str(f)
            m = re.fullmatch(r"(?:train|heldout)_(\w+)\.bin", Path(name).name)
            domain = fixed or (m.group(1) if m else None)
            count = by_domain.get(domain)
        if domain is None or not name:
            raise ValueError(f"meta.json: cannot tell the domain of file {f!r} in split {split!r}")
        if domain in out:
            raise ValueError(f"meta.json: split {split!r} lists two files for domain {domain!r}")
        out[domain] = (name, count)
    if fixed and len(out) == 1 and next(iter(out.values()))[1] is None and "tokens" in entry:
        (domain, (name, _)), = out.items()
        out[domain] = (name, int(entry["tokens"]))
    return out


def open_corpus(path: str | os.PathLike) -> Corpus:
    """Open and check a corpus folder (cheap: memory maps only). Raises ``FileNotFoundError`` or
    ``ValueError`` naming what is missing or inconsistent and how to rebuild it."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"corpus folder {path} does not exist: {_BUILD_HINT}, or pass the right path")
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"corpus {path} is incomplete: no meta.json (it is written last, so the build "
                                f"did not finish); rebuild it: {_BUILD_HINT}")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"corpus {path}: meta.json is not valid JSON ({err}); rebuild it: {_BUILD_HINT}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"corpus {path}: format {meta.get('format')!r}, expected {FORMAT!r}; rebuild it: {_BUILD_HINT}")
    for key in ("vocab_size", "eos_id", "splits"):
        if key not in meta:
            raise ValueError(f"corpus {path}: meta.json lacks {key!r}; rebuild it: {_BUILD_HINT}")
    if meta.get("dtype", "uint16") != "uint16" or not 2 <= int(meta["vocab_size"]) <= 65536:
        raise ValueError(f"corpus {path}: tokens must be uint16 with a vocabulary of at most 65536, got dtype "
                         f"{meta.get('dtype')!r} and vocab_size {meta['vocab_size']}")
    if "train" not in meta["splits"]:
        raise ValueError(f"corpus {path}: meta.json has no 'train' split")
    train: dict[str, np.ndarray] = {}
    heldout: dict[str, np.ndarray] = {}
    for split in meta["splits"]:
        if split != "train" and not split.startswith("heldout_"):
            continue
        for domain, (name, count) in _split_domains(meta, split).items():
            file = path / name
            if not file.is_file():
                raise FileNotFoundError(f"corpus {path}: token file {name} ({split}, {domain}) is missing; "
                                        f"rebuild it: {_BUILD_HINT}")
            size = file.stat().st_size
            if size % _DTYPE.itemsize or (count is not None and size != int(count) * _DTYPE.itemsize):
                raise ValueError(f"corpus {path}: {name} holds {size} bytes, meta.json says {count} uint16 tokens "
                                 f"({None if count is None else int(count) * 2} bytes): the file is truncated or "
                                 f"from another build; rebuild it: {_BUILD_HINT}")
            if size == 0:
                raise ValueError(f"corpus {path}: {name} ({split}, {domain}) is empty")
            arr = np.memmap(file, dtype=_DTYPE, mode="r")
            (train if split == "train" else heldout)[domain] = arr
    if not train:
        raise ValueError(f"corpus {path}: the train split lists no token files")
    return Corpus(path=path, meta=meta, train=train, heldout=heldout)


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integers summing to ``total`` proportional to ``weights`` (Hamilton's method; ties to the first)."""
    raw = weights / weights.sum() * total
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: total - int(counts.sum())]] += 1
    return counts


class PackedSampler:
    """Deterministic training batches from a :class:`Corpus` (module docstring: the scheme).

    ``weights``: domain -> mixture weight (``None``: proportional to each domain's training
    tokens, so every domain makes the same number of epochs). ``train_fraction`` keeps only the
    first fraction of each domain's stream (the repetition study: many epochs over less data).
    """

    def __init__(self, corpus: Corpus, *, seq_len: int, batch_seqs: int, seed: int,
                 weights: Mapping[str, float] | None = None, train_fraction: float = 1.0):
        if not 0 < train_fraction <= 1:
            raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
        self.seq_len, self.batch_seqs, self.seed = int(seq_len), int(batch_seqs), int(seed)
        self.domains = corpus.domains
        if weights is None:
            w = np.array([len(corpus.train[d]) for d in self.domains], dtype=np.float64)
        else:
            unknown = sorted(set(weights) - set(self.domains))
            if unknown:
                raise ValueError(f"domain_weights name {unknown}, which the corpus {corpus.path} does not have "
                                 f"(its domains: {self.domains})")
            w = np.array([float(weights.get(d, 0.0)) for d in self.domains], dtype=np.float64)
            if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
                raise ValueError(f"domain_weights must be finite, >= 0 and not all 0, got {dict(weights)}")
        self.counts = _largest_remainder(w, self.batch_seqs)  # [domains] sequences per step
        self.tokens = {d: int(len(corpus.train[d]) * train_fraction) for d in self.domains}
        self.n_blocks = {d: (self.tokens[d] - 1) // self.seq_len for d in self.domains}
        for d, c in zip(self.domains, self.counts):
            if c > 0 and self.n_blocks[d] < 1:
                raise ValueError(f"domain {d!r} has {self.tokens[d]} training tokens (train_fraction "
                                 f"{train_fraction}), fewer than one sequence of {self.seq_len + 1}")
        self._arrays = corpus.train
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    @property
    def mixture(self) -> dict[str, float]:
        """The mixture actually used: each domain's share of every batch."""
        return {d: float(c) / self.batch_seqs for d, c in zip(self.domains, self.counts)}

    def epochs(self, steps: int) -> dict[str, float]:
        """Epochs over each domain's (used) training blocks after ``steps`` steps."""
        return {d: float(steps * c) / self.n_blocks[d] for d, c in zip(self.domains, self.counts) if c > 0}

    def _perm(self, di: int, epoch: int) -> np.ndarray:
        key = (di, epoch)
        if key not in self._perms:
            if len(self._perms) > 8:
                self._perms.clear()
            rng = np.random.default_rng([self.seed, di, epoch, 0x5EED])
            self._perms[key] = rng.permutation(self.n_blocks[self.domains[di]])
        return self._perms[key]

    def _global_plan(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Domain index and block start of each of the ``batch_seqs`` sequences of ``step``."""
        dom, start = [], []
        for di, c in enumerate(self.counts):
            if c == 0:
                continue
            n = self.n_blocks[self.domains[di]]
            k = step * int(c) + np.arange(int(c), dtype=np.int64)  # this domain's sample indices
            blocks = np.empty_like(k)
            for epoch in np.unique(k // n):
                sel = (k // n) == epoch
                blocks[sel] = self._perm(di, int(epoch))[k[sel] % n]
            dom.append(np.full(int(c), di))
            start.append(blocks * self.seq_len)
        dom_a, start_a = np.concatenate(dom), np.concatenate(start)
        order = np.random.default_rng([self.seed, step, 0xBA7C]).permutation(self.batch_seqs)  # mix domains
        return dom_a[order], start_a[order]

    def batch(self, step: int, rank: int = 0, world: int = 1) -> np.ndarray:  # [batch_seqs / world, seq_len + 1]
        """Rank ``rank``'s contiguous share of the global batch of ``step`` (int64 token ids)."""
        if self.batch_seqs % world:
            raise ValueError(f"{self.batch_seqs} sequences per batch do not split over {world} processes")
        per = self.batch_seqs // world
        dom, start = self._global_plan(int(step))
        dom, start = dom[rank * per:(rank + 1) * per], start[rank * per:(rank + 1) * per]
        out = np.empty((per, self.seq_len + 1), dtype=np.int64)
        offsets = np.arange(self.seq_len + 1)
        for di in np.unique(dom):
            sel = dom == di
            out[sel] = self._arrays[self.domains[di]][start[sel, None] + offsets]
        return out


# ---------------------------------------------------------------------------------------------
# A small writer (tests and tiny corpora); scripts/build_corpus.py writes the real ones.
# ---------------------------------------------------------------------------------------------


def write_corpus(path: str | os.PathLike, *, train: Mapping[str, np.ndarray], heldout: Mapping[str, np.ndarray],
                 vocab_size: int, eos_id: int, tokenizer_json: str | None = None, extra: dict | None = None) -> Path:
    """Write a corpus folder in the shard format: token files first (atomically), ``meta.json`` last.

    ``train``/``heldout``: domain -> 1-D token ids (< ``vocab_size``). ``tokenizer_json``: the text
    of a ``tokenizers`` JSON file, if any.
    """
    from .jsonio import atomic_write_bytes, atomic_write_json

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    splits: dict[str, dict] = {"train": {"files": [], "tokens": 0, "tokens_by_domain": {}}}
    for split, arrays in (("train", train), ("heldout", heldout)):
        for domain, ids in arrays.items():
            ids = np.asarray(ids)
            if ids.ndim != 1 or ids.size == 0 or ids.min() < 0 or ids.max() >= vocab_size:
                raise ValueError(f"{split} {domain}: token ids must be a non-empty 1-D array in [0, {vocab_size})")
            name = f"{split}_{domain}.bin"
            atomic_write_bytes(path / name, ids.astype(_DTYPE).tobytes())
            if split == "train":
                splits["train"]["files"].append(name)
                splits["train"]["tokens"] += int(ids.size)
                splits["train"]["tokens_by_domain"][domain] = int(ids.size)
            else:
                splits[f"heldout_{domain}"] = {"files": [name], "tokens": int(ids.size)}
    meta = {"format": FORMAT, "tokenizer": None, "vocab_size": int(vocab_size), "eos_id": int(eos_id),
            "dtype": "uint16", "domains": {d: {} for d in train}, "splits": splits, "sources": [],
            "unique_tokens": {d: int(np.asarray(a).size) for d, a in train.items()},
            "builder": {"script": "sparsing_utils.shards.write_corpus"}}
    if tokenizer_json is not None:
        atomic_write_bytes(path / "tokenizer.json", tokenizer_json.encode())
        meta["tokenizer"] = "tokenizer.json"
    meta.update(extra or {})
    atomic_write_json(path / "meta.json", meta)
    return path
