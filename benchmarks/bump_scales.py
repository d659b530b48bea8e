"""At what scale in ``c`` is the PPL ratio bumpy? (issue 10, section 2)

The search's pass count is a draw because the PPL ratio scatters around its trend by about two
to three times the 0.1-point tolerance (RESULTS.md, session 7, item 1). Whether a step rule can
do better than draw again near the answer depends on how that scatter is spread over scales of
``c``: if ``log r(c)`` is smooth over small changes of ``c`` (the truncation moves few neurons),
a local secant on close points finds where it crosses the target; if every change of ``c``,
however small, is a new draw (bf16 rounding propagated through the layers), only draws help.

For each shape of ``bench_shapes.py`` (self-sampled tokens, the same model and tokens as there)
this script runs the package's search once (its answer ``c*``), then evaluates exact thresholds
and a sparse pass on a coarse grid of ``c`` over [0.03, 0.6] and on a fine geometric grid
around ``c*`` (``c* exp(+-window)``, ``--fine`` points). It reports the variogram of ``log r``
on the fine grid, ``sqrt(mean((y(x + h) - y(x) - slope h)^2) / 2)`` for lags ``h`` in ``log c``
(``slope``: the fine grid's straight-line trend), and how many fine points lie within the
tolerance of the target. All points go to the JSON (``--out``); ``--replay`` runs the search's step
rule on the measured trend and bumps of such a file, against an oracle (:func:`replay`).

Usage::

    python benchmarks/bump_scales.py --device cpu --shapes llama-12x768
    python benchmarks/bump_scales.py --device cuda --out bumps.json      # every CUDA shape
    python benchmarks/bump_scales.py --replay bumps.json                 # no model: the step rule's passes
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_search as bs
import bench_shapes as bsh

from sparsing_utils.jsonio import atomic_write_json
from sparsing_utils.probe import SparsityProbe
from sparsing_utils.rules import CETTRule
from sparsing_utils.search import EvaluationTable, _next_c, log_ratio_se, search_ppl_p

LAGS = (0.0025, 0.005, 0.01, 0.02, 0.04, 0.08)  # in log c
TREND_WIDTH = 0.08  # in log c: the replay's smoothing of the measured ratios into a trend


def variogram(x: np.ndarray, y: np.ndarray, lags=LAGS) -> dict[str, float]:
    """``sqrt(mean((y_j - y_i - slope (x_j - x_i))^2) / 2)`` over the pairs ``x_j - x_i`` within 20%
    of each lag, ``slope`` from a straight line through all points (x on an even grid)."""
    slope = float(np.polyfit(x, y, 1)[0])
    out = {}
    for h in lags:
        d = [(y[j] - y[i] - slope * (x[j] - x[i])) for i in range(len(x)) for j in range(i + 1, len(x))
             if abs((x[j] - x[i]) - h) <= 0.2 * h]
        out[f"{h:g}"] = float(math.sqrt(sum(v * v for v in d) / (2 * len(d)))) if d else None
    return out


def fine_line(fine: list[dict]) -> tuple[np.ndarray, np.ndarray, float, float]:
    """``x = log c`` and ``y = log r`` of the fine grid, and the slope and intercept of their straight line."""
    x = np.log([r["c"] for r in fine])
    y = np.array([r["log_ratio"] for r in fine])
    slope, icept = np.polyfit(x, y, 1)
    return x, y, float(slope), float(icept)


def near_crossing(result: dict, width: float = 0.03) -> tuple[float, int]:
    """The share of fine points within the tolerance among those within ``width`` (in ``log c``) of
    where the fine grid's straight-line trend of ``log r`` crosses the target, and their number."""
    x, _, slope, icept = fine_line(result["fine"])
    near = np.abs(x - (math.log(result["target"]) - icept) / slope) <= width
    hits = [abs(r["ppl_ratio"] - result["target"]) <= result["tol"] for r, n in zip(result["fine"], near) if n]
    return (float(np.mean(hits)) if hits else math.nan), len(hits)


def evaluate(probe: SparsityProbe, c: float) -> dict:
    eps, _ = probe.thresholds_for(float(c))
    stats = probe.sparse_pass(CETTRule(eps))
    return {"c": float(c), "ppl_ratio": stats.ppl / probe.dense.ppl, "log_ratio": math.log(stats.ppl / probe.dense.ppl),
            "activation_ratio": float(stats.activation_ratio), "se": log_ratio_se(probe, stats)}


