"""The search on the CETT target ``c`` (Luo et al. 2024, Sec. 3.1 and Algorithm 1; PAPER.md Sec. 1).

PPL-p% sparsity is the activation ratio at the ``c`` whose sparse/dense PPL ratio is
``1 + p/100``. The PPL ratio grows monotonically (if bumpily) with ``c``, about like ``c^3``
in the models tried, so the search is a secant in log-log space on the evaluated points
(:func:`search_ppl_p`). Each evaluated ``c`` costs exact thresholds on every probe
(:meth:`~sparsing_utils.probe.SparsityProbe.thresholds_for`) and one sparse pass; an
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

from .probe import PassStats, SparsityProbe
from .results import CheckpointResult, PPLPResult
from .rules import CETTRule

__all__ = [
    "Evaluation",
    "EvaluationTable",
    "activation_uncertainty",
    "check_tol",
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
            log.info("CETT %.6g: mean PPL ratio %.5f, activation ratio %.4f", c, r,
                     sum(s.activation_ratio for s in stats) / len(stats))
            self.evaluations[c] = Evaluation(c, r, stats, eps_list, cetts)
        return self.evaluations[c]

    def ratio(self, c: float) -> float:
        """Mean PPL ratio at ``c`` (evaluated on first use)."""
        return self.evaluate(c).ratio


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
        c = _next_c(pts, target, c_max)
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
