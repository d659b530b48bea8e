"""CETT and per-layer thresholds: pure tensor math, no model here.

Definitions (Luo et al. 2024, Sec. 3.1 / Eq. 1-2; PAPER.md Sec. 1). For one token with FFN
activation vector ``a`` (``d_ff`` entries) and output projection ``W_down``:

* neuron output norm ``n_i = |a_i| * ||W_down[:, i]||_2``
* a neuron is *activated* when ``n_i > eps``; the truncated tail is ``D = {i : n_i <= eps}``
* ``CETT(eps) = || sum_{i in D} a_i W_down[:, i] ||_2 / || W_down a ||_2``; a layer's CETT is
  the mean over tokens.

The search rule and the inference rule are the same comparison (``<=`` truncates, ``>``
keeps), unlike the official code, whose search uses ``<=`` and inference ``<``.

Everything here is batched: many candidate thresholds are evaluated with one stacked
matrix product per chunk of tokens, on the device of the inputs, with float32 statistics.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch

__all__ = [
    "CETTCurve",
    "NormHistogram",
    "PendingCopy",
    "activation_limits",
    "all_finite",
    "cett_per_token",
    "cett_statistics",
    "compare_limits",
    "default_compute_dtype",
    "gemm_rows",
    "host_to_device",
    "interpolate_thresholds",
    "l2_norm",
    "neuron_norms",
    "nonzero_norms",
    "pad_rows",
    "refine_steps",
    "refine_thresholds",
    "sketch_projection",
    "sketch_weight",
    "truncated_norms",
    "truncated_statistics",
]


#: On CUDA, the products of rows that vary in number (an expert's tokens) are padded to a multiple of
#: this many rows, so that their shapes repeat across experts and layers: on an H200 a search's first
#: call on the Mixtral-shaped benchmark model spent 0.33-0.60 s more than its second, most of it in the
#: products of the experts' ~190 distinct row counts (cProfile); padded, 0.11-0.29 s (benchmarks/
#: RESULTS.md, session 6). Coarser steps (at most 8 shapes per octave of rows) measured no better
#: (session 9). Not on the CPU (no such cost measured there; its answers stay bitwise).
GEMM_ROW_MULTIPLE = 128


def gemm_rows(n: int, device: torch.device) -> int:
    """The rows ``n`` varying rows are padded to before a product on ``device`` (:data:`GEMM_ROW_MULTIPLE`)."""
    return -(-n // GEMM_ROW_MULTIPLE) * GEMM_ROW_MULTIPLE if device.type == "cuda" else n


def pad_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with zero rows appended (dim 0) up to :func:`gemm_rows`; ``t`` itself when none are needed."""
    pad = gemm_rows(t.shape[0], t.device) - t.shape[0]
    return torch.nn.functional.pad(t, (0, 0) * (t.dim() - 1) + (0, pad)) if pad else t


def default_compute_dtype(a: torch.Tensor) -> torch.dtype:
    """Products run in the activations' own half precision on CUDA (fp32 accumulation in the
    matrix units) and in float32 on the CPU."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        return a.dtype
    return torch.float32


def sketch_projection(d_model: int, dim: int, *, seed: int = 0) -> torch.Tensor:
    """The random projection of :func:`sketch_weight`: ``[d_model, dim]`` float32 on the CPU,
    i.i.d. ``N(0, 1 / dim)`` from a CPU generator seeded with ``seed`` (the same on every device)."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(d_model, dim, generator=g, dtype=torch.float32) / math.sqrt(dim)  # [d_model, dim]


def sketch_weight(w_t: torch.Tensor, dim: int, *, seed: int = 0, proj: torch.Tensor | None = None) -> torch.Tensor:
    """A Johnson-Lindenstrauss sketch of ``W_down``: ``[d_ff, dim]`` with
    ``E ||x @ sketch||^2 = ||x @ w_t||^2`` for every ``x``.

    Norms of truncated sums through the sketch cost ``dim / d_model`` of the exact product;
    their relative error per token is about ``sqrt(2 / dim)`` and averages out over tokens
    (the bias of the norm, from Jensen's inequality, is about ``1 / (4 dim)``). Used only
    for the CETT curves that guide the exact search. ``dim >= d_model`` returns ``w_t``.
    ``proj``: :func:`sketch_projection` ``(d_model, dim, seed=seed)``, already on the device
    (a caller sketching many layers copies all projections at once: no copy per layer).
    """
    d_model = w_t.shape[1]
    if dim >= d_model:
        return w_t
    if proj is None:
        proj = sketch_projection(d_model, dim, seed=seed)
    # In the weights' own half precision on CUDA (fp32 accumulation), like the forward's products:
    # a float32 product would be the search's only one, and the first launch of a kernel in a
    # process loads it (on an H200: 11 ms for this float32 product, 7 ms in bf16; issue 10,
    # benchmarks/first_use_costs.py).
    cd = default_compute_dtype(w_t)
    return (w_t.to(cd) @ proj.to(w_t.device, cd)).to(w_t.dtype)  # [d_ff, dim]


