"""Two checkouts of the package, one process: their PPL-p% searches alternating on the same model and tokens.

Whole-search times of the same work drift between processes on a shared host (RESULTS.md, session 9:
one 12-pass MoE search took 1.2 s in one process and 2.4 s in another), so an A/B across processes cannot
resolve a change of 10-20%. Here the base checkout's ``sparsing_utils`` is copied under another package
name (its search code imports itself relatively) and both run in this process, alternating, warm (a
process's first call pays first-use costs that the second package would then not pay: compare first calls
with ``bench_shapes.py`` instead). Printed per shape: each side's median wall time and forward-pass
equivalents, their ratio, and whether the answers (c, sparse passes, PPL ratio) agree.

    git archive BASE sparsing_utils | tar -x -C /tmp/base
    python benchmarks/ab_search.py --base /tmp/base/sparsing_utils --shapes mixtral-moe --device cuda --rounds 5
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import statistics
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.dirname(_HERE))

import bench_search as bs
import bench_shapes as bsh
import torch

BASE_NAME = "sparsing_utils_base"


def load_base(path: str, tmp: str):
    """The package at ``path`` imported as :data:`BASE_NAME` (a copy under that name in ``tmp``)."""
    if not os.path.isfile(os.path.join(path, "search.py")):
        raise SystemExit(f"--base {path} is not a sparsing_utils package folder (no search.py): pass the folder "
                         "that `git archive REV sparsing_utils | tar -x -C DIR` made, DIR/sparsing_utils")
    shutil.copytree(path, os.path.join(tmp, BASE_NAME))
    sys.path.insert(0, tmp)
    return importlib.import_module(f"{BASE_NAME}.probe"), importlib.import_module(f"{BASE_NAME}.search")


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="the base checkout's sparsing_utils folder")
    ap.add_argument("--shapes", default="mixtral-moe", help=f"comma-separated, from {', '.join(bsh.SHAPES)}")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--mode", default="memory", choices=["memory", "stream"])
    ap.add_argument("--data", default="self", choices=["self", "random"],
                    help="self-sampled tokens, or uniform random ones (the same work every call)")
    ap.add_argument("--rounds", type=int, default=5, help="timed calls of each side, alternating")
    ap.add_argument("--p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    shapes = args.shapes.split(",")
    unknown = [s for s in shapes if s not in bsh.SHAPES]
    if unknown:
        ap.error(f"unknown shapes {unknown}: choose from {', '.join(bsh.SHAPES)}")
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device here: use --device cpu")
    from sparsing_utils.probe import SparsityProbe
    from sparsing_utils.search import search_ppl_p

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base_probe, base_search = load_base(args.base, tmp)
        sides = {"base": (base_probe.SparsityProbe, base_search.search_ppl_p), "this": (SparsityProbe, search_ppl_p)}
        for shape in shapes:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            n_blocks, block_len = bsh.TOKENS[device.type]
            model, info = bsh.build_model(shape, device, dtype, args.seed, block_len)
            blocks = bsh.token_blocks(model, info["vocab"], device, args.data, args.seed, n_blocks, block_len)
            batch = max(1, (32768 if device.type == "cuda" else 4096) // block_len)
            fwd_s = bs.time_forward(model, blocks, batch, repeats=5)["median_s"]
            times: dict[str, list[float]] = {k: [] for k in sides}
            answers: dict[str, tuple] = {}
            for r in range(args.rounds + 1):  # round 0 warms both sides up, untimed
                for name, (probe_cls, search) in sides.items():
                    probe = probe_cls(model, blocks, mode=args.mode, batch_size=batch, name=shape)
                    bs.sync(device)
                    t = time.perf_counter()
                    res = search(probe, args.p)
                    bs.sync(device)
                    if r:
                        times[name].append(time.perf_counter() - t)
                    answers[name] = (round(res.cett, 6), probe.sparse_passes, round(res.ppl_ratio, 6))
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {"shape": shape, "mode": args.mode, "data": args.data, "forward_s": fwd_s,
                   "times_s": times, "median_s": med, "answers": answers,
                   "same_answer": answers["base"] == answers["this"]}
            rows.append(row)
            print(f"{shape} ({args.mode}, {args.data} tokens, {args.rounds} rounds): base {med['base'] * 1e3:.1f} ms "
                  f"({med['base'] / fwd_s:.1f} fwd-eq), this {med['this'] * 1e3:.1f} ms ({med['this'] / fwd_s:.1f}), "
                  f"base / this {med['base'] / med['this']:.2f}x; answers (c, passes, PPL ratio) base {answers['base']}, "
                  f"this {answers['this']}")
    return rows


if __name__ == "__main__":
    main()
