"""The search's step rule against the one before issue 10, on simulated bumpy PPL ratios.

For each shape of a ``bench_shapes.py --grid`` run (default: ``h200_ppl_grids.json``, measured
on the H200), a smooth trend ``ratio - 1 = exp(a) c^k`` is fitted to the grid and search points
(least squares in log-log space over points with ratio - 1 > 0.002), and the scatter around it
(root mean square over 0.1 < c < 0.3) is taken as the bumps. Each simulated search sees
``ratio(c) = 1 + exp(a) c^k + N(0, (f * scatter)^2)``, a new draw at every c, starts at c = 0.1
and stops as ``search_ppl_p`` does (ratio within ``tol`` of the target, 24 steps at most). The
rule before issue 10 is read from git (commit 498d604); the current one is
:func:`sparsing_utils.search._next_c`, given the simulated bumps as its errors.

    python benchmarks/simulate_steps.py                    # mean sparse passes, 400 searches each
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import subprocess
import sys
import tempfile

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))

from sparsing_utils.search import _next_c

OLD_COMMIT = "498d604"


def old_rule():
    """``_next_c`` of the search before issue 10, from git."""
    src = subprocess.run(["git", "show", f"{OLD_COMMIT}:sparsing_utils/search.py"], cwd=_HERE, check=True,
                         capture_output=True, text=True).stdout
    src = src.replace("from .", "from sparsing_utils.")
    path = os.path.join(tempfile.mkdtemp(), "search_before_issue_10.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("search_before_issue_10", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod._next_c


def trend(points):
    xy = [(math.log(c), math.log(r - 1)) for c, r in points if r - 1 > 0.002]
    mx = sum(x for x, _ in xy) / len(xy)
    my = sum(y for _, y in xy) / len(xy)
    k = sum((x - mx) * (y - my) for x, y in xy) / sum((x - mx) ** 2 for x, _ in xy)
    a = my - k * mx
    res = [r - 1 - math.exp(a + k * math.log(c)) for c, r in points if 0.1 < c < 0.3]
    return a, k, math.sqrt(sum(e * e for e in res) / len(res))


def simulate(rule, a, k, sd, rng, *, target=1.01, tol=1e-3, c0=0.1, steps=24):
    def f(c):
        return 1 + math.exp(a + k * math.log(c)) + rng.gauss(0, sd)

    pts = [(c0, f(c0))]
    for _ in range(steps):
        if min(abs(r - target) for _, r in pts) <= tol:
            break
        c = rule(pts, target, 0.999)
        if c is None or any(abs(c - q) <= 1e-12 for q, _ in pts):
            break
        pts.append((c, f(c)))
    return len(pts), min(abs(r - target) for _, r in pts) <= tol


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grids", default=os.path.join(_HERE, "h200_ppl_grids.json"))
    ap.add_argument("--runs", type=int, default=400)
    ap.add_argument("--scales", default="0.1,1", help="bump scale factors f (comma-separated)")
    args = ap.parse_args()
    with open(args.grids) as f:
        data = json.load(f)
    old = old_rule()
    print("| shape | slope k | scatter | f | passes before | passes now | converged before | converged now |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for s in data["shapes"]:
        pts = [(p["c"], p["ppl_ratio"]) for p in s["grid"] + s["search_points"]]
        a, k, sd = trend(pts)
        for f in (float(x) for x in args.scales.split(",")):
            noise = f * sd
            out = []
            for rule in (old, lambda p, t, cm, _n=noise: _next_c(p, t, cm, [_n / r for _, r in p])):
                rng = random.Random(1)
                res = [simulate(rule, a, k, noise, rng) for _ in range(args.runs)]
                out.append((sum(n for n, _ in res) / len(res), sum(c for _, c in res) / len(res)))
            print(f"| {s['shape']} | {k:.2f} | {sd:.4f} | {f:g} | {out[0][0]:.2f} | {out[1][0]:.2f} "
                  f"| {out[0][1]:.2f} | {out[1][1]:.2f} |")


if __name__ == "__main__":
    main()
