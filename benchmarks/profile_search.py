"""Where the project's PPL-p% search spends its time: phase timings and the top CUDA kernels.

    python benchmarks/profile_search.py --model llama836m --device cuda --load-ids ids.pt

Times (synchronised) one plain forward, ``SparsityProbe.prepare`` (the dense pass with its
hooks), one ``thresholds_for``, one sparse pass and a whole PPL-1% search, in forward-pass
equivalents, then prints torch.profiler's table of the heaviest kernels of each phase.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_search as bs

from sparsing_utils.probe import SparsityProbe
from sparsing_utils.rules import CETTRule
from sparsing_utils.search import search_ppl_p


def timed(device, fn):
    bs.sync(device)
    t = time.perf_counter()
    out = fn()
    bs.sync(device)
    return out, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    bs.add_model_args(ap)
    ap.add_argument("--p", type=float, default=1.0)
    ap.add_argument("--mode", default="memory")
    ap.add_argument("--kernels", type=int, default=12, help="rows of the profiler table per phase")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    model, blocks, info = bs.build(args)
    device = next(model.parameters()).device
    batch_size = args.batch_size or max(1, (32768 if device.type == "cuda" else 4096) // blocks.input_ids.shape[1])
    fwd = bs.time_forward(model, blocks, batch_size)["median_s"]
    print(f"one plain forward: {fwd * 1e3:.1f} ms")
    rows = []
    probe = SparsityProbe(model, blocks, mode=args.mode, batch_size=batch_size)
    _, t = timed(device, probe.prepare)
    rows.append(("prepare (dense pass + curves)", t))
    (eps, _), t = timed(device, lambda: probe.thresholds_for(0.15))
    rows.append((f"thresholds_for(0.15) ({probe.cett_evaluations} evaluations)", t))
    _, t = timed(device, lambda: probe.sparse_pass(CETTRule(eps)))
    rows.append(("one sparse pass", t))
    probe2 = SparsityProbe(model, blocks, mode=args.mode, batch_size=batch_size)
    res, t = timed(device, lambda: search_ppl_p(probe2, args.p))
    rows.append((f"whole PPL-{args.p:g}% search ({probe2.sparse_passes} sparse, {probe2.cett_evaluations} "
                 f"CETT evaluations)", t))
    for name, t in rows:
        print(f"{name:<60} {t * 1e3:9.1f} ms  {t / fwd:6.2f} fwd")
    print(f"result: c={res.cett:.5f} ratio={res.ppl_ratio:.5f} act={res.activation_ratio:.4f}")
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        for name, fn in [("prepare", lambda: SparsityProbe(model, blocks, mode=args.mode,
                                                            batch_size=batch_size).prepare()),
                         ("thresholds_for", lambda: probe.thresholds_for(0.1234)),
                         ("sparse pass", lambda: probe.sparse_pass(CETTRule(eps)))]:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            print(f"\n### {name}")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.kernels, max_name_column_width=60))


if __name__ == "__main__":
    main()
