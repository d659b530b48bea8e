"""A faithful re-implementation of the official PPL-p% search (the slow baseline of issue 4).

Written from the description in PAPER.md Sec. 1 ("The official code's search, for
reference"), to check the project's fast search (:func:`sparsing_utils.search.search_ppl_p`)
for speed and accuracy. Only the hook plumbing (:mod:`sparsing_utils.ffn`) is shared with the
project; the search logic here is the reference's own.

The procedure
-------------
Outer loop (:func:`reference_ppl_p`): bisection on the CETT target ``c`` in ``[0, 1]``
until the interval is narrower than ``outer_tol`` (1e-6: 20 steps). Every outer step is one
*evaluation* (:func:`evaluate_cett`):

1. a dense pass over all token blocks, capturing every layer's FFN activations ``a`` (padding
   excluded) and the dense loss;
2. for every layer, the threshold search (:func:`search_layer_threshold`):

   * neuron norms ``n = |a_i| * ||W_down[:, i]||`` over all tokens x neurons (fp32);
   * 65,536 candidate thresholds spaced linearly from ``min(n)`` to the 0.99 quantile of
     ``n`` (computed exactly over all tokens x neurons, see :func:`exact_quantile`);
   * bisection over the candidate *index*: each step truncates ``D = {i : n_i <= t}``
     (``a`` masked where ``n > t``), runs one ``(tokens x d_ff) @ (d_ff x d_model)`` fp32
     product and compares the layer-mean CETT ``mean_tokens(||a_D W_down^T|| / ||a W_down^T||)``
     with ``c``: ``left, right = 0, K-1``; while ``left < right``: ``mid = (left+right)//2``;
     CETT(mid) > c -> ``right = mid``, else ``left = mid + 1``. The threshold is candidate
     ``left - 1``, i.e. (for a monotone curve) **the largest candidate whose mean CETT is
     <= c**, among candidates ``0 .. K-2`` (candidate ``K-1`` is never evaluated);

3. a sparse pass with those thresholds, measuring the PPL and the activation ratio.

The PPL ratio decides the side: ratio < 1 + p/100 -> ``lo = c``, else ``hi = c``. The answer is
the midpoint of the final interval, evaluated once more (dense pass, thresholds, sparse pass)
to report its thresholds, activation ratio and PPL ratio: 21 evaluations, 42 forward passes.

Defects of the official code, reproduced with ``faithful_defects=True`` (the default)
------------------------------------------------------------------------------------
* **Rule mismatch**: the search truncates ``n <= eps`` but the official inference rule keeps
  ``n >= eps`` (it zeroes ``n < eps``): a neuron whose norm equals the threshold is truncated
  while searching and kept at inference. With ``faithful_defects=False`` inference keeps
  ``n > eps``, the same comparison as the search (and as the project).
* **Wrap-around**: when no candidate qualifies (already the smallest candidate gives a CETT
  above ``c``), ``left`` stays 0 and ``thresholds[left - 1]`` is ``thresholds[-1]``: the last,
  *most aggressive* candidate (the 0.99 quantile). With ``faithful_defects=False`` the
  threshold is 0 instead (nothing but exact zeros truncated; CETT 0 <= c).

Deliberate differences from the official scripts (documented, not defects)
--------------------------------------------------------------------------
* Thresholds are searched once per layer on *all* tokens of the benchmark (the official
  script searches per data batch and averages the thresholds over batches); the PPL ratio is
  ``exp(mean NLL sparse - mean NLL dense)`` over all predicted tokens (the official averages
  per-batch ratios). This is what PAPER.md describes and what the project computes, so the two
  answers are comparable.
* The 0.99 quantile is exact over all tokens x neurons (the official takes
  ``torch.quantile`` of a strided subsample of ~65k norms; ``quantile="strided"`` does that).
* ``outer_tol`` is 1e-6 as PAPER.md says (one of the official scripts uses 1e-3).
* The inference comparison is done in fp32 on ``n = |a| * ||W_down[:, i]||`` (the official
  compares ``|a| < eps / ||W_down[:, i]||`` in the model's dtype).
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sparsing_utils.ffn import (
    FFNSite,
    edit_activations,
    find_ffn_sites,
    read_activations,
)

__all__ = [
    "NUM_CANDIDATES",
    "QUANTILE",
    "DenseCapture",
    "Evaluation",
    "LayerSearch",
    "ReferenceResult",
    "brute_force_index",
    "candidate_grid",
    "dense_capture",
    "evaluate_cett",
    "exact_quantile",
    "layer_cett",
    "reference_ppl_p",
    "reference_thresholds",
    "search_layer_threshold",
    "sparse_pass",
    "thresholds_from_capture",
]

NUM_CANDIDATES = 65536
QUANTILE = 0.99


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _strict_fp32():
    """fp32 products as in the official code (PyTorch's default: no TF32), whatever the caller set."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


# ---------------------------------------------------------------------------------------
# Candidate grid
# ---------------------------------------------------------------------------------------


def exact_quantile(values: torch.Tensor, q: float, *, method: str = "auto") -> torch.Tensor:
    """The ``q`` quantile of all entries of ``values`` with linear interpolation (the
    definition of ``torch.quantile``), computed by selection, so that it works on tensors far
    above ``torch.quantile``'s input-size limit (16M elements). Returns a 0-dim float32 tensor.

    ``method``: ``"kthvalue"`` (CPU default: quickselect), ``"topk"`` (CUDA default: the
    ``n - floor(q (n-1))`` largest values by the multi-block radix select of ``topk``, then the
    two smallest of those; ``kthvalue`` on CUDA selects a huge single slice with one thread block).
    """
    flat = values.reshape(-1).float()
    n = flat.numel()
    if n == 0:
        raise ValueError("quantile of an empty tensor")
    pos = q * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    if method == "auto":
        method = "topk" if flat.is_cuda else "kthvalue"
    if method == "topk":
        top = flat.topk(n - lo, largest=True, sorted=False).values  # sorted ascending: v[lo] .. v[n-1]
        two = top.topk(min(2, top.numel()), largest=False, sorted=True).values
        v_lo, v_hi = two[0], two[-1]
    elif method == "kthvalue":
        v_lo = flat.kthvalue(lo + 1).values
        v_hi = flat.kthvalue(hi + 1).values if hi != lo else v_lo
    else:
        raise ValueError(f"method must be 'auto', 'kthvalue' or 'topk', got {method!r}")
    return (v_lo + (v_hi - v_lo) * frac).float()


def candidate_grid(norms: torch.Tensor, *, num: int = NUM_CANDIDATES, q: float = QUANTILE,
                   quantile: str = "exact") -> torch.Tensor:
    """``num`` thresholds spaced linearly from the smallest neuron norm to the ``q`` quantile of
    all norms of one layer (``norms``: ``[tokens, d_ff]``). Float32, on the norms' device.

    ``quantile="exact"`` uses every entry; ``"strided"`` mimics the official code (the
    quantile of every ``max(numel // num, 1)``-th entry of the flattened norms).
    """
    flat = norms.reshape(-1)
    lo = flat.min().float()
    if quantile == "exact":
        hi = exact_quantile(flat, q)
    elif quantile == "strided":
        hi = flat[:: max(flat.numel() // num, 1)].float().quantile(q)
    else:
        raise ValueError(f"quantile must be 'exact' or 'strided', got {quantile!r}")
    return torch.linspace(float(lo), float(hi), num, dtype=torch.float32, device=flat.device)


# ---------------------------------------------------------------------------------------
# Per-layer threshold search
# ---------------------------------------------------------------------------------------


def layer_cett(a32: torch.Tensor, w_t32: torch.Tensor, norms: torch.Tensor, eps: float | torch.Tensor,
               y_norm: torch.Tensor) -> float:
    """Mean CETT of one layer at threshold ``eps`` under the *search* rule (truncate ``n <= eps``):
    one masked ``(tokens x d_ff) @ (d_ff x d_model)`` fp32 product."""
    tail = torch.where(norms > eps, torch.zeros((), dtype=a32.dtype, device=a32.device), a32)  # [tokens, d_ff]
    diff = tail @ w_t32  # [tokens, d_model]
    return float((diff.norm(dim=-1) / y_norm).mean())


@dataclass
class LayerSearch:
    """The result of one layer's threshold search."""

    threshold: float
    index: int  # chosen candidate index (K-1 after a wrap-around)
    cett: float  # mean CETT (search rule) at the chosen threshold
    wrapped: bool  # no candidate qualified (the defect: index wrapped to the last one)
    products: int  # masked products run by the bisection
    grid_lo: float
    grid_hi: float


def search_layer_threshold(a: torch.Tensor, w_t: torch.Tensor, col_norms: torch.Tensor, c: float, *,
                           num_candidates: int = NUM_CANDIDATES, q: float = QUANTILE,
                           quantile: str = "exact", faithful_defects: bool = True,
                           timings: dict | None = None) -> LayerSearch:
    """The official per-layer search: bisection over the candidate index (see the module doc).

    a: ``[tokens, d_ff]`` (any dtype; upcast to fp32); w_t: ``W_down`` transposed ``[d_ff, d_model]``;
    col_norms: ``||W_down[:, i]||`` ``[d_ff]``.
    """
    dev = a.device
    t0 = time.perf_counter()
    a32 = a.float()
    w32 = w_t.detach().to(device=dev, dtype=torch.float32)
    norms = a32.abs() * col_norms.to(device=dev, dtype=torch.float32)  # [tokens, d_ff]
    y_norm = (a32 @ w32).norm(dim=-1)  # [tokens]: ||W_down a||, the CETT denominator
    tq = time.perf_counter()
    grid = candidate_grid(norms, num=num_candidates, q=q, quantile=quantile)
    grid_cpu = grid.cpu()  # candidate values as Python floats: one transfer, not one per step
    if timings is not None:
        _sync(dev)
        timings["quantile"] = timings.get("quantile", 0.0) + time.perf_counter() - tq
    seen: dict[int, float] = {}
    left, right = 0, num_candidates - 1
    while left < right:
        mid = (left + right) // 2
        cv = layer_cett(a32, w32, norms, float(grid_cpu[mid]), y_norm)
        seen[mid] = cv
        if cv > c:
            right = mid
        else:
            left = mid + 1
    products = len(seen)
    idx = left - 1
    wrapped = idx < 0
    if wrapped and faithful_defects:
        idx = idx % num_candidates  # Python's thresholds[-1]: the most aggressive candidate
    if wrapped and not faithful_defects:
        threshold, cett, idx = 0.0, 0.0, -1
    else:
        threshold = float(grid_cpu[idx])
        # idx was evaluated by the bisection unless it wrapped (then one extra product, for the report)
        cett = seen[idx] if idx in seen else layer_cett(a32, w32, norms, threshold, y_norm)
    if timings is not None:
        _sync(dev)
        timings["search"] = timings.get("search", 0.0) + time.perf_counter() - t0
    return LayerSearch(threshold, idx, cett, wrapped, products, float(grid_cpu[0]), float(grid_cpu[-1]))


def brute_force_index(cett_values: Sequence[float] | torch.Tensor, c: float, *, faithful_defects: bool = True) -> int:
    """What the bisection returns, by definition, from the CETT of *every* candidate.

    ``j* = min{j in 0..K-2 : CETT(j) > c}`` (``K-1`` when there is none); the answer is
    ``j* - 1``, wrapped to ``K-1`` when ``j* = 0`` (``-1`` without the defect). For a monotone
    curve this is the largest candidate among ``0..K-2`` with ``CETT <= c``.
    """
    v = torch.as_tensor(cett_values, dtype=torch.float64).reshape(-1)
    k = v.numel()
    above = (v[: k - 1] > c).nonzero()
    j = int(above[0]) if above.numel() else k - 1
    idx = j - 1
    if idx < 0:
        return idx % k if faithful_defects else -1
    return idx


# ---------------------------------------------------------------------------------------
# Passes
# ---------------------------------------------------------------------------------------


def _batches(blocks, batch_size: int, device: torch.device):
    ids = blocks.input_ids
    mask = getattr(blocks, "attention_mask", None)
    if mask is None:
        mask = torch.ones_like(ids)
    for i in range(0, ids.shape[0], batch_size):
        yield ids[i:i + batch_size].to(device), mask[i:i + batch_size].to(device)


def _nll(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL over positions whose input and target are both real tokens."""
    lg = logits[:, :-1]
    target = ids[:, 1:]
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    loss = F.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), target.reshape(-1), reduction="none")
    loss = loss.view_as(target)[valid]
    return loss.double().sum(), valid.sum()


@dataclass
class DenseCapture:
    """One dense pass: every layer's activations (non-padding tokens) and the dense loss."""

    acts: list[torch.Tensor]  # per layer [tokens, d_ff], model dtype, on the model's device
    nll_sum: float
    n_predicted: int

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / max(1, self.n_predicted)

    @property
    def ppl(self) -> float:
        return math.exp(self.mean_nll)


@torch.no_grad()
def dense_capture(model: nn.Module, blocks, *, batch_size: int = 8,
                  sites: Sequence[FFNSite] | None = None) -> DenseCapture:
    """The dense pass of one evaluation: capture ``a`` of all layers and the dense loss."""
    sites = list(sites) if sites is not None else find_ffn_sites(model)
    dev = _device_of(model)
    store: list[list[torch.Tensor]] = [[] for _ in sites]
    state: dict = {}

    def read(site: FFNSite, a: torch.Tensor) -> None:
        store[site.index].append(a[state["valid"]].detach().clone())

    nll = torch.zeros((), dtype=torch.float64, device=dev)
    count = torch.zeros((), dtype=torch.float64, device=dev)
    with read_activations(model, read, sites=sites):
        for ids, mask in _batches(blocks, batch_size, dev):
            state["valid"] = mask.bool()
            out = model(input_ids=ids, attention_mask=mask, use_cache=False)
            s, n = _nll(out.logits, ids, mask)
            nll += s
            count += n
            del out
    acts = [torch.cat(x) for x in store]
    return DenseCapture(acts, float(nll), int(count))


@dataclass
class SparseStats:
    nll_sum: float
    n_predicted: int
    layer_active: list[float]  # activated fraction per layer (non-padding tokens)

    @property
    def activation_ratio(self) -> float:
        return sum(self.layer_active) / max(1, len(self.layer_active))


@torch.no_grad()
def sparse_pass(model: nn.Module, blocks, thresholds: Sequence[float], *, batch_size: int = 8,
                faithful_defects: bool = True, sites: Sequence[FFNSite] | None = None) -> SparseStats:
    """Run the model with the reference's inference rule: zero ``a_i`` where
    ``n_i < eps`` (faithful: keeps ``n >= eps``) or ``n_i <= eps`` (fixed: keeps ``n > eps``)."""
    sites = list(sites) if sites is not None else find_ffn_sites(model)
    if len(thresholds) != len(sites):
        raise ValueError(f"{len(thresholds)} thresholds for {len(sites)} FFN layers")
    dev = _device_of(model)
    col = {s.index: s.column_norms() for s in sites}  # on the device of W_down (an MoE site: its experts)
    eps = [float(t) for t in thresholds]
    active = torch.zeros(len(sites), dtype=torch.float64, device=dev)
    tokens = torch.zeros((), dtype=torch.float64, device=dev)
    state: dict = {}

    def edit(site: FFNSite, a: torch.Tensor, gate) -> torch.Tensor:
        n = a.float().abs() * col[site.index]
        keep = n >= eps[site.index] if faithful_defects else n > eps[site.index]
        active[site.index] += keep[state["valid"]].sum(dtype=torch.float64).to(dev)
        return a * keep.to(a.dtype)

    nll = torch.zeros((), dtype=torch.float64, device=dev)
    count = torch.zeros((), dtype=torch.float64, device=dev)
    with edit_activations(model, edit, sites=sites):
        for ids, mask in _batches(blocks, batch_size, dev):
            state["valid"] = mask.bool()
            tokens += mask.sum()
            out = model(input_ids=ids, attention_mask=mask, use_cache=False)
            s, n = _nll(out.logits, ids, mask)
            nll += s
            count += n
            del out
    d_ff = torch.tensor([s.d_ff for s in sites], dtype=torch.float64, device=dev)
    layer_active = (active / (tokens.clamp_min(1) * d_ff)).cpu().tolist()
    return SparseStats(float(nll), int(count), layer_active)


# ---------------------------------------------------------------------------------------
# One evaluation and the outer search
# ---------------------------------------------------------------------------------------


def thresholds_from_capture(model: nn.Module, capture: DenseCapture, c: float, *,
                            sites: Sequence[FFNSite] | None = None, num_candidates: int = NUM_CANDIDATES,
                            quantile: str = "exact", faithful_defects: bool = True,
                            timings: dict | None = None) -> list[LayerSearch]:
    """Every layer's threshold search on the activations of one dense capture."""
    sites = list(sites) if sites is not None else find_ffn_sites(model)
    out = []
    with torch.no_grad(), _strict_fp32():
        for site in sites:
            a = capture.acts[site.index]
            out.append(search_layer_threshold(a, site.weight_t(), site.column_norms().to(a.device), c,
                                              num_candidates=num_candidates, quantile=quantile,
                                              faithful_defects=faithful_defects, timings=timings))
    return out


def reference_thresholds(model: nn.Module, blocks, c: float, *, batch_size: int = 8,
                         num_candidates: int = NUM_CANDIDATES, quantile: str = "exact",
                         faithful_defects: bool = True) -> tuple[list[float], list[float], DenseCapture]:
    """The reference thresholds for a GIVEN ``c`` (one dense capture + every layer's search).

    Returns ``(thresholds [layers], layer_cett [layers], capture)``; the capture holds the
    activations, so the caller can measure other thresholds on the same tokens (free it when done).
    """
    sites = find_ffn_sites(model)
    cap = dense_capture(model, blocks, batch_size=batch_size, sites=sites)
    res = thresholds_from_capture(model, cap, c, sites=sites, num_candidates=num_candidates,
                                  quantile=quantile, faithful_defects=faithful_defects)
    return [r.threshold for r in res], [r.cett for r in res], cap


@torch.no_grad()
def capture_cett(model: nn.Module, capture: DenseCapture, thresholds: Sequence[float],
                 sites: Sequence[FFNSite] | None = None) -> list[float]:
    """Independent check: every layer's mean CETT (truncate ``n <= eps``, fp32) at given thresholds."""
    sites = list(sites) if sites is not None else find_ffn_sites(model)
    out = []
    for site in sites:  # (no_grad from the decorator; fp32 as in the search)
        a32 = capture.acts[site.index].float()
        w32 = site.weight_t().detach().to(a32.device, torch.float32)
        norms = a32.abs() * site.column_norms().to(a32.device)
        with _strict_fp32():
            out.append(layer_cett(a32, w32, norms, float(thresholds[site.index]), (a32 @ w32).norm(dim=-1)))
    return out


@dataclass
class Evaluation:
    """One outer step: dense pass, thresholds for every layer, sparse pass."""

    c: float
    ppl_ratio: float
    activation_ratio: float
    ppl_dense: float
    ppl_sparse: float
    thresholds: list[float]
    layer_cett: list[float]
    layer_activation_ratio: list[float]
    wrapped_layers: list[int]
    products: int
    seconds: dict


def evaluate_cett(model: nn.Module, blocks, c: float, *, batch_size: int = 8,
                  num_candidates: int = NUM_CANDIDATES, quantile: str = "exact",
                  faithful_defects: bool = True, sites: Sequence[FFNSite] | None = None) -> Evaluation:
    """One evaluation at ``c``: everything from scratch (dense pass, search, sparse pass)."""
    sites = list(sites) if sites is not None else find_ffn_sites(model)
    dev = _device_of(model)
    times: dict = {}
    _sync(dev)
    t0 = time.perf_counter()
    cap = dense_capture(model, blocks, batch_size=batch_size, sites=sites)
    _sync(dev)
    t1 = time.perf_counter()
    res = thresholds_from_capture(model, cap, c, sites=sites, num_candidates=num_candidates, quantile=quantile,
                                  faithful_defects=faithful_defects, timings=times)
    ppl_dense, dense_nll = cap.ppl, cap.mean_nll
    del cap
    _sync(dev)
    t2 = time.perf_counter()
    thresholds = [r.threshold for r in res]
    st = sparse_pass(model, blocks, thresholds, batch_size=batch_size, faithful_defects=faithful_defects,
                     sites=sites)
    _sync(dev)
    t3 = time.perf_counter()
    sparse_nll = st.nll_sum / max(1, st.n_predicted)
    return Evaluation(
        c=float(c), ppl_ratio=math.exp(sparse_nll - dense_nll), activation_ratio=st.activation_ratio,
        ppl_dense=ppl_dense, ppl_sparse=math.exp(sparse_nll), thresholds=thresholds,
        layer_cett=[r.cett for r in res], layer_activation_ratio=st.layer_active,
        wrapped_layers=[i for i, r in enumerate(res) if r.wrapped], products=sum(r.products for r in res),
        seconds={"dense": t1 - t0, "thresholds": t2 - t1, "quantile": times.get("quantile", 0.0),
                 "sparse": t3 - t2})


@dataclass
class ReferenceResult:
    """The reference PPL-p% answer and what it cost."""

    p: float
    cett: float
    activation_ratio: float
    ppl_dense: float
    ppl_sparse: float
    ppl_ratio: float
    thresholds: list[float]
    layer_cett: list[float]
    layer_activation_ratio: list[float]
    outer_steps: int
    evaluations: int
    forward_passes: int
    products: int
    seconds: float
    seconds_breakdown: dict
    wrapped_layers: list[int]
    faithful_defects: bool
    outer_tol: float
    num_candidates: int
    history: list[dict] = field(default_factory=list)  # (c, ppl_ratio, activation_ratio) per step

    def to_dict(self) -> dict:
        return asdict(self)


def reference_ppl_p(model: nn.Module, blocks, p: float, *, outer_tol: float = 1e-6, batch_size: int = 8,
                    num_candidates: int = NUM_CANDIDATES, quantile: str = "exact",
                    faithful_defects: bool = True, max_steps: int = 64,
                    log: Callable[[str], None] | None = None) -> ReferenceResult:
    """The official outer search: bisection on ``c`` in [0, 1] down to ``outer_tol``, every step
    a full evaluation (dense pass, per-layer searches, sparse pass), then one more evaluation
    at the midpoint of the final interval (the answer)."""
    if not 0 < p < 100:
        raise ValueError(f"p must be a percentage in (0, 100), got {p!r}")
    sites = find_ffn_sites(model)
    target = 1.0 + p / 100.0
    dev = _device_of(model)
    _sync(dev)
    start = time.perf_counter()
    lo, hi = 0.0, 1.0
    history: list[dict] = []
    totals = {"dense": 0.0, "thresholds": 0.0, "quantile": 0.0, "sparse": 0.0}
    products = 0
    kw = {"batch_size": batch_size, "num_candidates": num_candidates, "quantile": quantile,
          "faithful_defects": faithful_defects, "sites": sites}

    def record(ev: Evaluation) -> None:
        nonlocal products
        for k in totals:
            totals[k] += ev.seconds.get(k, 0.0)
        products += ev.products
        history.append({"c": ev.c, "ppl_ratio": ev.ppl_ratio, "activation_ratio": ev.activation_ratio,
                        "wrapped_layers": len(ev.wrapped_layers)})
        if log is not None:
            log(f"reference step {len(history):2d}: c={ev.c:.7f} PPL ratio {ev.ppl_ratio:.5f} "
                f"activation {ev.activation_ratio:.4f} ({sum(ev.seconds.values()) - ev.seconds['quantile']:.2f} s)")

    steps = 0
    while hi - lo > outer_tol and steps < max_steps:
        c = (lo + hi) / 2
        ev = evaluate_cett(model, blocks, c, **kw)
        record(ev)
        steps += 1
        if ev.ppl_ratio < target:
            lo = c
        else:
            hi = c
    c = (lo + hi) / 2
    final = evaluate_cett(model, blocks, c, **kw)
    record(final)
    _sync(dev)
    elapsed = time.perf_counter() - start
    return ReferenceResult(
        p=float(p), cett=c, activation_ratio=final.activation_ratio, ppl_dense=final.ppl_dense,
        ppl_sparse=final.ppl_sparse, ppl_ratio=final.ppl_ratio, thresholds=final.thresholds,
        layer_cett=final.layer_cett, layer_activation_ratio=final.layer_activation_ratio, outer_steps=steps,
        evaluations=steps + 1, forward_passes=2 * (steps + 1), products=products, seconds=elapsed,
        seconds_breakdown=totals, wrapped_layers=final.wrapped_layers, faithful_defects=faithful_defects,
        outer_tol=outer_tol, num_candidates=num_candidates, history=history)
