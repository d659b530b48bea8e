"""PPL-p% sparsity (Luo et al. 2024, Sec. 3.1 and Algorithm 1; PAPER.md Sec. 1).

Data flow: token blocks -> one dense pass (dense PPL; each layer's CETT curve on a grid of
thresholds, estimated on the first tokens through a random projection of ``W_down``; in memory mode the
activations ``a`` of every layer) -> an outer search on the CETT target ``c`` (a log-log
secant on the monotone PPL-vs-CETT relation; each step: exact thresholds from the curve
by a few secant steps on all tokens, then one sparse pass) -> :class:`PPLPResult`.

Two modes: ``"memory"`` keeps every layer's ``a`` (fastest; memory grows with layers x
tokens); ``"stream"`` keeps nothing and recomputes the dense pass whenever exact CETT
statistics are needed, accumulating them chunk by chunk inside the hooks (peak memory does
not grow with layers x tokens). Under ``torch.distributed`` every sum (losses, token counts,
histograms, CETT sums) is all-reduced, so each rank can hold a different shard of blocks.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import __version__
from .cett import (CETTCurve, NormHistogram, cett_statistics, interpolate_thresholds, neuron_norms,
                   refine_thresholds, sketch_weight)
from .ffn import FFNSite, find_ffn_sites, read_activations
from .jsonio import atomic_write_json
from .rules import CETTRule, SparsityRule, apply_rule

__all__ = [
    "SparsityProbe",
    "PassStats",
    "PPLPResult",
    "CheckpointResult",
    "SparsityReport",
    "search_ppl_p",
    "search_checkpoints",
    "pareto_sweep",
    "sparse_inference",
    "atomic_write_json",
]

log = logging.getLogger(__name__)

# Activation-ratio levels at which each layer's CETT curve is sampled (geometric, 0.2%..98%).
DEFAULT_LEVELS = tuple(float(x) for x in torch.logspace(math.log10(0.002), math.log10(0.98), 24))


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def _rows(x: torch.Tensor, state: dict) -> torch.Tensor:
    """The non-padding positions of ``x [batch, seq, ...]`` as ``[tokens, ...]`` (a view when the
    batch has no padding, which avoids a copy and a device synchronisation)."""
    return x.reshape(-1, *x.shape[2:]) if state["all_valid"] else x[state["valid"].to(x.device)]


def _batch_state(state: dict, mask: torch.Tensor) -> None:
    state["valid"] = mask.bool()
    state["all_valid"] = bool(state["valid"].all())


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass
class PassStats:
    """One forward pass over all blocks (dense or sparse)."""

    nll_sum: float
    n_predicted: int
    layer_active: torch.Tensor | None = None  # [layers] activated fraction
    layer_token_active: torch.Tensor | None = None  # [layers, tokens] activated fraction (float16)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / max(1, self.n_predicted))

    @property
    def activation_ratio(self) -> float:
        return float(self.layer_active.mean()) if self.layer_active is not None else 1.0

    @property
    def token_active(self) -> torch.Tensor | None:  # [tokens]
        return None if self.layer_token_active is None else self.layer_token_active.float().mean(dim=0)


class SparsityProbe:
    """One model on one set of token blocks: the dense pass is computed once, here.

    Parameters: ``blocks`` is a :class:`~sparsing_utils.corpora.TokenBlocks` (or anything with
    ``input_ids`` and ``attention_mask`` ``[n_blocks, block_len]``); ``mode`` is ``"memory"``
    or ``"stream"``. The CETT curves that guide the exact threshold search are estimated on the
    first ``curve_tokens`` tokens, through a ``sketch_dim``-dimensional random projection.
    """

    def __init__(self, model: nn.Module, blocks, *, mode: str = "memory", batch_size: int | None = None,
                 sketch_dim: int = 64, curve_tokens: int = 1024, levels: Sequence[float] = DEFAULT_LEVELS, progress: bool = False,
                 name: str = "model", sites: Sequence[FFNSite] | None = None,
                 calibration: "SparsityProbe | None" = None):
        if mode not in ("memory", "stream"):
            raise ValueError(f"mode must be 'memory' or 'stream', got {mode!r}")
        self.model = model
        self.name = name
        # Thresholds calibrated on other blocks of the same model (PPL measured on these).
        if calibration is not None and calibration.model is not model:
            raise ValueError("the calibration probe must wrap the same model object")
        self.calibration = calibration
        self.mode = mode
        self.progress = progress
        self.sites = list(sites) if sites is not None else find_ffn_sites(model)
        self.device = _model_device(model)
        ids = blocks.input_ids
        mask = getattr(blocks, "attention_mask", None)
        if mask is None:
            mask = torch.ones_like(ids)
        if ids.dim() != 2 or ids.shape[1] < 2:
            raise ValueError(f"token blocks must be [n_blocks, block_len >= 2], got {tuple(ids.shape)}")
        self.input_ids, self.attention_mask = ids, mask
        block_len = ids.shape[1]
        if batch_size is None:
            budget = 32768 if self.device.type == "cuda" else 4096
            batch_size = max(1, budget // block_len)
        self.batch_size = int(batch_size)
        self.sketch_dim = int(sketch_dim)
        self.curve_tokens = int(curve_tokens)
        self.levels = torch.tensor(sorted(levels), dtype=torch.float64)
        self.col_norms = [s.column_norms().to(s.module.weight.device) for s in self.sites]
        self.dense: PassStats | None = None
        self.curve: CETTCurve | None = None
        self.n_tokens = int(_all_reduce(mask.sum().to(torch.float64).to(self.device)).item())
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            fewest = torch.tensor(float(ids.shape[0]), device=self.device)
            dist.all_reduce(fewest, op=dist.ReduceOp.MIN)
            if fewest.item() < 1:  # a rank without blocks would wait forever in the hooks' all-reduces
                raise ValueError(f"a process has no token blocks ({dist.get_world_size()} processes): "
                                 "use more blocks or fewer processes")
        self._acts: list[torch.Tensor] | None = None  # memory mode: [tokens, d_ff] per layer
        self._ynorm: list[torch.Tensor] | None = None  # memory mode: [tokens] per layer
        self.sparse_passes = 0
        self.dense_passes = 0
        self.cett_evaluations = 0
        self._threshold_cache: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
        self._exact_points: list[tuple[torch.Tensor, torch.Tensor]] = []

    # -- passes ---------------------------------------------------------------------------
    def _batches(self, blocks: Sequence[int] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = list(range(self.input_ids.shape[0])) if blocks is None else list(blocks)
        for i in range(0, len(idx), self.batch_size):
            sel = idx[i:i + self.batch_size]
            yield (self.input_ids[sel].to(self.device, non_blocking=True),
                   self.attention_mask[sel].to(self.device, non_blocking=True))

    def _progress(self, desc: str, blocks: Sequence[int] | None = None):
        n = self.input_ids.shape[0] if blocks is None else len(blocks)
        total = math.ceil(n / self.batch_size)
        if not self.progress:
            return None
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, leave=False)

    @torch.no_grad()
    def _run(self, desc: str, blocks: Sequence[int] | None = None, on_batch=None,
             compute_loss: bool = True) -> tuple[float, int]:
        """Forward over blocks; ``on_batch(mask)`` is called before each forward."""
        nll = torch.zeros((), dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        bar = self._progress(desc, blocks)
        try:
            for ids, mask in self._batches(blocks):
                if on_batch is not None:
                    on_batch(mask)
                out = self.model(input_ids=ids, attention_mask=mask, use_cache=False)
                if compute_loss:
                    logits = out.logits[:, :-1]  # [batch, seq-1, vocab]
                    target = ids[:, 1:]
                    valid = (mask[:, 1:] * mask[:, :-1]).bool()
                    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                                           reduction="none").view_as(target)
                    loss = torch.where(valid, loss, torch.zeros_like(loss))
                    if not torch.isfinite(loss).all():
                        raise FloatingPointError(
                            f"non-finite loss in the {desc} pass of {self.name}: the model produces NaN/inf "
                            "on this text; load it in float32 (dtype='float32') or check the input ids")
                    nll += loss.double().sum().to(self.device)  # the head may sit on another GPU
                    count += valid.sum().to(self.device)
                del out
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        _all_reduce(nll)
        _all_reduce(count)
        return float(nll), int(count)

    def prepare(self) -> "SparsityProbe":
        """The dense pass (once): dense PPL, norm histograms, stored activations (memory
        mode), then the per-layer CETT curves on the subsample of blocks. With a calibration
        probe, only the dense PPL is computed here; thresholds come from the calibration."""
        if self.dense is not None:
            return self
        if self.calibration is not None:
            self.calibration.prepare()
            nll, count = self._run(f"dense pass ({self.name})")
            self.dense_passes += 1
            if count == 0:
                raise ValueError("no predicted tokens: every block is padding or shorter than 2 tokens")
            self.dense = PassStats(nll, count)
            self.curve = self.calibration.curve
            return self
        layers = len(self.sites)
        acts: list[list[torch.Tensor]] = [[] for _ in self.sites]
        ynorms: list[list[torch.Tensor]] = [[] for _ in self.sites]
        cett_sum = torch.zeros(layers, len(self.levels) + 1, dtype=torch.float64, device=self.device)
        active_sum = torch.zeros_like(cett_sum)
        tokens = torch.zeros(layers, 1, dtype=torch.float64, device=self.device)
        grids: dict[int, torch.Tensor] = {}
        sketches = {s.index: sketch_weight(s.weight_t().detach(), self.sketch_dim, seed=s.index) for s in self.sites}
        state = {}
        finite = torch.ones(layers, dtype=torch.bool, device=self.device)  # checked after the pass

        def on_batch(mask):
            _batch_state(state, mask)

        def read(site: FFNSite, a: torch.Tensor, y: torch.Tensor):
            i = site.index
            av = _rows(a, state)  # [tokens, d_ff]
            finite[i] &= torch.isfinite(av).all().to(self.device)
            yn = _rows(y, state).float().norm(dim=-1)  # [tokens]
            if i not in grids:  # the first batch places the grid (quantiles of its norms)
                grids[i] = self._grid(i, av[: self.curve_tokens])
            room = self.curve_tokens - int(tokens[i])
            if room > 0:
                c, act = cett_statistics(av[:room], sketches[i], self.col_norms[i], grids[i], yn[:room])
                cett_sum[i] += c.to(self.device)
                active_sum[i] += act.to(self.device)
                tokens[i] += min(room, av.shape[0])
            if self.mode == "memory":
                acts[i].append(av)
                ynorms[i].append(yn)

        def check_activations():
            if not bool(finite.all()):
                bad = self.sites[int((~finite).nonzero()[0])].name
                raise FloatingPointError(f"non-finite FFN activations at {bad}: the model produces NaN/inf on "
                                         "this input; load it in float32 (dtype='float32') or check the input ids")

        try:
            with read_activations(self.model, read, sites=self.sites, with_output=True):
                nll, count = self._run(f"dense pass ({self.name})", on_batch=on_batch)
        except FloatingPointError:
            check_activations()  # name the first layer that went non-finite, if one did
            raise
        self.dense_passes += 1
        check_activations()
        if count == 0:
            raise ValueError("no predicted tokens: every block is padding or shorter than 2 tokens")
        self.dense = PassStats(nll, count)
        if self.mode == "memory":
            self._acts = [torch.cat(x) for x in acts]
            self._ynorm = [torch.cat(x) for x in ynorms]
        for t in (cett_sum, active_sum, tokens):
            _all_reduce(t)
        grid = torch.stack([grids[s.index].to(self.device) for s in self.sites])  # [layers, K+1]
        d_ff = torch.tensor([s.d_ff for s in self.sites], dtype=torch.float64, device=self.device)[:, None]
        tokens = tokens.clamp_min(1)
        self.curve = CETTCurve(grid.float().cpu(), (cett_sum / tokens).float().cpu(),
                               (active_sum / (tokens * d_ff)).float().cpu())
        return self

    def _grid(self, layer: int, a: torch.Tensor) -> torch.Tensor:
        """Candidate thresholds of one layer: 0, then the norm quantiles at which the
        activation ratio is each of ``levels`` (ascending), from one batch of activations
        (identical on every process under torch.distributed)."""
        hist = NormHistogram(1, device=a.device)
        hist.add(0, neuron_norms(a, self.col_norms[layer]))
        hist.all_reduce()
        q = hist.quantiles(1 - self.levels)[0].sort().values  # [K]
        return torch.cat([torch.zeros(1, device=q.device), q])

    def _statistics(self, eps: torch.Tensor, *, active_layers: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Exact CETT and activation sums at per-layer thresholds ``eps [layers, M]``.

        Returns ``(cett_sum [layers, M], active_sum [layers, M], tokens [layers, 1])`` (float64,
        CPU, all-reduced). Memory mode reads the stored activations; stream mode runs a dense
        pass and accumulates chunk by chunk inside the hooks.
        """
        layers, m = eps.shape
        cett_sum = torch.zeros(layers, m, dtype=torch.float64, device=self.device)
        active_sum = torch.zeros_like(cett_sum)
        tokens = torch.zeros(layers, 1, dtype=torch.float64, device=self.device)
        todo = active_layers if active_layers is not None else torch.ones(layers, dtype=torch.bool)
        self.cett_evaluations += 1
        if self.mode == "memory":
            for site in self.sites:
                i = site.index
                if not bool(todo[i]):
                    continue
                a, yn = self._acts[i], self._ynorm[i]
                c, act = cett_statistics(a, site.weight_t().detach(), self.col_norms[i], eps[i].to(a.device), yn)
                cett_sum[i] += c.to(self.device)
                active_sum[i] += act.to(self.device)
                tokens[i] += a.shape[0]
        else:
            state = {}

            def on_batch(mask):
                _batch_state(state, mask)

            def read(site: FFNSite, a: torch.Tensor, y: torch.Tensor):
                i = site.index
                if not bool(todo[i]):
                    return
                av = _rows(a, state)
                c, act = cett_statistics(av, site.weight_t().detach(), self.col_norms[i], eps[i].to(av.device),
                                         _rows(y, state).float().norm(dim=-1))
                cett_sum[i] += c.to(self.device)
                active_sum[i] += act.to(self.device)
                tokens[i] += av.shape[0]

            with read_activations(self.model, read, sites=self.sites, with_output=True):
                self._run(f"CETT statistics ({self.name})", on_batch=on_batch, compute_loss=False)
            self.dense_passes += 1
        for t in (cett_sum, active_sum, tokens):
            _all_reduce(t)
        return cett_sum.cpu(), active_sum.cpu(), tokens.clamp_min(1).cpu()

    def layer_cett(self, eps: torch.Tensor) -> torch.Tensor:
        """Exact mean CETT of each layer at thresholds ``eps [layers]`` on all tokens."""
        self.prepare()
        if self.calibration is not None:
            return self.calibration.layer_cett(eps)
        s, _, t = self._statistics(eps.reshape(-1, 1).float())
        return (s / t).squeeze(1).float()

    def thresholds_for(self, c: float, *, exact: bool = True, tol: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-layer thresholds whose mean CETT is ``c``: ``(eps [layers], cett [layers])``.

        ``exact=False`` interpolates the CETT curve (its CETT column is then ``c``, an
        estimate); ``exact=True`` refines on all tokens until every layer is within ``tol``.
        Every exact evaluation is kept and merged into the curve, so later targets near
        earlier ones start from a close guess and usually need a single check.
        """
        self.prepare()
        if self.calibration is not None:
            return self.calibration.thresholds_for(c, exact=exact, tol=tol)
        if not exact:
            eps = interpolate_thresholds(self._known_curve(), c)
            return eps, torch.full_like(eps, float(c))
        key = round(float(c), 12)
        if key in self._threshold_cache:
            return self._threshold_cache[key]
        seen_e: list[torch.Tensor] = []
        seen_c: list[torch.Tensor] = []

        def evaluate(eps: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
            s, _, t = self._statistics(eps.reshape(-1, 1), active_layers=active.cpu())
            cett = (s / t).squeeze(1)
            seen_e.append(torch.where(active.cpu(), eps.cpu(), torch.nan))
            seen_c.append(torch.where(active.cpu(), cett.float(), torch.nan))
            return cett

        eps, cett, _ = refine_thresholds(evaluate, self._known_curve(), float(c), tol=tol)
        self._exact_points.extend(zip(seen_e, seen_c))
        self._threshold_cache[key] = (eps, cett)
        return eps, cett

    def _known_curve(self) -> CETTCurve:
        """The subsample curve plus every exact (all-token) evaluation made so far."""
        if not self._exact_points:
            return self.curve
        e = torch.stack([p[0] for p in self._exact_points], dim=1)  # [layers, M]
        c = torch.stack([p[1] for p in self._exact_points], dim=1)
        # Layers not evaluated at a point repeat a grid point (no information added).
        missing = torch.isnan(e)
        e = torch.where(missing, self.curve.eps[:, :1].expand_as(e), e)
        c = torch.where(missing, self.curve.cett[:, :1].expand_as(c), c)
        return self.curve.add_points(e, c)

    def sparse_pass(self, rule: SparsityRule, *, per_token: bool = True) -> PassStats:
        """Run the model with ``rule`` applied: PPL and activation ratios (padding excluded)."""
        self.prepare()
        layers = len(self.sites)
        active = torch.zeros(layers, dtype=torch.float64, device=self.device)
        local_tokens = int(self.attention_mask.sum())
        per_tok = torch.zeros(layers, local_tokens, dtype=torch.float32, device=self.device) if per_token else None
        state = {"next": 0}  # per-token columns of the current batch: [start, next)

        def on_batch(mask):
            _batch_state(state, mask)
            state["start"] = state["next"]
            state["next"] = state["start"] + int(mask.sum())

        def record(site: FFNSite, keep: torch.Tensor):
            counts = _rows(keep.sum(dim=-1, dtype=torch.float32), state).to(self.device)  # [tokens]
            active[site.index] += counts.sum(dtype=torch.float64)
            if per_tok is not None:
                per_tok[site.index, state["start"]:state["next"]] = counts / site.d_ff

        # NaN/inf shows in the loss, which _run checks: no per-layer synchronisation here.
        with apply_rule(self.model, rule, sites=self.sites, record=record, check_finite=False):
            nll, count = self._run(f"sparse pass ({self.name})", on_batch=on_batch)
        self.sparse_passes += 1
        _all_reduce(active)
        d_ff = torch.tensor([s.d_ff for s in self.sites], dtype=torch.float64, device=self.device)
        layer_active = (active / (self.n_tokens * d_ff)).float().cpu()
        return PassStats(nll, count, layer_active, per_tok.half().cpu() if per_tok is not None else None)

    def activations(self, layer: int) -> torch.Tensor:
        """The stored dense activations ``a`` of one layer, ``[tokens, d_ff]`` (memory mode)."""
        self.prepare()
        if self._acts is None:
            raise ValueError("activations are kept only in memory mode (mode='memory'), before release()")
        return self._acts[layer]

    def release(self) -> None:
        """Drop the stored activations (memory mode)."""
        self._acts = self._ynorm = None


# ---------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------


@dataclass
class PPLPResult:
    """PPL-p% sparsity of one model (PAPER.md Sec. 1): the CETT target ``c`` whose sparse PPL is
    ``(1 + p/100)`` times the dense PPL, and the activation ratios at that point."""

    p: float
    cett: float
    activation_ratio: float
    ppl_dense: float
    ppl_sparse: float
    ppl_ratio: float
    thresholds: list[float]
    layer_activation_ratio: list[float]
    layer_cett: list[float]
    token_activation_ratio: list[float] = field(default_factory=list)
    converged: bool = True
    message: str = ""
    sparse_passes: int = 0
    seconds: float = 0.0

    @property
    def sparsity_ratio(self) -> float:
        return 1.0 - self.activation_ratio

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CheckpointResult:
    """Algorithm 1: one CETT for a list of checkpoints so that their *mean* PPL ratio is 1+p%."""

    p: float
    cett: float
    mean_ppl_ratio: float
    checkpoints: list[PPLPResult]
    names: list[str]
    converged: bool = True
    message: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["checkpoints"] = [c.to_dict() for c in self.checkpoints]
        return d


@dataclass
class SparsityReport:
    """Everything a PPL-p% measurement produced; saves to JSON atomically and loads back."""

    model: dict
    text: dict
    results: list[PPLPResult]
    ppl_dense: float
    seed: int = 0
    version: str = __version__
    device: str = "cpu"
    dtype: str = "float32"
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def result(self, p: float) -> PPLPResult:
        for r in self.results:
            if abs(r.p - p) < 1e-9:
                return r
        raise KeyError(f"no result for p={p}; available: {[r.p for r in self.results]}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["results"] = [r.to_dict() for r in self.results]
        return d

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SparsityReport":
        with open(path) as f:
            d = json.load(f)
        d["results"] = [PPLPResult(**r) for r in d["results"]]
        return cls(**d)

    def table(self) -> str:
        head = f"{'p%':>5} {'CETT':>8} {'act. ratio':>10} {'PPL dense':>10} {'PPL sparse':>10} {'ratio':>8} ok"
        rows = [head]
        for r in self.results:
            rows.append(f"{r.p:>5g} {r.cett:>8.4f} {r.activation_ratio:>10.4f} {r.ppl_dense:>10.4f} "
                        f"{r.ppl_sparse:>10.4f} {r.ppl_ratio:>8.4f} {'yes' if r.converged else 'NO: ' + r.message}")
        return "\n".join(rows)

    def dataframe(self):
        import pandas as pd

        return pd.DataFrame([{k: v for k, v in r.to_dict().items() if not isinstance(v, list)}
                             for r in self.results])


# ---------------------------------------------------------------------------------------
# The search on c (Algorithm 1)
# ---------------------------------------------------------------------------------------


class _Evaluations:
    """Evaluated points (c, mean PPL ratio) of a list of probes, shared across p values."""

    def __init__(self, probes: Sequence[SparsityProbe]):
        self.probes = list(probes)
        self.table: dict[float, tuple[float, list[PassStats], list[torch.Tensor], list[torch.Tensor]]] = {}

    def ratio(self, c: float) -> float:
        if c not in self.table:
            stats, eps_list, cetts = [], [], []
            for probe in self.probes:
                eps, cett = probe.thresholds_for(c)
                stats.append(probe.sparse_pass(CETTRule(eps)))
                eps_list.append(eps)
                cetts.append(cett)
            r = sum(s.ppl / pr.dense.ppl for s, pr in zip(stats, self.probes)) / len(stats)
            log.info("CETT %.6g: mean PPL ratio %.5f, activation ratio %.4f", c, r,
                     sum(s.activation_ratio for s in stats) / len(stats))
            self.table[c] = (r, stats, eps_list, cetts)
        return self.table[c][0]


def _log_excess(r: float) -> float:
    return math.log(max(r - 1.0, 1e-7))


def _loglog_slope(points: list[tuple[float, float]], target: float) -> float:
    """Slope of log(ratio - 1) against log(c), by least squares over the evaluated points whose
    excess is at least a quarter of the target's (below that the PPL ratio is mostly noise);
    3 when fewer than two such points (PPL excess grows about like c^3 in the models tried)."""
    want = target - 1.0
    xy = [(math.log(c), math.log(r - 1.0)) for c, r in points if r - 1.0 >= 0.25 * want]
    if len(xy) >= 2:
        mx = sum(x for x, _ in xy) / len(xy)
        my = sum(y for _, y in xy) / len(xy)
        sxx = sum((x - mx) ** 2 for x, _ in xy)
        if sxx > 1e-12:
            slope = sum((x - mx) * (y - my) for x, y in xy) / sxx
            if 0.5 < slope < 10:
                return slope
    return 3.0


def _next_c(points: list[tuple[float, float]], target: float, c_max: float) -> float | None:
    """Next CETT to try on the monotone (but bumpy) PPL-vs-CETT relation.

    Newton-like step in log-log space from the evaluated point nearest the target, with the
    slope fitted to all useful points (:func:`_loglog_slope`); kept strictly inside the
    bracket (else the bracket's log-midpoint), and at most a factor 10 per step outside one.
    """
    below = [(c, r) for c, r in points if r < target]
    above = [(c, r) for c, r in points if r >= target]
    y_star = math.log(target - 1.0)
    positive = [(c, r) for c, r in points if r > 1.0]
    if not positive:  # no measurable degradation yet: step up a lot
        c = max(c for c, _ in points)
        return None if c >= c_max else min(c_max, 4.0 * c)
    c0, r0 = min(positive, key=lambda cr: abs(_log_excess(cr[1]) - y_star))
    x = math.log(c0) + (y_star - _log_excess(r0)) / _loglog_slope(points, target)
    if below and above:
        x0, x1 = math.log(max(below)[0]), math.log(min(above)[0])
        if x1 - x0 < 1e-9:
            return None
        margin = 0.05 * (x1 - x0)
        if not x0 + margin <= x <= x1 - margin:
            x = 0.5 * (x0 + x1)
        return math.exp(x)
    x = max(math.log(c0) - math.log(10.0), min(math.log(c0) + math.log(10.0), x))
    if below and x <= math.log(max(below)[0]):
        x = math.log(max(below)[0]) + math.log(1.5)
    if above and x >= math.log(min(above)[0]):
        x = math.log(min(above)[0]) - math.log(1.5)
    c = math.exp(x)
    if below and max(below)[0] >= c_max:
        return None
    return min(c_max, c)


def search_ppl_p(probes: SparsityProbe | Sequence[SparsityProbe], p: float, *, tol: float = 1e-3,
                 c_start: float = 0.1, c_max: float = 0.999, max_steps: int = 24,
                 evaluations: _Evaluations | None = None) -> PPLPResult | CheckpointResult:
    """Find the CETT ``c`` at which the (mean) sparse/dense PPL ratio is ``1 + p/100``.

    One probe: returns a :class:`PPLPResult`. A list of probes (checkpoints of one training
    run): one ``c`` for all, so that the *average* PPL ratio is ``1 + p/100`` (Algorithm 1),
    returned as a :class:`CheckpointResult`. ``tol`` is on the ratio (1e-3 = 0.1 percentage
    point). Every step uses exact thresholds (each layer's mean CETT within 1e-4 of ``c``
    on all tokens), found from the CETT curves plus the exact points of earlier steps.
    """
    if not (isinstance(p, (int, float)) and 0 < p < 100 and math.isfinite(p)):
        raise ValueError(f"p must be a percentage in (0, 100), got {p!r} (e.g. 1 for PPL-1%)")
    single = isinstance(probes, SparsityProbe)
    plist = [probes] if single else list(probes)
    if not plist:
        raise ValueError("no model to search: pass a probe or a non-empty list of probes")
    start = time.perf_counter()
    for probe in plist:
        probe.prepare()
    ev = evaluations if evaluations is not None else _Evaluations(plist)
    target = 1.0 + p / 100.0
    passes_before = sum(pr.sparse_passes for pr in plist)

    pts = [(c, v[0]) for c, v in ev.table.items()]
    if not pts:
        pts.append((c_start, ev.ratio(c_start)))
    best = min(pts, key=lambda cr: abs(cr[1] - target))
    ok, msg = False, ""
    for _ in range(max_steps):
        if abs(best[1] - target) <= tol:
            break
        c = _next_c(pts, target, c_max)
        if c is None or any(abs(c - q) <= 1e-12 * max(1.0, q) for q, _ in pts):
            break
        pts.append((c, ev.ratio(c)))
        best = min(pts, key=lambda cr: abs(cr[1] - target))
    if abs(best[1] - target) <= tol:
        ok = True
    elif not [r for _, r in pts if r >= target]:
        top = max(pts)
        msg = f"PPL ratio {target:.4f} not reachable: at CETT {top[0]:.4g} the ratio is only {top[1]:.4f}"
    elif not [r for _, r in pts if r < target]:
        low = min(pts)
        msg = f"PPL ratio {target:.4f} not reachable: already {low[1]:.4f} at CETT {low[0]:.3g}"
    else:
        msg = (f"stopped at ratio {best[1]:.5f} (target {target:.5f}, tolerance {tol}): the PPL ratio jumps "
               "across the target between neighbouring CETT values; use more tokens")
    c_final = best[0]
    r, stats, eps_list, cetts = ev.table[c_final]
    elapsed = time.perf_counter() - start
    passes = sum(pr.sparse_passes for pr in plist) - passes_before
    results = []
    for probe, s, eps, cett in zip(plist, stats, eps_list, cetts):
        results.append(PPLPResult(
            p=float(p), cett=float(c_final), activation_ratio=s.activation_ratio, ppl_dense=probe.dense.ppl,
            ppl_sparse=s.ppl, ppl_ratio=s.ppl / probe.dense.ppl, thresholds=eps.tolist(),
            layer_activation_ratio=s.layer_active.tolist(), layer_cett=cett.tolist(),
            token_activation_ratio=s.token_active.tolist() if s.token_active is not None else [],
            converged=ok, message=msg, sparse_passes=passes, seconds=elapsed))
    if single:
        return results[0]
    return CheckpointResult(p=float(p), cett=float(c_final), mean_ppl_ratio=r, checkpoints=results,
                            names=[pr.name for pr in plist], converged=ok, message=msg)


def search_checkpoints(probes: Sequence[SparsityProbe], p: float = 1.0, **kw) -> CheckpointResult:
    """Algorithm 1 over a training run's checkpoints (one probe each); see :func:`search_ppl_p`."""
    return search_ppl_p(list(probes), p, **kw)


def pareto_sweep(probe: SparsityProbe, rule: str, values: Sequence[float] | None = None, **rule_kw):
    """PPL against activation ratio for one rule family (the Fig. 3 comparison).

    rule: ``"cett"`` (values = CETT targets, exact thresholds), ``"topk"`` (values = kept
    ratios; ``scope="global"`` for the official variant), ``"fat"`` (values = eps),
    ``"relu"`` (one point). Returns a pandas DataFrame with columns rule, value,
    activation_ratio, ppl, ppl_ratio.
    """
    import pandas as pd

    from .rules import FATRule, ReLURule, TopKRule

    probe.prepare()
    rows = []
    if rule == "relu":
        values = [0.0]
    if values is None or len(values) == 0:
        raise ValueError(f"pareto_sweep({rule!r}) needs a list of values")
    for v in values:
        if rule == "cett":
            r = CETTRule(probe.thresholds_for(float(v))[0])
        elif rule == "topk":
            r = TopKRule(float(v), **rule_kw)
        elif rule == "fat":
            r = FATRule(float(v))
        elif rule == "relu":
            r = ReLURule()
        else:
            raise ValueError(f"unknown rule {rule!r}: use 'cett', 'topk', 'fat' or 'relu'")
        s = probe.sparse_pass(r, per_token=False)
        rows.append({"rule": r.name, "value": float(v), "activation_ratio": s.activation_ratio, "ppl": s.ppl,
                     "ppl_ratio": s.ppl / probe.dense.ppl})
    return pd.DataFrame(rows)


@contextlib.contextmanager
def sparse_inference(model: nn.Module, result: PPLPResult | SparsityReport | Sequence[float], *,
                     p: float | None = None) -> Iterator[CETTRule]:
    """Run ``model`` sparsely with the thresholds of a PPL-p% result (what evaluation uses).

    ``result`` may be a :class:`PPLPResult`, a :class:`SparsityReport` (then ``p`` picks the
    result; default: the only one), or a list of per-layer thresholds.
    """
    if isinstance(result, SparsityReport):
        if p is None:
            if len(result.results) != 1:
                raise ValueError(f"the report holds p = {[r.p for r in result.results]}: pass p=...")
            result = result.results[0]
        else:
            result = result.result(p)
    thresholds = result.thresholds if isinstance(result, PPLPResult) else list(result)
    sites = find_ffn_sites(model)
    if len(thresholds) != len(sites):
        raise ValueError(f"{len(thresholds)} thresholds for a model with {len(sites)} FFN layers: "
                         "the result was measured on a different model")
    rule = CETTRule(thresholds)
    with apply_rule(model, rule, sites=sites):
        yield rule