def replay(result: dict, runs: int, seed: int = 0) -> dict:
    """The search's step rule (:func:`~sparsing_utils.search._next_c`) on a simulated ratio: the
    measured trend (the coarse and fine points smoothed with a Gaussian kernel of width
    :data:`TREND_WIDTH` in ``log c``) plus white bumps of the fine grid's measured size, a new draw at
    every ``c`` (what the variogram shows), from ``c = 0.1`` as the search starts; the points'
    standard errors against the dense pass (the search's floors) as measured nearest their ``c``.
    Against the best any rule can do with these bumps: an oracle that knows the trend and, after the
    first point, draws at its crossing until one lands within the tolerance."""
    target, tol = result["target"], result["tol"]
    measured = sorted((r["c"], r["ppl_ratio"], r["se"]) for r in result["coarse"] + result["fine"])
    lc = np.log([c for c, _, _ in measured])
    ratio = np.array([r for _, r, _ in measured])
    se = np.array([e for _, _, e in measured])
    x, y, slope, icept = fine_line(result["fine"])
    sd = float(np.std(y - (slope * x + icept)))  # the bumps, in log ratio ~ ratio units

    def trend(c: float) -> float:
        w = np.exp(-0.5 * ((lc - math.log(c)) / TREND_WIDTH) ** 2)
        return float((w * ratio).sum() / w.sum())

    def floor(c: float) -> float:  # the standard error of log r against the dense pass, as measured near c
        return float(np.interp(math.log(c), lc, se))

    rng = np.random.default_rng(seed)
    counts, oracle = [], []
    for _ in range(runs):
        found = [(0.1, trend(0.1) + rng.normal(0.0, sd))]
        while len(found) < 24 and min(abs(r - target) for _, r in found) > tol:
            c = _next_c(found, target, 0.999, [sd / r for _, r in found], [floor(q) for q, _ in found])
            if c is None or any(abs(c - q) <= 1e-12 for q, _ in found):
                break
            found.append((c, trend(c) + rng.normal(0.0, sd)))
        counts.append(len(found))
        n = 1
        if abs(trend(0.1) + rng.normal(0.0, sd) - target) > tol:
            n += int(rng.geometric(float(math.erf(tol / (sd * math.sqrt(2.0))))))
        oracle.append(n)
    counts, oracle = np.array(counts), np.array(oracle)
    return {"bumps_sd": sd, "passes_mean": float(counts.mean()),
            "passes_at_most": {k: float(np.mean(counts <= k)) for k in (2, 3, 4, 6)},
            "oracle_mean": float(oracle.mean()), "oracle_at_most": {k: float(np.mean(oracle <= k)) for k in (2, 3, 4, 6)}}