def host_to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` (on the CPU) copied to ``device`` without making the host wait: on CUDA through
    pinned memory, asynchronously (a copy from pageable memory synchronises the host with the
    device, which drains the queue of kernels; issue 10). Call it before a forward pass, once
    for all layers, rather than moving small tensors inside the hooks."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class PendingCopy:
    """A device tensor's value on its way to the host, the host not waiting: on CUDA it is copied
    into pinned memory behind an event, and :meth:`get` waits for that copy only (the kernels
    queued after it keep the device busy meanwhile); elsewhere it is the tensor itself."""

    def __init__(self, t: torch.Tensor):
        self.event = None
        if t.is_cuda:
            self.value = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.value.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.value = t

    def get(self) -> torch.Tensor:
        """The value on the host (waits for the copy on CUDA)."""
        if self.event is not None:
            self.event.synchronize()
        return self.value


# The two helpers below give what ``Tensor.norm`` and ``isfinite(x).all()`` give, through kernels
# that a forward pass has already loaded: under CUDA's lazy module loading the first launch of
# a kernel in a process costs 20-50 ms each (measured on an H200, benchmarks/first_use_costs.py),
# which made the first search in a process ~0.2 s slower than the next (issue 10).


def l2_norm(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Euclidean norm along ``dim`` in float32, as ``sqrt(sum(x^2))``."""
    return x.float().pow(2).sum(dim=dim).sqrt()


def all_finite(x: torch.Tensor) -> torch.Tensor:
    """0-dim bool tensor on ``x``'s device: no NaN or inf in ``x`` (a NaN or inf entry makes the
    float32 sum non-finite, and ``s - s`` is 0 exactly for a finite ``s``)."""
    s = x.sum(dtype=torch.float32)
    return (s - s) == 0


def neuron_norms(a: torch.Tensor, col_norms: torch.Tensor) -> torch.Tensor:
    """``|a_i| * ||W_down[:, i]||`` (PAPER.md Sec. 1): ``[tokens, d_ff]`` float32."""
    return a.float().abs() * col_norms.float()  # [tokens, d_ff]


def activation_limits(col_norms: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Per-neuron limits on ``|a_i|``: neuron ``i`` is activated iff ``|a_i| > eps / ||W_down[:, i]||``,
    i.e. iff ``|a_i| * ||W_down[:, i]|| > eps`` (PAPER.md Sec. 1). ``[K, d_ff]`` float32 for
    thresholds ``[K]``; a neuron with a zero column is never activated (limit ``inf``).

    Every rule in the package (search, statistics, inference) compares ``|a|`` with these limits,
    so a neuron on the boundary is treated the same everywhere, with no float32 copy of ``a``.
    Several layers at once: ``col_norms [layers, d_ff]`` and ``thresholds [layers, K]`` give
    ``[layers, K, d_ff]``, each layer's the same values as alone.
    """
    if col_norms.dim() == 2:  # [layers, d_ff], thresholds [layers, K]
        cn = col_norms.float().unsqueeze(1)  # [layers, 1, d_ff]
        eps = thresholds.float().reshape(col_norms.shape[0], -1, 1).to(cn.device)  # [layers, K, 1]
    else:
        cn = col_norms.float().reshape(1, -1)  # [1, d_ff]
        eps = thresholds.float().reshape(-1, 1).to(cn.device)  # [K, 1]
    return torch.where(cn > 0, eps / cn.clamp_min(torch.finfo(torch.float32).tiny), torch.full_like(cn, math.inf))


def compare_limits(limits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float32 limits on ``|a|`` (:func:`activation_limits`) made comparable with activations of
    ``dtype`` without converting them: for half-precision ``dtype`` the largest ``dtype`` value
    ``<=`` each limit, so that for every ``x`` of ``dtype``, ``x > L`` iff ``x > compare_limits(L)``
    (no ``dtype`` value lies between the two), and the comparison runs in ``dtype`` (on CUDA a
    vectorised kernel, where a bf16-against-float32 comparison converts every entry; issue 10,
    ``benchmarks/op_costs.py``). Float32 and wider: the limits themselves."""
    if dtype not in (torch.bfloat16, torch.float16):
        return limits
    r = limits.to(dtype)
    return torch.where(r.float() > limits, torch.nextafter(r, torch.full_like(r, -math.inf)), r)


def nonzero_norms(y_norm: torch.Tensor) -> torch.Tensor:
    """``||y||`` of each token in float32, with 1 where it is 0: the denominator of Eq. 2 (a token
    whose FFN output is exactly zero has nothing to truncate, its tail norm is 0 and so is its CETT).
    ``y + (y == 0)`` rather than ``where`` and ``clamp_min``: kernels that a forward pass has already
    loaded (the first use of ``where`` or ``clamp_min`` in a process costs 15-30 ms on an H200,
    ``benchmarks/first_use_isolated.py``); the quotients are those of a plain division."""
    y = y_norm.float()
    return y + (y == 0).float()


def truncated_statistics(a, w_t: torch.Tensor, col_norms: torch.Tensor,
                         thresholds: torch.Tensor, *, compute_dtype: torch.dtype | None = None,
                         max_elements: int = 1 << 26,
                         blocks: tuple[int, int] | None = None, limits: torch.Tensor | None = None,
                         counts: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Norm of the truncated tail and number of activated neurons, per threshold and token.

    Returns ``(|| sum_{i : n_i <= eps_k} a_i W_down[:, i] ||  [K, tokens] float32,
    activated counts [K, tokens] int32, or None with counts=False)``. a: ``[tokens, d_ff]``; w_t:
    ``W_down`` transposed ``[d_ff, d_model]`` (or a sketch of it, :func:`sketch_weight`); thresholds:
    ``[K]``; ``limits``: their :func:`compare_limits` ``[K, d_ff]`` for ``a``'s dtype, on ``a``'s
    device, when the caller computed them (on the host: no device kernels for them). The K
    masked copies of a chunk of ``a`` are stacked into one ``[K*t, d_ff] @ [d_ff, d_model]``
    product; chunks keep ``K * t * d_ff <= max_elements``.

    ``blocks = (n, width)``: the first ``n * width`` columns of ``a`` are ``n`` blocks that are zero
    on most tokens (the experts of an MoE layer's virtual activation vector, :mod:`sparsing_utils.moe`;
    the columns after them are dense). Each block is then multiplied only on the tokens where it
    is not all zero, and the per-token sums are accumulated over the blocks before the norm (the
    norm is that of the whole FFN output's tail). A zero entry adds nothing to the sum and is
    never activated (its norm 0 is ``<=`` every threshold ``>= 0``), so the result is the same
    up to float rounding of the sum's order, at ``k / n`` of the cost for top-``k`` routing.

    ``a`` may also be held without those zeros, as :class:`~sparsing_utils.moe.ExpertRows` (anything
    with ``shape``, ``full()`` and ``sorted().parts()``: ``(columns, rows, values)`` per block); the
    products are then those of ``blocks`` on the rows each block is stored on.
    """
    compact = not isinstance(a, torch.Tensor)
    if compact and not bool((thresholds >= 0).all()):  # a negative threshold activates zeros: every entry
        a, compact = a.full().reshape(a.shape), False
    if len(a.shape) != 2:
        raise ValueError(f"a must be [tokens, d_ff], got shape {tuple(a.shape)}")
    if compact:
        a = a.sorted()
    x = a.parts()[0][2] if compact else a  # a tensor of a's dtype and device
    cd = compute_dtype or default_compute_dtype(x)
    w = w_t.to(device=x.device, dtype=cd)
    if limits is None:
        limits = compare_limits(activation_limits(col_norms.to(x.device), thresholds.reshape(-1).to(x.device)),
                                x.dtype)  # [K, d_ff]
    tokens, d_ff = a.shape
    n_k = limits.shape[0]
    norms = torch.empty(n_k, tokens, device=x.device, dtype=torch.float32)  # [K, tokens]
    kept = torch.empty(n_k, tokens, device=x.device, dtype=torch.int32) if counts else None  # [K, tokens]
    if tokens == 0 or n_k == 0:
        return norms, kept
    if compact or (blocks is not None and bool((thresholds >= 0).all())):  # a negative threshold activates zeros
        parts = a.parts() if compact else _nonzero_blocks(a, blocks)
        buffers = a.padded_buffers() if compact else None
        return _parts_truncated_statistics(parts, tokens, w, limits, norms, kept, cd, max_elements, buffers)
    k_group = max(1, min(n_k, max_elements // max(1, d_ff)))
    for k0 in range(0, n_k, k_group):
        lim = limits[k0:k0 + k_group]  # [k, d_ff]
        k = lim.shape[0]
        t_chunk = max(1, max_elements // (k * d_ff))
        for t0 in range(0, tokens, t_chunk):
            ac = a[t0:t0 + t_chunk]  # [t, d_ff]
            t = ac.shape[0]
            tail = ac.abs().unsqueeze(0) <= lim.unsqueeze(1)  # [k, t, d_ff] True = truncated
            masked = ac.to(cd).unsqueeze(0) * tail  # [k, t, d_ff]
            s = masked.reshape(-1, d_ff) @ w  # [k*t, d_model]
            norms[k0:k0 + k, t0:t0 + t] = l2_norm(s).view(k, t)
            if kept is not None:
                kept[k0:k0 + k, t0:t0 + t] = d_ff - tail.sum(dim=-1, dtype=torch.int32)
    return norms, kept


def _nonzero_blocks(a: torch.Tensor, blocks: tuple[int, int]) -> list[tuple[slice, torch.Tensor | None, torch.Tensor]]:
    """``a [tokens, d_ff]`` whose first ``n * width`` columns are ``n`` mostly-zero blocks, as
    ``(columns, rows [r] ascending, values [r, width])`` per block on the rows where it is not all
    zero, then ``(columns, None, values [tokens, rest])`` for the dense columns after them."""
    n_blocks, width = blocks
    tokens, d_ff = a.shape
    cut = n_blocks * width
    if cut > d_ff:
        raise ValueError(f"{n_blocks} blocks of width {width} do not fit in a of width {d_ff}")
    nonzero = a[:, :cut].reshape(tokens, n_blocks, width).ne(0).any(dim=-1)  # [tokens, n] the block ran
    parts = []
    for j in range(n_blocks):
        r = nonzero[:, j].nonzero().squeeze(1)  # [rows] ascending
        parts.append((slice(j * width, (j + 1) * width), r, a[:, j * width:(j + 1) * width].index_select(0, r)))
    if cut < d_ff:
        parts.append((slice(cut, d_ff), None, a[:, cut:]))
    return parts


def _parts_truncated_statistics(parts: list[tuple[slice, torch.Tensor | None, torch.Tensor]], tokens: int,
                                w: torch.Tensor, limits: torch.Tensor, norms: torch.Tensor, kept: torch.Tensor,
                                cd: torch.dtype, max_elements: int,
                                buffers: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`truncated_statistics` of an ``a [tokens, d_ff]`` given block by block, ``(columns, rows
    [r] ascending or None for every token, values [r or tokens, width])``, zero elsewhere: each
    block's masked copies ``[k, rows, width] @ w_block`` only on its rows, accumulated per token in
    float32 (the tail of the whole output, Eq. 2), then the norm. Chunks of tokens keep
    ``k * t * max(width, d_model) <= max_elements`` for the widest block: one expert's width, not
    the layer's (on a GPU the products of a layer are few and launch-bound). ``buffers``: the first
    blocks' rows and values already padded (``ExpertRows.padded_buffers``), taken when one chunk holds
    every token."""
    d_out = w.shape[1]
    width = max(x.shape[1] for _, _, x in parts)
    n_k = limits.shape[0]
    k_group = max(1, min(n_k, max_elements // max(1, width, d_out)))
    for k0 in range(0, n_k, k_group):
        lim = limits[k0:k0 + k_group]  # [k, d_ff]
        k = lim.shape[0]
        t_chunk = max(1, max_elements // (k * max(width, d_out)))
        starts = list(range(0, tokens, t_chunk)) + [tokens]
        # where each block's rows enter each chunk of tokens (rows ascending)
        bounds = [None if r is None else [0, len(r)] if len(starts) == 2 else
                  torch.searchsorted(r, torch.tensor(starts, device=r.device, dtype=r.dtype)).tolist()
                  for _, r, _ in parts]
        for c, t0 in enumerate(starts[:-1]):
            t = starts[c + 1] - t0
            s = torch.zeros(k, t, d_out, device=norms.device, dtype=torch.float32)  # [k, t, d_model] tail sums
            count = torch.zeros(k, t, device=norms.device, dtype=torch.int32) if kept is not None else None
            for j, ((col, r, x), b) in enumerate(zip(parts, bounds)):
                if r is None:
                    rr, ac = None, x[t0:t0 + t]  # the dense columns, every token
                elif buffers is not None and j < len(buffers) and len(starts) == 2:
                    rr, ac = buffers[j] if len(r) else (r, x)  # padded once, for every evaluation
                else:
                    rr, ac = r[b[c]:b[c + 1]] - t0, x[b[c]:b[c + 1]]  # [rows] in the chunk, [rows, width]
                    # CUDA: zero rows on token 0, truncated everywhere: they add exactly 0 there
                    ac, rr = (pad_rows(ac), pad_rows(rr)) if len(rr) else (ac, rr)
                if ac.shape[0] == 0:
                    continue
                tail = ac.abs().unsqueeze(0) <= lim[:, col].unsqueeze(1)  # [k, rows, width] True = truncated
                prod = ((ac.to(cd).unsqueeze(0) * tail).reshape(-1, ac.shape[1]) @ w[col]).view(k, -1, d_out)
                active = ac.shape[1] - tail.sum(dim=-1, dtype=torch.int32) if count is not None else None  # [k, rows]
                if rr is None:
                    s += prod.float()
                    if count is not None:
                        count += active
                else:
                    s.index_add_(1, rr, prod.float())
                    if count is not None:
                        count.index_add_(1, rr, active)
            norms[k0:k0 + k, t0:t0 + t] = l2_norm(s)
            if count is not None:
                kept[k0:k0 + k, t0:t0 + t] = count
    return norms, kept


def truncated_norms(a: torch.Tensor, w_t: torch.Tensor, col_norms: torch.Tensor,
                    thresholds: torch.Tensor, **kw) -> torch.Tensor:
    """``|| sum_{i : n_i <= eps_k} a_i W_down[:, i] ||`` for each threshold: ``[K, tokens]``."""
    return truncated_statistics(a, w_t, col_norms, thresholds, **kw)[0]


def _cett_and_kept(a, w_t, col_norms, thresholds, y_norm, **kw) -> tuple[torch.Tensor, torch.Tensor | None]:
    if y_norm is None:
        if not isinstance(a, torch.Tensor):  # held without its zeros (sparsing_utils.moe.ExpertRows)
            a = a.full().reshape(a.shape)
        cd = default_compute_dtype(a)
        y_norm = l2_norm(a.to(cd) @ w_t.to(a.device, cd))  # [tokens]
    num, kept = truncated_statistics(a, w_t, col_norms, thresholds, **kw)  # [K, tokens]
    return num / nonzero_norms(y_norm.to(num.device)).unsqueeze(0), kept  # Eq. 2, [K, tokens]


def cett_per_token(a: torch.Tensor, w_t: torch.Tensor, col_norms: torch.Tensor, thresholds: torch.Tensor,
                   y_norm: torch.Tensor | None = None, **kw) -> torch.Tensor:
    """CETT of every token at every threshold (Eq. 2): ``[K, tokens]``.

    ``y_norm`` (``[tokens]``) is ``||W_down a||``; computed here when not given. A token whose
    FFN output is exactly zero has nothing to truncate: its CETT is 0.
    """
    return _cett_and_kept(a, w_t, col_norms, thresholds, y_norm, **kw)[0]


def cett_statistics(a: torch.Tensor, w_t: torch.Tensor, col_norms: torch.Tensor, thresholds: torch.Tensor,
                    y_norm: torch.Tensor | None = None, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over tokens of CETT and of the number of activated neurons, per threshold.

    Returns ``(cett_sum [K], active_sum [K])`` in float64, ready to be added across chunks,
    batches and processes (then divided by the token count, and ``d_ff`` for the ratio);
    ``active_sum`` is None with ``counts=False`` (its masks are then not summed).
    """
    cett, kept = _cett_and_kept(a, w_t, col_norms, thresholds, y_norm, **kw)  # [K, tokens]
    return cett.double().sum(dim=1), None if kept is None else kept.double().sum(dim=1)


class NormHistogram:
    """Per-layer histogram of ``log10`` neuron norms, accumulated chunk by chunk.

    Gives quantiles of the norm distribution without keeping activations in memory; used to
    place the candidate thresholds of each layer's CETT curve. Exact zeros (ReLU) are
    counted apart. Bins are 1/256 decade wide over [1e-12, 1e6) (values outside go to the
    end bins): quantiles to 0.9%.

    :meth:`add` launches ``log10``, ``histc`` and comparisons on the norms' device, with no
    synchronisation; the counts are combined on the host at the first read of :attr:`counts`,
    :attr:`zeros` or :meth:`quantiles` (one copy). ``histc`` rather than an ``index_add_`` or
    ``bincount`` of bin indices: a Llama-style forward has not loaded those kernels, and their
    first use costs 30-60 ms in a process on an H200 (``benchmarks/first_use_isolated.py``); its
    float32 counts are exact integers, chunks holding at most 2**24 entries.
    """

    LOG_MIN, LOG_MAX, BINS = -12.0, 6.0, 18 * 256
    CHUNK = 1 << 24  # entries per histc call: float32 counts below 2**24 are exact

    def __init__(self, n_layers: int, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._counts = torch.zeros(n_layers, self.BINS, dtype=torch.float64)  # on the host
        self._zeros = torch.zeros(n_layers, dtype=torch.float64)
        self._pending: list[tuple[int, torch.Tensor]] = []  # (layer, [BINS + 3] float32) on the device

    def add(self, layer: int, norms: torch.Tensor) -> None:
        """Count ``norms`` (any shape, >= 0) into one layer's histogram, with no device
        synchronisation: integer counts, exact in any order."""
        for x in norms.reshape(-1).split(self.CHUNK):
            logs = x.float().log10()  # [n]; -inf at exact zeros, which histc leaves out
            hist = torch.histc(logs, bins=self.BINS, min=self.LOG_MIN, max=self.LOG_MAX)  # [BINS]
            ends = torch.stack([(x <= 0).sum(), (logs < self.LOG_MIN).sum(), (logs > self.LOG_MAX).sum()])
            self._pending.append((layer, torch.cat([hist, ends.float()])))  # zeros, below (with zeros), above

    def add_zeros(self, layer: int, n: int) -> None:
        """Count ``n`` exact zeros (entries not stored: an MoE layer's experts that did not run)."""
        self._zeros[layer] += n

    def _flush(self) -> None:
        """The pending counts added on the host (one copy from the device)."""
        if not self._pending:
            return
        rows = torch.stack([r.to(self.device) for _, r in self._pending]).cpu().double()  # [n, BINS + 3]
        for (layer, _), r in zip(self._pending, rows):
            zeros, below, above = r[-3:]
            self._counts[layer] += r[:-3]
            self._counts[layer, 0] += below - zeros  # positive norms under 1e-12: the first bin
            self._counts[layer, -1] += above
            self._zeros[layer] += zeros
        self._pending.clear()

    @property
    def counts(self) -> torch.Tensor:  # [layers, BINS] float64 on the host
        self._flush()
        return self._counts

    @property
    def zeros(self) -> torch.Tensor:  # [layers] float64 on the host
        self._flush()
        return self._zeros

    def quantiles(self, levels: torch.Tensor) -> torch.Tensor:
        """Norm values at the given quantile levels, per layer: ``[layers, len(levels)]`` (host).

        A level inside the mass of exact zeros maps to 0; otherwise the upper edge of the bin
        in which the cumulative count first reaches the level (so at least that fraction of
        norms is ``<=`` the value).
        """
        counts, zeros = self.counts, self.zeros
        levels = levels.to(torch.float64)
        total = counts.sum(dim=1) + zeros  # [layers]
        cum = zeros.unsqueeze(1) + counts.cumsum(dim=1)  # [layers, bins]
        want = levels.unsqueeze(0) * total.unsqueeze(1)  # [layers, K]
        idx = torch.searchsorted(cum.contiguous(), want.contiguous()).clamp_max(self.BINS - 1)
        width = (self.LOG_MAX - self.LOG_MIN) / self.BINS
        values = 10 ** (self.LOG_MIN + (idx.double() + 1) * width)
        values = torch.where(want <= zeros.unsqueeze(1), torch.zeros_like(values), values)
        return values.float()

    def cpu(self) -> NormHistogram:
        """The histogram with its counts on the host (they are kept there: the same object)."""
        self._flush()
        return self

    def all_reduce(self) -> None:
        """Sum the counts of every process (one collective, on the histogram's device; integer
        counts sum exactly)."""
        import torch.distributed as dist

        self._flush()
        if dist.is_available() and dist.is_initialized():
            both = torch.cat([self._counts, self._zeros.unsqueeze(1)], dim=1).to(self.device)  # [layers, BINS + 1]
            dist.all_reduce(both)
            both = both.cpu()
            self._counts, self._zeros = both[:, :-1].contiguous(), both[:, -1].contiguous()


@dataclass
class CETTCurve:
    """Mean CETT of each layer on a grid of thresholds (monotone in the threshold).

    eps: ``[layers, K]`` ascending per layer, starting with 0; cett: ``[layers, K]``.
    """

    eps: torch.Tensor
    cett: torch.Tensor

    def add_points(self, eps: torch.Tensor, cett: torch.Tensor) -> CETTCurve:
        """Merge exact evaluations ``[layers, M]`` into the grid (kept sorted by eps)."""
        e = torch.cat([self.eps, eps.to(self.eps)], dim=1)
        c = torch.cat([self.cett, cett.to(self.cett)], dim=1)
        order = e.argsort(dim=1)
        return CETTCurve(e.gather(1, order), c.gather(1, order))


def interpolate_thresholds(curve: CETTCurve, target: float | torch.Tensor) -> torch.Tensor:
    """Per-layer threshold at which the (interpolated) mean CETT equals ``target``: ``[layers]``.

    Linear interpolation between the two grid points around the target, on the running
    maximum of the curve (CETT need not be strictly monotone). A target above the curve's
    last point returns that point's threshold.
    """
    eps, cett = curve.eps.double(), curve.cett.double()  # [L, K]
    mono = cett.cummax(dim=1).values
    layers, k = mono.shape
    t = torch.as_tensor(target, dtype=torch.float64, device=mono.device).expand(layers).reshape(layers, 1)
    hi = torch.searchsorted(mono.contiguous(), t.contiguous()).clamp(1, k - 1)  # first index with c >= t
    lo = hi - 1
    e0, e1 = eps.gather(1, lo), eps.gather(1, hi)
    c0, c1 = mono.gather(1, lo), mono.gather(1, hi)
    frac = ((t - c0) / (c1 - c0).clamp_min(1e-30)).clamp(0, 1)
    out = e0 + frac * (e1 - e0)
    out = torch.where(t >= mono[:, -1:], eps[:, -1:], out)
    return out.squeeze(1).float()


def refine_thresholds(evaluate, curve: CETTCurve, target: float, *, tol: float = 1e-4,
                      max_iter: int = 8) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Exact per-layer thresholds for a target mean CETT, by safeguarded secant steps.

    ``evaluate(eps [layers], active [layers] bool) -> cett [layers]`` computes the exact mean
    CETT of every active layer (on all tokens); the curve gives the first guess and the local
    slope. Each iteration costs one evaluation (one product per unconverged layer). Returns
    ``(eps [layers], cett [layers], evaluations)``; layers whose target is out of reach keep
    their best point. The steps are those of :func:`refine_steps`, driven here.
    """
    steps = refine_steps(curve, target, tol=tol, max_iter=max_iter)
    try:
        ask = next(steps)
        while True:
            ask = steps.send(evaluate(*ask))
    except StopIteration as done:
        return done.value


def refine_steps(curve: CETTCurve, target: float, *, tol: float = 1e-4, max_iter: int = 8):
    """:func:`refine_thresholds` as a generator, for callers that evaluate asynchronously: it yields
    ``(eps [layers] float32, active [layers] bool)`` to evaluate, is sent the exact ``cett [layers]``
    back, and returns ``(eps, cett, evaluations)`` (``StopIteration.value``). A layer's steps read
    only its own evaluations, so one generator per layer gives each layer the same steps as one for
    all layers (stream mode runs each layer's refinement inside its hook this way; a one-layer
    curve takes :func:`_refine_one_layer`, the same steps in Python floats)."""
    if curve.eps.shape[0] == 1:
        return (yield from _refine_one_layer(curve, target, tol, max_iter))
    eps = interpolate_thresholds(curve, target).double()
    layers = eps.numel()
    lo_e = torch.zeros(layers, dtype=torch.float64, device=eps.device)
    lo_c = torch.zeros_like(lo_e)
    hi_e = torch.full_like(lo_e, math.inf)
    hi_c = torch.full_like(lo_e, math.inf)
    prev_e = prev_c = None
    cur_c = torch.full_like(lo_e, math.nan)
    active = torch.ones(layers, dtype=torch.bool, device=eps.device)
    evals = 0
    best_e, best_c = eps.clone(), torch.full_like(lo_e, math.inf)
    for _ in range(max_iter):
        c = (yield eps.float(), active).double().to(eps.device)
        evals += 1
        cur_c = torch.where(active, c, cur_c)
        better = active & ((cur_c - target).abs() < (best_c - target).abs())
        best_e = torch.where(better, eps, best_e)
        best_c = torch.where(better, cur_c, best_c)
        below = active & (cur_c < target)
        above = active & (cur_c >= target)
        lo_e, lo_c = torch.where(below & (eps >= lo_e), eps, lo_e), torch.where(below & (eps >= lo_e), cur_c, lo_c)
        hi_e, hi_c = torch.where(above & (eps <= hi_e), eps, hi_e), torch.where(above & (eps <= hi_e), cur_c, hi_c)
        active = active & ((cur_c - target).abs() > tol)
        if not bool(active.any()):
            break
        # Secant from the last two points; first step uses the curve's local slope.
        if prev_e is None:
            slope = _curve_slope(curve, eps)
        else:
            de = eps - prev_e
            slope = torch.where(de.abs() > 0, (cur_c - prev_c) / de, _curve_slope(curve, eps))
        slope = torch.where(slope > 0, slope, _curve_slope(curve, eps))
        step = eps + (target - cur_c) / slope.clamp_min(1e-30)
        # Keep inside the bracket; bisect (geometrically on the finite side) when it escapes.
        finite_hi = torch.isfinite(hi_e)
        mid = torch.where(finite_hi, 0.5 * (lo_e + hi_e), torch.maximum(2 * eps, lo_e * 2 + 1e-12))
        bad = ~torch.isfinite(step) | (step <= lo_e) | (finite_hi & (step >= hi_e))
        new = torch.where(bad, mid, step)
        prev_e, prev_c = eps, cur_c
        eps = torch.where(active, new, eps)
    return best_e.float(), best_c.float(), evals


def _refine_one_layer(curve: CETTCurve, target: float, tol: float, max_iter: int):
    """:func:`refine_steps` of a one-layer curve with the steps in Python floats (IEEE doubles, as
    the float64 tensors of the general case, operation for operation: the same thresholds bitwise,
    ``tests/test_cett.py``) instead of a few dozen tensor operations on one element each: in stream
    mode each layer's refinement runs inside its hook, where the host's time is the device's idle time
    (issue 10)."""
    eps = float(interpolate_thresholds(curve, target).double()[0])
    grid_e = curve.eps.double()[0].tolist()
    grid_c = curve.cett.double().cummax(dim=1).values[0].tolist()
    k = len(grid_e)

    def slope_at(x: float) -> float:  # _curve_slope of the one layer
        hi = min(max(bisect.bisect_left(grid_e, x), 1), k - 1)
        return (grid_c[hi] - grid_c[hi - 1]) / max(grid_e[hi] - grid_e[hi - 1], 1e-30)

    lo_e, hi_e = 0.0, math.inf  # the bracket (its CETT values are not needed here)
    prev_e = prev_c = None
    best_e, best_c = eps, math.inf
    evals = 0
    for _ in range(max_iter):
        asked = torch.tensor([eps], dtype=torch.float64).float(), torch.ones(1, dtype=torch.bool)
        cur_c = float((yield asked).double()[0])
        evals += 1
        if abs(cur_c - target) < abs(best_c - target):
            best_e, best_c = eps, cur_c
        if cur_c < target and eps >= lo_e:
            lo_e = eps
        if cur_c >= target and eps <= hi_e:
            hi_e = eps
        if not abs(cur_c - target) > tol:
            break
        # Secant from the last two points; first step uses the curve's local slope.
        de = None if prev_e is None else eps - prev_e
        slope = slope_at(eps) if de is None or not abs(de) > 0 else (cur_c - prev_c) / de
        if not slope > 0:
            slope = slope_at(eps)
        step = eps + (target - cur_c) / max(slope, 1e-30)
        # Keep inside the bracket; bisect (geometrically on the finite side) when it escapes.
        finite_hi = math.isfinite(hi_e)
        mid = 0.5 * (lo_e + hi_e) if finite_hi else max(2 * eps, lo_e * 2 + 1e-12)
        bad = not math.isfinite(step) or step <= lo_e or (finite_hi and step >= hi_e)
        prev_e, prev_c = eps, cur_c
        eps = mid if bad else step
    return (torch.tensor([best_e], dtype=torch.float64).float(), torch.tensor([best_c], dtype=torch.float64).float(),
            evals)


def _curve_slope(curve: CETTCurve, at: torch.Tensor) -> torch.Tensor:
    """d(mean CETT)/d(eps) of the grid segment containing ``at`` (per layer)."""
    eps, cett = curve.eps.double(), curve.cett.double().cummax(dim=1).values
    k = eps.shape[1]
    hi = torch.searchsorted(eps.contiguous(), at.double().reshape(-1, 1).contiguous()).clamp(1, k - 1)
    lo = hi - 1
    de = eps.gather(1, hi) - eps.gather(1, lo)
    dc = cett.gather(1, hi) - cett.gather(1, lo)
    return (dc / de.clamp_min(1e-30)).squeeze(1)
