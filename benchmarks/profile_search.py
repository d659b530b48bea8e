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
    ap.add_argument("--profile-first", type=int, default=0,
                    help="only profile the process's first search: this many operators, by self CPU time")
    ap.add_argument("--ops", type=int, default=0, help="also this many aten operators per phase, by CUDA time")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    model, blocks, _info = bs.build(args)
    device = next(model.parameters()).device
    batch_size = args.batch_size or max(1, (32768 if device.type == "cuda" else 4096) // blocks.input_ids.shape[1])
    fwd = bs.time_forward(model, blocks, batch_size)["median_s"]
    print(f"one plain forward: {fwd * 1e3:.1f} ms")
    if args.profile_first:  # the first search of the process, profiled: which operators pay first-use costs
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            t = time.perf_counter()
            res = search_ppl_p(SparsityProbe(model, blocks, mode=args.mode, batch_size=batch_size), args.p)
            bs.sync(device)
            t = time.perf_counter() - t
        print(f"first search of the process: {t * 1e3:.1f} ms = {t / fwd:.2f} fwd (profiled), "
              f"{res.sparse_passes} sparse passes")
        ops = [e for e in prof.key_averages() if e.key.startswith("aten::")]
        ops.sort(key=lambda e: -e.self_cpu_time_total)
        print(f"{'operator':<40} {'calls':>6} {'self CPU ms':>12} {'CPU ms/call':>11} {'CUDA ms':>9}")
        for e in ops[:args.profile_first]:
            print(f"{e.key:<40} {e.count:>6} {e.self_cpu_time_total / 1e3:>12.3f} "
                  f"{e.cpu_time_total / max(1, e.count) / 1e3:>11.3f} {e.device_time_total / 1e3:>9.3f}")
        return
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
    rows.append(((f"whole PPL-{args.p:g}% search ({probe2.sparse_passes} sparse, {probe2.cett_evaluations} "
                 f"CETT evaluations)"), t))
    for name, t in rows:
        print(f"{name:<60} {t * 1e3:9.1f} ms  {t / fwd:6.2f} fwd")
    print(f"result: c={res.cett:.5f} ratio={res.ppl_ratio:.5f} act={res.activation_ratio:.4f}")
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        for name, fn in [("prepare", lambda: SparsityProbe(model, blocks, mode=args.mode,
                                                            batch_size=batch_size).prepare()),
                         ("thresholds_for", lambda: probe.thresholds_for(0.1234)),
                         ("sparse pass", lambda: probe.sparse_pass(CETTRule(eps)))]:
            with profile(activities=[ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if args.ops else [])) as prof:
                fn()
                torch.cuda.synchronize()
            print(f"\n### {name}")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.kernels, max_name_column_width=60))
            if args.ops:  # the aten operators (with their kernels' time), by total CUDA time
                ops = [e for e in prof.key_averages() if e.key.startswith("aten::")]
                ops.sort(key=lambda e: -e.device_time_total)
                print(f"{'operator':<40} {'calls':>6} {'CUDA ms':>9} {'CPU ms':>9}")
                for e in ops[:args.ops]:
                    print(f"{e.key:<40} {e.count:>6} {e.device_time_total / 1e3:>9.3f} {e.cpu_time_total / 1e3:>9.3f}")


if __name__ == "__main__":
    main()
