"""The search on the CETT target ``c`` (Luo et al. 2024, Sec. 3.1 and Algorithm 1; PAPER.md Sec. 1).

PPL-p% sparsity is the activation ratio at the ``c`` whose sparse/dense PPL ratio is
``1 + p/100``. The PPL ratio grows monotonically (if bumpily) with ``c``, about like ``c^3``
in the models tried, so the search is a secant in log-log space on the evaluated points
(:func:`search_ppl_p`). Each evaluated ``c`` costs exact thresholds on every probe
(:meth:`~sparsing_utils.probe.SparsityProbe.thresholds_for`) and one sparse pass; an
:class:`EvaluationTable` keeps them, so several ``p`` values share their points.

The first guess (:func:`first_guess`) is found on the cheap: the same secant on *partial*
sparse passes over the first quarter of every block (a quarter of a pass each, thresholds
read off the CETT curves), stopped once the step is small or the target is within the
partial ratio's standard error (from the per-token losses). The full, exact steps then
start near the answer, with the slope the partial passes measured.
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

from .probe import PassStats, SparsityProbe, _all_reduce
from .results import CheckpointResult, PPLPResult
from .rules import CETTRule

__all__ = ["Evaluation", "EvaluationTable", "first_guess", "partial_ratio", "scout_prefix", "search_checkpoints",
           "search_ppl_p"]

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


def _loglog_slope(points: list[tuple[float, float]], target: float, prior: float = 3.0) -> float:
    """Slope of log(ratio - 1) against log(c), by least squares over the evaluated points whose
    excess is at least a quarter of the target's (below that the PPL ratio is mostly noise);
    ``prior`` when fewer than two such points (3 by default: PPL excess grows about like c^3
    in the models tried; the first guess passes the slope its partial passes measured)."""
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
    return prior


# The step rule's regression (see _next_c): a point's weight halves at NEAR in log excess from
# the target's; the prior slope weighs like a point pair with log-c spread 0.1 (sd 1 for
# log-excess noise 0.1); inside a bracket narrower than NARROW in log c the PPL ratio's bumps
# dominate, and MAX_NARROW trials there end the search (the ratio jumps across the target).
NEAR = 0.5
SLOPE_PRIOR_WEIGHT = 0.01
NARROW = 0.02
MAX_NARROW = 6


def _crossing(points: list[tuple[float, float]], target: float, prior: float) -> float | None:
    """log(c) where a straight line in log-log space, fitted to every evaluated point that
    shows degradation, reaches the target: weighted least squares of log(ratio - 1) on log(c),
    weights ``1 / (1 + (distance from the target's log excess / NEAR)^2)``, slope shrunk
    towards ``prior``. A point's bump then moves the answer by its weight's share only, where
    a secant through the two nearest points would follow it. ``None`` without such points."""
    y_star = math.log(target - 1.0)
    data = []
    for c, r in points:
        if r - 1.0 >= 0.1 * (target - 1.0):
            y = math.log(r - 1.0)
            data.append((math.log(c), y, 1.0 / (1.0 + ((y - y_star) / NEAR) ** 2)))
    if not data:
        return None
    w_sum = sum(w for _, _, w in data)
    mx = sum(w * x for x, _, w in data) / w_sum
    my = sum(w * y for _, y, w in data) / w_sum
    sxx = sum(w * (x - mx) ** 2 for x, _, w in data)
    sxy = sum(w * (x - mx) * (y - my) for x, y, w in data)
    slope = min(10.0, max(0.5, (sxy + SLOPE_PRIOR_WEIGHT * prior) / (sxx + SLOPE_PRIOR_WEIGHT)))
    return mx + (y_star - my) / slope


def _next_c(points: list[tuple[float, float]], target: float, c_max: float, prior: float = 3.0) -> float | None:
    """Next CETT to try on the monotone (but bumpy) PPL-vs-CETT relation.

    The crossing of the line fitted to every evaluated point (:func:`_crossing`); before any
    point is within a tenth of the target's excess, a Newton step from the nearest point with
    the fitted (or prior) slope. Inside a bracket at least :data:`NARROW` wide (in log c) the
    step stays strictly inside it (else the log-midpoint); outside one it moves at most a
    factor 10. In a narrower or inconsistent bracket (bumps of the ratio larger than the
    tolerance) the fitted crossing is tried as it is, nudged off points already evaluated,
    at most :data:`MAX_NARROW` times. ``None``: nothing left to try.
    """
    below = [(c, r) for c, r in points if r < target]
    above = [(c, r) for c, r in points if r >= target]
    y_star = math.log(target - 1.0)
    positive = [(c, r) for c, r in points if r > 1.0]
    if not positive:  # no measurable degradation yet: step up a lot
        c = max(c for c, _ in points)
        return None if c >= c_max else min(c_max, 4.0 * c)
    c0, r0 = min(positive, key=lambda cr: abs(_log_excess(cr[1]) - y_star))
    x = _crossing(points, target, prior)
    if x is None:
        x = math.log(c0) + (y_star - _log_excess(r0)) / _loglog_slope(points, target, prior)
    if below and above:
        x0, x1 = math.log(max(below)[0]), math.log(min(above)[0])
        if x1 - x0 >= NARROW:
            margin = 0.05 * (x1 - x0)
            if not x0 + margin <= x <= x1 - margin:
                x = 0.5 * (x0 + x1)
            return math.exp(x)
        # bumps: the fitted crossing, within NARROW of the bracket, off the points tried
        x = min(max(x, min(x0, x1) - NARROW), max(x0, x1) + NARROW)
        tried = sorted(math.log(c) for c, _ in points)
        if sum(abs(t - x) <= NARROW for t in tried) >= MAX_NARROW:
            return None
        while any(abs(t - x) < 0.1 * NARROW for t in tried):
            x += 0.1 * NARROW if x >= 0.5 * (x0 + x1) else -0.1 * NARROW
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


# The first guess: partial passes over the first SCOUT_FRACTION of every block, used when
# they hold at least MIN_SCOUT_TOKENS tokens (fewer give a PPL ratio too noisy to steer by).
SCOUT_FRACTION = 0.25
MIN_SCOUT_TOKENS = 1024
MAX_SCOUTS = 4
SCOUT_STEP = 0.03  # stop when the next partial step would move c by less than 3%


def scout_prefix(probes: Sequence[SparsityProbe]) -> int | None:
    """Tokens per block of the first guess's partial passes (a quarter of each block, at
    least 16), or ``None`` when they would hold fewer than :data:`MIN_SCOUT_TOKENS` tokens
    on some probe, or more than half of its tokens."""
    prefixes = []
    for probe in probes:
        block_len = probe.input_ids.shape[1]
        prefix = max(16, math.ceil(SCOUT_FRACTION * block_len))
        if 2 * prefix > block_len or probe.n_tokens * prefix / block_len < MIN_SCOUT_TOKENS:
            return None
        prefixes.append(prefix)
    return max(prefixes)


def partial_ratio(probes: Sequence[SparsityProbe], c: float, prefix: int) -> tuple[float, float]:
    """Mean over probes of the sparse/dense PPL ratio on the first ``prefix`` tokens of every
    block at CETT ``c`` (thresholds interpolated on the CETT curves, one partial pass each),
    and the standard error of its log: ``(ratio, se)``.

    The standard error is that of the mean per-token loss difference (sparse - dense) over
    those tokens, all-reduced under ``torch.distributed``; tokens are treated as independent."""
    ratios, variances = [], []
    for probe in probes:
        eps, _ = probe.thresholds_for(c, exact=False)
        st = probe.sparse_pass(CETTRule(eps), per_token=False, prefix=prefix)
        dense = probe.dense.token_nll[:, : prefix - 1]  # [blocks, prefix - 1]; 0 at padding
        mask = probe.attention_mask[:, :prefix]
        valid = (mask[:, 1:] * mask[:, :-1]).bool()
        diff = torch.where(valid, st.token_nll.double() - dense.double(), torch.zeros((), dtype=torch.float64))
        sums = torch.stack([diff.sum(), (diff * diff).sum(), valid.sum().double()]).to(probe.device)
        d1, d2, n = (float(x) for x in _all_reduce(sums).cpu())
        mean = d1 / max(n, 1.0)
        var = max(d2 / max(n, 1.0) - mean * mean, 0.0) / max(n - 1.0, 1.0)
        ratios.append(math.exp(mean))
        variances.append(var)
    k = len(probes)
    return sum(ratios) / k, math.sqrt(sum(variances)) / k


def first_guess(probes: Sequence[SparsityProbe], target: float, *, c_start: float = 0.1, c_max: float = 0.999,
                prefix: int | None = None) -> tuple[float, float, list[tuple[float, float, float]]]:
    """A first guess of the CETT whose PPL ratio is ``target``, from partial passes.

    The log-log secant of :func:`_next_c` on partial PPL ratios (:func:`partial_ratio`) from
    ``c_start``; stops after :data:`MAX_SCOUTS` passes, when the next step would move ``c`` by
    less than :data:`SCOUT_STEP`, or when the target is within one standard error of the last
    ratio (the partial passes cannot place it better). Returns ``(c, slope, [(c, ratio, se)])``:
    the slope of log(ratio - 1) against log(c) that the partial points give (3 if they give none).
    """
    prefix = prefix or scout_prefix(probes)
    if prefix is None:
        raise ValueError("too few tokens per block for partial passes: use scout_prefix(probes) first")
    pts: list[tuple[float, float, float]] = []
    c = c_start
    for _ in range(MAX_SCOUTS):
        r, se = partial_ratio(probes, c, prefix)
        pts.append((c, r, se))
        log.info("first guess: CETT %.6g, partial PPL ratio %.5f (se of log %.5f)", c, r, se)
        if abs(math.log(r) - math.log(target)) <= se:
            break
        nxt = _next_c([(q, x) for q, x, _ in pts], target, c_max)
        if nxt is None:
            break
        step = abs(math.log(nxt / c))
        c = nxt
        if step < SCOUT_STEP:
            break
    slope = _loglog_slope([(q, x) for q, x, _ in pts], target)
    return c, slope, pts


def search_ppl_p(probes: SparsityProbe | Sequence[SparsityProbe], p: float, *, tol: float = 1e-3,
                 c_start: float = 0.1, c_max: float = 0.999, max_steps: int = 24,
                 evaluations: EvaluationTable | None = None, guess: bool = True) -> PPLPResult | CheckpointResult:
    """Find the CETT ``c`` at which the (mean) sparse/dense PPL ratio is ``1 + p/100``.

    One probe: returns a :class:`PPLPResult`. A list of probes (checkpoints of one training
    run): one ``c`` for all, so that the *average* PPL ratio is ``1 + p/100`` (Algorithm 1),
    returned as a :class:`CheckpointResult`. ``tol`` is on the ratio (1e-3 = 0.1 percentage
    point). Every step uses exact thresholds (each layer's mean CETT within 1e-4 of ``c``
    on all tokens), found from the CETT curves plus the exact points of earlier steps.
    ``evaluations`` shares evaluated points between calls on the same probes. With no
    evaluated point yet, the first exact step is at :func:`first_guess` (partial passes from
    ``c_start``) when the blocks are long and many enough (:func:`scout_prefix`), else at
    ``c_start``; ``guess=False`` always starts at ``c_start``.
    """
    if not (isinstance(p, (int, float)) and 0 < p < 100 and math.isfinite(p)):
        raise ValueError(f"p must be a percentage in (0, 100), got {p!r} (e.g. 1 for PPL-1%)")
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
    slope = 3.0
    if not pts:
        prefix = scout_prefix(plist) if guess else None
        c0 = c_start
        if prefix is not None:
            c0, slope, _ = first_guess(plist, target, c_start=c_start, c_max=c_max, prefix=prefix)
        pts.append((c0, table.ratio(c0)))
    best = min(pts, key=lambda cr: abs(cr[1] - target))
    for _ in range(max_steps):
        if abs(best[1] - target) <= tol:
            break
        c = _next_c(pts, target, c_max, slope)
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
    for probe, s, eps, cett in zip(plist, chosen.stats, chosen.thresholds, chosen.layer_cett):
        results.append(PPLPResult(
            p=float(p), cett=float(chosen.c), activation_ratio=s.activation_ratio, ppl_dense=probe.dense.ppl,
            ppl_sparse=s.ppl, ppl_ratio=s.ppl / probe.dense.ppl, thresholds=eps.tolist(),
            layer_activation_ratio=s.layer_active.tolist(), layer_cett=cett.tolist(),
            token_activation_ratio=s.token_active.tolist() if s.token_active is not None else [],
            converged=ok, message=msg, sparse_passes=passes, seconds=elapsed))
    if single:
        return results[0]
    return CheckpointResult(p=float(p), cett=float(chosen.c), mean_ppl_ratio=chosen.ratio, checkpoints=results,
                            names=[pr.name for pr in plist], converged=ok, message=msg)


def search_checkpoints(probes: Sequence[SparsityProbe], p: float = 1.0, **kw) -> CheckpointResult:
    """Algorithm 1 over a training run's checkpoints (one probe each); see :func:`search_ppl_p`."""
    return search_ppl_p(list(probes), p, **kw)
