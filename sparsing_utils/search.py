"""The search on the CETT target ``c`` (Luo et al. 2024, Sec. 3.1 and Algorithm 1; PAPER.md Sec. 1).

PPL-p% sparsity is the activation ratio at the ``c`` whose sparse/dense PPL ratio is
``1 + p/100``. The PPL ratio grows with ``c`` about like a power of it (``c^1.3`` to
``c^2.8`` in the random and trained models measured for issue 10) plus bumps: at a given token
budget the ratios at two nearby ``c`` can differ by several times the tolerance (0.1 point),
by about the standard error of the mean of their per-token loss differences
(:meth:`EvaluationTable.bumps`). Each step therefore goes to where a straight line in log-log
space, fitted to *every* evaluated point, each weighted by its bumps, reaches the target
(:func:`_next_c`), rather than following the last two points' bumps. Each evaluated ``c`` costs exact thresholds on every
probe (:meth:`~sparsing_utils.probe.SparsityProbe.thresholds_for`) and one sparse pass; an
:class:`EvaluationTable` keeps them, so several ``p`` values share their points.
Algorithm 1 (one ``c`` for all checkpoints of a run, so that the *mean* PPL ratio is
``1 + p/100``) is the same search over a list of probes (:func:`search_checkpoints`).
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .passes import PassStats, _all_reduce
from .probe import SparsityProbe
from .results import CheckpointResult, PPLPResult
from .rules import CETTRule

__all__ = [
    "Evaluation",
    "EvaluationTable",
    "activation_uncertainty",
    "check_tol",
    "log_ratio_se",
    "search_checkpoints",
    "search_ppl_p",
]

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """One evaluated CETT target ``c`` on every probe of an :class:`EvaluationTable`."""

    c: float
    ratio: float  # mean over probes of sparse PPL / dense PPL
    stats: list[PassStats]  # the sparse pass of each probe
    thresholds: list[torch.Tensor]  # [layers] per probe
    layer_cett: list[torch.Tensor]  # [layers] exact mean CETT per probe
    se: float = 0.0  # standard error of log(ratio) from the per-token loss differences (log_ratio_se)


class EvaluationTable:
    """The CETT targets evaluated so far on a list of probes (one model, or the checkpoints
    of one run), with their mean PPL ratio: what the search steps on.

    Pass one table to several :func:`search_ppl_p` calls (different ``p``) on the same
    probes and the later searches start from every point the earlier ones evaluated.
    """

    def __init__(self, probes: Sequence[SparsityProbe]):
        self.probes = list(probes)
        self.evaluations: dict[float, Evaluation] = {}

    def __len__(self) -> int:
        return len(self.evaluations)

    def points(self) -> list[tuple[float, float]]:
        """``(c, mean PPL ratio)`` of every evaluation, in the order they were made."""
        return [(e.c, e.ratio) for e in self.evaluations.values()]

    def rows(self) -> list[dict]:
        """Every evaluation as a plain dict, in the order they were made (one probe: its sparse
        PPL, PPL ratio and activation ratio; several: their means, and the mean PPL ratio)."""
        out = []
        for e in self.evaluations.values():
            n = len(e.stats)
            out.append({"c": float(e.c), "ppl_sparse": sum(s.ppl for s in e.stats) / n, "ppl_ratio": float(e.ratio),
                        "activation_ratio": sum(s.activation_ratio for s in e.stats) / n})
            if all(s.activation_ratio_ran is not None for s in e.stats):  # MoE models
                out[-1]["activation_ratio_ran"] = sum(s.activation_ratio_ran for s in e.stats) / n
        return out

    def evaluate(self, c: float) -> Evaluation:
        """Exact thresholds for ``c`` and one sparse pass on every probe (once per ``c``)."""
        if c not in self.evaluations:
            stats, eps_list, cetts = [], [], []
            for probe in self.probes:
                eps, cett = probe.thresholds_for(c)
                stats.append(probe.sparse_pass(CETTRule(eps)))
                eps_list.append(eps)
                cetts.append(cett)
            r = sum(s.ppl / pr.dense.ppl for s, pr in zip(stats, self.probes)) / len(stats)
            se = math.sqrt(sum(log_ratio_se(pr, s) ** 2 for s, pr in zip(stats, self.probes))) / len(stats)
            log.info("CETT %.6g: mean PPL ratio %.5f (se of log %.5f), activation ratio %.4f", c, r, se,
                     sum(s.activation_ratio for s in stats) / len(stats))
            self.evaluations[c] = Evaluation(c, r, stats, eps_list, cetts, se)
        return self.evaluations[c]

    def ratio(self, c: float) -> float:
        """Mean PPL ratio at ``c`` (evaluated on first use)."""
        return self.evaluate(c).ratio

    def bumps(self) -> list[float]:
        """The bumps of every evaluation's log(mean PPL ratio), in the order of :meth:`points`:
        the standard error (:func:`log_ratio_se`) of its per-token loss differences with the
        evaluation nearest in ``c``, over sqrt(2) (each of the two draws carries half the
        variance). A smooth ratio (nearby ``c`` change few tokens' losses) gives small values,
        a bumpy one (every token's loss moves) large ones; 0 (unknown) when no other evaluation
        is within a factor ``exp(BUMP_RANGE)`` in ``c`` (farther ones differ by more than bumps)."""
        evs = list(self.evaluations.values())
        out = []
        for e in evs:
            others = [o for o in evs if o is not e and abs(math.log(o.c / e.c)) <= BUMP_RANGE]
            if not others:
                out.append(0.0)
                continue
            o = min(others, key=lambda x: abs(math.log(x.c / e.c)))
            se2 = sum(log_ratio_se(pr, a, b) ** 2 for pr, a, b in zip(self.probes, e.stats, o.stats))
            out.append(math.sqrt(se2 / 2.0) / len(evs[0].stats))
        return out


def log_ratio_se(probe: SparsityProbe, sparse: PassStats, other: PassStats | None = None) -> float:
    """Standard error of log(sparse PPL / other PPL) over the probe's tokens (``other``: the
    dense pass by default): that of the mean of the per-token loss differences, treating tokens
    as independent; sums all-reduced under ``torch.distributed``. 0 without per-token losses."""
    other = other if other is not None else probe.dense
    if sparse.token_nll is None or other.token_nll is None:
        return 0.0
    diff = (sparse.token_nll.double() - other.token_nll.double()).reshape(-1)  # 0 at padding in both
    n = float(probe.dense.n_predicted)
    sums = torch.stack([diff.sum(), (diff * diff).sum()])
    if dist.is_available() and dist.is_initialized():  # else no round trip through the device
        sums = _all_reduce(sums.to(probe.device)).cpu()
    mean = float(sums[0]) / max(n, 1.0)
    var = max(float(sums[1]) / max(n, 1.0) - mean * mean, 0.0)
    return math.sqrt(var / max(n - 1.0, 1.0))


# The step rule (_next_c). PRIOR_SLOPE: the slope of log(ratio - 1) against log(c) before the
# points say otherwise (measured 1.3-1.9 on the random shapes of benchmarks/bench_shapes.py on
# the H200 and 1.4-2.8 on the tests' trained tiny Llamas), held with a standard deviation of 1.
# CURVATURE: a point's log excess this many units from the target's adds (CURVATURE * units)^2
# to its variance, so that far points steer less than near ones (the line is only locally
# straight). MIN_STEP: evaluated c closer than this in log c are nudged apart (a new c is a new
# draw of the bumps; the same c is the same draw).
# BUMP_RANGE: evaluations at most this far apart in log c measure each other's bumps.
PRIOR_SLOPE = 2.5
BUMP_RANGE = 0.1
CURVATURE = 0.3
MIN_STEP = 0.004


def _crossing(points: list[tuple[float, float]], errors: list[float], target: float,
              floors: list[float] | None = None) -> float | None:
    """log(c) at which the line fitted to the points that show degradation reaches the target.

    Weighted least squares of ``y = log(ratio - 1)`` on ``x = log(c)``: a point's variance is
    its noise ``(ratio * se / (ratio - 1))^2`` (``se``: standard error of its log ratio, at
    least 1e-4 of the ratio) plus the curvature term; the slope is shrunk towards
    :data:`PRIOR_SLOPE` (a prior of precision 1) and kept in [0.5, 8]. ``None`` when no point
    has ratio > 1. ``floors``: each point's standard error of its log ratio against the dense
    pass; at a point far below the target (excess ``ratio - 1`` under half the target's) an
    excess below it says only that the degradation is at most about that much, and counts as
    that much (issue 10: on a self-sampled random model the first point, c = 0.1, measured 1.0009
    with a standard error of 0.003, and the step from the excess 0.0009 went to c = 0.26, where
    the ratio was 1.021). Near the target the measured excess is kept: flooring it there would
    bias the points the last steps rest on.
    """
    y_star = math.log(target - 1.0)
    data = []
    floors = floors if floors is not None else [0.0] * len(points)
    for (c, r), se, floor in zip(points, errors, floors):
        if r <= 1.0:
            continue
        noise = r * max(se, 1e-4)  # of the ratio
        excess = max(r - 1.0, noise, r * floor if r - 1.0 < 0.5 * (target - 1.0) else 0.0)
        y = math.log(excess)
        data.append((math.log(c), y, 1.0 / ((noise / excess) ** 2 + (CURVATURE * (y - y_star)) ** 2)))
    if not data:
        return None
    w_sum = sum(w for _, _, w in data)
    mx = sum(w * x for x, _, w in data) / w_sum
    my = sum(w * y for _, y, w in data) / w_sum
    sxx = sum(w * (x - mx) ** 2 for x, _, w in data)
    sxy = sum(w * (x - mx) * (y - my) for x, y, w in data)
    slope = min(8.0, max(0.5, (sxy + PRIOR_SLOPE) / (sxx + 1.0)))
    return mx + (y_star - my) / slope


def _next_c(points: list[tuple[float, float]], target: float, c_max: float,
            errors: list[float] | None = None, floors: list[float] | None = None) -> float | None:
    """Next CETT to try on the monotone (but bumpy) PPL-vs-CETT relation.

    The crossing of the line fitted to every evaluated point (:func:`_crossing`), at most a
    factor 4 beyond the points evaluated; inside a consistent bracket (every point below the
    target at smaller c than every point above, counting only points more than two standard
    errors from it: the others are within its noise) strictly inside it, else its log-midpoint;
    nudged :data:`MIN_STEP` off points already evaluated. With no degradation measured yet,
    4 times the largest c. ``None``: nothing left to try (``c_max`` reached below the target,
    or a consistent bracket narrower than two :data:`MIN_STEP`: the ratio jumps there).
    ``errors``: standard error of each point's log ratio (default 0: weights from curvature);
    ``floors``: see :func:`_crossing`.
    """
    errors = list(errors) if errors is not None else [0.0] * len(points)
    # the bracket counts only points farther than two standard errors from the target
    below = [c for (c, r), se in zip(points, errors) if r < target - 2.0 * r * se]
    above = [c for (c, r), se in zip(points, errors) if r >= target + 2.0 * r * se]
    x = _crossing(points, errors, target, floors)
    if x is None:  # no measurable degradation yet: step up a lot
        c = max(c for c, _ in points)
        return None if c >= c_max else min(c_max, 4.0 * c)
    xs = [math.log(c) for c, _ in points]
    x = min(max(x, min(xs) - math.log(4.0)), max(xs) + math.log(4.0))
    if below and above and max(below) < min(above):
        x0, x1 = math.log(max(below)), math.log(min(above))
        if x1 - x0 < 2.0 * MIN_STEP:  # the ratio jumps across the target: no room for a new draw
            return None
        margin = 0.05 * (x1 - x0)
        if not x0 + margin <= x <= x1 - margin:
            x = 0.5 * (x0 + x1)
    elif below and not above and max(below) >= c_max:
        return None
    direction = 0.0
    for _ in range(len(xs) + 1):  # a new draw of the bumps, not the same one again
        near = [t for t in xs if abs(t - x) < MIN_STEP]
        if not near:
            break
        direction = direction or (1.0 if x >= near[0] else -1.0)
        x = near[0] + direction * MIN_STEP
    return min(c_max, math.exp(x))


def _why_not_converged(pts: list[tuple[float, float]], best: tuple[float, float], target: float, tol: float) -> str:
    if not [r for _, r in pts if r >= target]:
        top = max(pts)
        return f"PPL ratio {target:.4f} not reachable: at CETT {top[0]:.4g} the ratio is only {top[1]:.4f}"
    if not [r for _, r in pts if r < target]:
        low = min(pts)
        return f"PPL ratio {target:.4f} not reachable: already {low[1]:.4f} at CETT {low[0]:.3g}"
    return (f"stopped at ratio {best[1]:.5f} (target {target:.5f}, tolerance {tol}): the PPL ratio jumps "
            "across the target between neighbouring CETT values; use more tokens")


def check_tol(tol: float, p: float | None = None) -> float:
    """Validate a tolerance on the PPL ratio: a number in ``(0, p/100)`` (``tol >= p/100``
    would accept the dense model itself)."""
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol <= 0:
        raise ValueError(f"tol must be a positive number (the tolerance on the PPL ratio, e.g. 1e-3 = 0.1 point), "
                         f"got {tol!r}")
    if p is not None and tol >= p / 100.0:
        raise ValueError(f"tol={tol:g} is not below p/100 = {p / 100:g}: it would accept the dense model as PPL-{p:g}%; "
                         "use a smaller tol (e.g. 1e-3 = 0.1 point)")
    return float(tol)


def activation_uncertainty(points: Sequence[tuple[float, float, float]], target: float, tol: float) -> float | None:
    """How precisely a PPL tolerance pins the activation ratio: ``|d(activation ratio) / d(PPL
    ratio)| * tol``, any answer whose PPL ratio is within ``tol`` of ``target`` having an
    activation ratio within about this much of the reported one.

    ``points`` are evaluated ``(c, PPL ratio, activation ratio)``; the slope is the chord between
    the evaluated points nearest the target on either side (largest ``c`` below it, smallest at
    or above it), else between the two whose PPL ratios are nearest the target. ``None`` when
    fewer than two points with different PPL ratios were evaluated.
    """
    below = [q for q in points if q[1] < target]
    above = [q for q in points if q[1] >= target]
    if below and above:
        pair = [max(below), min(above)]
    else:
        near = sorted(points, key=lambda q: abs(q[1] - target))
        pair = near[:1] + [q for q in near[1:] if q[1] != near[0][1]][:1]
    if len(pair) < 2 or pair[0][1] == pair[1][1]:
        return None
    (_, r0, a0), (_, r1, a1) = pair
    return abs((a1 - a0) / (r1 - r0)) * tol


def search_ppl_p(probes: SparsityProbe | Sequence[SparsityProbe], p: float, *, tol: float = 1e-3,
                 c_start: float = 0.1, c_max: float = 0.999, max_steps: int = 24,
                 evaluations: EvaluationTable | None = None) -> PPLPResult | CheckpointResult:
    """Find the CETT ``c`` at which the (mean) sparse/dense PPL ratio is ``1 + p/100``.

    One probe: returns a :class:`PPLPResult`. A list of probes (checkpoints of one training
    run): one ``c`` for all, so that the *average* PPL ratio is ``1 + p/100`` (Algorithm 1),
    returned as a :class:`CheckpointResult`. ``tol`` is on the ratio (1e-3 = 0.1 percentage
    point, in ``(0, p/100)``); each result reports the activation-ratio uncertainty it implies
    (:func:`activation_uncertainty`); a smaller ``tol`` pins it more tightly at the cost of more
    sparse passes (the PPL ratio's noise at the token budget sets the floor). Every step uses
    exact thresholds (each layer's mean CETT within 1e-4 of ``c`` on all tokens), found from
    the CETT curves plus the exact points of earlier steps.
    ``evaluations`` shares evaluated points between calls on the same probes.
    """
    if not (isinstance(p, (int, float)) and 0 < p < 100 and math.isfinite(p)):
        raise ValueError(f"p must be a percentage in (0, 100), got {p!r} (e.g. 1 for PPL-1%)")
    check_tol(tol, p)
    single = isinstance(probes, SparsityProbe)
    plist = [probes] if single else list(probes)
    if not plist:
        raise ValueError("no model to search: pass a probe or a non-empty list of probes")
    if evaluations is not None and evaluations.probes != plist:
        raise ValueError("the evaluation table was made for other probes: pass EvaluationTable(probes)")
    start = time.perf_counter()
    for probe in plist:
        probe.prepare()
    table = evaluations if evaluations is not None else EvaluationTable(plist)
    target = 1.0 + p / 100.0
    passes_before = sum(pr.sparse_passes for pr in plist)

    pts = table.points()
    if not pts:
        pts.append((c_start, table.ratio(c_start)))
    best = min(pts, key=lambda cr: abs(cr[1] - target))
    for _ in range(max_steps):
        if abs(best[1] - target) <= tol:
            break
        c = _next_c(pts, target, c_max, table.bumps(), [e.se for e in table.evaluations.values()])
        if c is None or any(abs(c - q) <= 1e-12 * max(1.0, q) for q, _ in pts):
            break
        pts.append((c, table.ratio(c)))
        best = min(pts, key=lambda cr: abs(cr[1] - target))
    ok = abs(best[1] - target) <= tol
    msg = "" if ok else _why_not_converged(pts, best, target, tol)
    chosen = table.evaluations[best[0]]
    elapsed = time.perf_counter() - start
    passes = sum(pr.sparse_passes for pr in plist) - passes_before
    results = []
    for k, (probe, s, eps, cett) in enumerate(zip(plist, chosen.stats, chosen.thresholds, chosen.layer_cett)):
        spread = activation_uncertainty([(e.c, e.ratio, e.stats[k].activation_ratio)
                                         for e in table.evaluations.values()], target, tol)
        results.append(PPLPResult(
            p=float(p), cett=float(chosen.c), activation_ratio=s.activation_ratio, ppl_dense=probe.dense.ppl,
            ppl_sparse=s.ppl, ppl_ratio=s.ppl / probe.dense.ppl, thresholds=eps.tolist(),
            layer_activation_ratio=s.layer_active.tolist(), layer_cett=cett.tolist(),
            token_activation_ratio=s.token_active.tolist() if s.token_active is not None else [],
            converged=ok, message=msg, sparse_passes=passes, seconds=elapsed,
            activation_ratio_uncertainty=spread,
            activation_ratio_ran=s.activation_ratio_ran,
            layer_activation_ratio_ran=s.layer_active_ran.tolist() if s.layer_active_ran is not None else None))
    if single:
        return results[0]
    return CheckpointResult(p=float(p), cett=float(chosen.c), mean_ppl_ratio=chosen.ratio, checkpoints=results,
                            names=[pr.name for pr in plist], converged=ok, message=msg)


def search_checkpoints(probes: Sequence[SparsityProbe], p: float = 1.0, **kw) -> CheckpointResult:
    """Algorithm 1 over a training run's checkpoints (one probe each); see :func:`search_ppl_p`."""
    return search_ppl_p(list(probes), p, **kw)