def run_shape(name: str, args) -> dict:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n_blocks, block_len = bsh.TOKENS[device.type]
    model, info = bsh.build_model(name, device, dtype, args.seed, block_len)
    blocks = bsh.token_blocks(model, info["vocab"], device, "self", args.seed, n_blocks, block_len)
    probe = SparsityProbe(model, blocks, mode="memory")
    t0 = time.perf_counter()
    table = EvaluationTable([probe])
    res = search_ppl_p(probe, args.p, tol=args.tol, evaluations=table)
    c_star = res.cett
    target = 1.0 + args.p / 100.0
    coarse = [evaluate(probe, c) for c in np.exp(np.linspace(math.log(0.03), math.log(0.6), args.coarse))]
    fine = [evaluate(probe, c) for c in c_star * np.exp(np.linspace(-args.window, args.window, args.fine))]
    x, y, slope, _ = fine_line(fine)
    within = [abs(r["ppl_ratio"] - target) <= args.tol for r in fine]
    summary = {"c_star": c_star, "search_passes": res.sparse_passes, "variogram": variogram(x, y),
               "slope_per_log_c": slope, "fine_within_tol": float(np.mean(within)),
               "median_se": float(np.median([r["se"] for r in fine])), "seconds": time.perf_counter() - t0}
    bs.log(f"{name}: c* {c_star:.4f} ({res.sparse_passes} passes); within tol {summary['fine_within_tol']:.2f}; "
           f"variogram {summary['variogram']}")
    return {"shape": name, "model": info, "tokens": int(probe.dense.n_predicted), "target": target, "tol": args.tol,
            "search_points": table.rows(),
            "coarse": coarse, "fine": fine, "summary": summary}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default=None, help="comma-separated names of bench_shapes.SHAPES (default: the CUDA set)")
    ap.add_argument("--p", type=float, default=1.0)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--coarse", type=int, default=33, help="points of the coarse grid over [0.03, 0.6]")
    ap.add_argument("--fine", type=int, default=97, help="points of the fine grid around the answer")
    ap.add_argument("--window", type=float, default=0.12, help="half-width of the fine grid in log c")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--replay", default=None, metavar="JSON",
                    help="no model: replay the step rule on the bumps of an earlier --out (see replay())")
    ap.add_argument("--runs", type=int, default=2000, help="simulated searches per shape (--replay)")
    ap.add_argument("--vary", default=None, metavar="NAME=V1,V2",
                    help="--replay with each value of a constant of sparsing_utils.search (PRIOR_SLOPE, CURVATURE)")
    args = ap.parse_args(argv)
    if args.vary and not args.replay:
        ap.error("--vary needs --replay")
    if args.replay:
        with open(args.replay) as f:
            results = json.load(f)["results"]
        if args.vary:
            from sparsing_utils import search

            name, _, values = args.vary.partition("=")
            if name not in ("PRIOR_SLOPE", "CURVATURE") or not values:
                ap.error(f"--vary takes PRIOR_SLOPE=... or CURVATURE=..., got {args.vary!r}")
            default = getattr(search, name)
            print(f"| {name} | " + " | ".join(r["shape"] for r in results) + " | mean |\n|---:|"
                  + "---:|" * (len(results) + 1))
            try:
                for v in [default] + [float(x) for x in values.split(",")]:
                    setattr(search, name, v)
                    means = [replay(r, args.runs, args.seed)["passes_mean"] for r in results]
                    print(f"| {v:g} | " + " | ".join(f"{m:.2f}" for m in means) + f" | {np.mean(means):.2f} |")
            finally:
                setattr(search, name, default)
            return results
        print("| shape | fine points within tol near the crossing (points) | bumps sd | mean sparse passes: the rule "
              "| oracle | P(<= 2 / 3 / 4 passes): the rule | oracle |\n|---|---:|---:|---:|---:|---|---|")
        for r in results:
            q = replay(r, args.runs, args.seed)
            fmt = " / ".join(f"{q['passes_at_most'][k]:.2f}" for k in (2, 3, 4))
            fmo = " / ".join(f"{q['oracle_at_most'][k]:.2f}" for k in (2, 3, 4))
            share, n = near_crossing(r)
            print(f"| {r['shape']} | {'-' if n == 0 else f'{share:.2f}'} ({n}) | {q['bumps_sd']:.5f} | {q['passes_mean']:.2f} | {q['oracle_mean']:.2f} "
                  f"| {fmt} | {fmo} |")
        return results
    shapes = args.shapes.split(",") if args.shapes else bsh.DEFAULT_SHAPES["cuda"]
    unknown = [s for s in shapes if s not in bsh.SHAPES]
    if unknown:
        ap.error(f"unknown shapes {unknown}; choose from {sorted(bsh.SHAPES)}")
    if args.fine < 9 or args.coarse < 2 or not 0 < args.window < 1:
        ap.error("need --fine >= 9, --coarse >= 2 and 0 < --window < 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for name in shapes:
        results.append(run_shape(name, args))
        if args.out:  # after every shape: a later failure keeps the earlier ones
            atomic_write_json(args.out, {"args": vars(args), "results": results})
    print("\n| shape | tokens | c* | fine points within tol | "
          + " | ".join(f"bumps at h = {h:g}" for h in LAGS) + " |\n|---|---:|---:|---:|" + "---:|" * len(LAGS))
    for r in results:
        s = r["summary"]
        print(f"| {r['shape']} | {r['tokens']} | {s['c_star']:.4f} | {s['fine_within_tol']:.2f} | "
              + " | ".join("-" if s["variogram"][f"{h:g}"] is None else f"{s['variogram'][f'{h:g}']:.5f}"
                           for h in LAGS) + " |")
    return results


if __name__ == "__main__":
    main()
