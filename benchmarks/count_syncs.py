"""Host-device synchronisations of the PPL-p% search, per phase, with wall time against CUDA kernel time.

Each synchronisation (``.item()``, ``.tolist()``, ``.cpu()``, a copy from pageable host memory,
``nonzero``, ...) makes the host wait until the device has run every queued kernel; the kernels
launched after it then start only after their launch latency: a few per layer make the search
host-bound (issue 10). For ``SparsityProbe.prepare``, one ``thresholds_for``, one sparse pass and
a whole search (a fresh probe each time, so every phase does its full work) this script prints

* the number of synchronisations (``torch.cuda.set_sync_debug_mode("warn")``) and where they
  come from (file:line of the Python call, the most frequent first);
* the wall time (synchronised) and the sum of CUDA kernel times (``torch.profiler``), both in
  ms and in plain-forward equivalents (one forward of the same blocks, same batching, warm);
* the wall time of the whole search as the *first* call in the process (right after the plain
  forwards: kernels the forward does not use are loaded then).

Fast recipe (about a minute on an H200; the tokens are sampled from the random model in a first
process, so that sampling's kernels do not hide the search's first-use costs in the second)::

    python benchmarks/count_syncs.py --model smollm2-shape --device cuda --data self --gen-len 64 \\
        --gen-batch 256 --save-ids /tmp/ids.pt --ids-only
    python benchmarks/count_syncs.py --model smollm2-shape --device cuda --load-ids /tmp/ids.pt
    python benchmarks/count_syncs.py --shape gpt-neox-12x768 --device cuda --data random --mode stream

``--data random`` skips the sampling (uniform ids: PPL-1% may then be out of reach and the
search runs to its step limit; the per-phase counts are still meaningful). On the CPU the
script runs without counts or kernel times (a smoke test).
"""
from __future__ import annotations

import argparse
import collections
import logging
import math
import os
import sys
import time
import warnings
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_search as bs
import bench_shapes as bsh

from sparsing_utils.jsonio import atomic_write_json
from sparsing_utils.probe import SparsityProbe
from sparsing_utils.rules import CETTRule
from sparsing_utils.search import search_ppl_p


def timed(device: torch.device, fn) -> tuple[object, float]:
    bs.sync(device)
    t = time.perf_counter()
    out = fn()
    bs.sync(device)
    return out, time.perf_counter() - t


def count_syncs(device: torch.device, fn) -> tuple[int | None, list[tuple[str, int]]]:
    """``(synchronisations, [(file:line, count), ...])`` while ``fn`` runs (CUDA only; None elsewhere)."""
    if device.type != "cuda":
        fn()
        return None, []
    bs.sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    hits = [w for w in caught if "synchroniz" in str(w.message)]
    where = collections.Counter(f"{os.path.relpath(w.filename)}:{w.lineno}" for w in hits)
    return len(hits), where.most_common()


def kernel_ms(device: torch.device, fn) -> float | None:
    """Sum of the device times of every CUDA kernel and copy ``fn`` launches (``torch.profiler``)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    bs.sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        bs.sync(device)
    total = 0.0
    for e in prof.key_averages():
        total += getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
    return total / 1e3


def shape_model(args):
    """``(model, blocks, info)`` of a ``bench_shapes.py`` shape: its sizes for the device, 8 x 2048 tokens on
    CUDA (16 x 128 on the CPU), uniform random or sampled from the model (``--data``)."""
    device = bs._device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n_blocks, block_len = bsh.TOKENS[device.type]
    model, info = bsh.build_model(args.shape, device, dtype, args.seed, block_len)
    if args.data == "random":
        ids = torch.randint(0, info["vocab"], (n_blocks, block_len), generator=torch.Generator().manual_seed(args.seed))
    else:
        gen_len = bsh.GEN_LEN[device.type]
        ids = bs.self_generated_ids(model, n_blocks, block_len, seed=args.seed, gen_len=gen_len,
                                    batch_size=n_blocks * math.ceil(block_len / gen_len))
    blocks = SimpleNamespace(input_ids=ids, attention_mask=torch.ones_like(ids))
    return model, blocks, {"model": args.shape, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
                           "tokens": n_blocks * block_len, "block_len": block_len, "n_blocks": n_blocks,
                           "data": args.data, "model_info": info}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bs.add_model_args(ap)
    ap.add_argument("--p", type=float, default=1.0, help="the whole search's PPL-p%% target (default 1)")
    ap.add_argument("--c", type=float, default=0.15, help="CETT target of the thresholds_for / sparse pass phases")
    ap.add_argument("--mode", default="memory", choices=["memory", "stream"])
    ap.add_argument("--shape", default=None, choices=sorted(bsh.SHAPES),
                    help="a model shape of bench_shapes.py instead of --model (its sizes, 8 x 2048 tokens on CUDA)")
    ap.add_argument("--where", type=int, default=8, help="source lines listed per phase (most synchronisations first)")
    ap.add_argument("--ids-only", action="store_true", help="make (and --save-ids) the token ids, then stop")
    ap.add_argument("--out", default=None, help="also write the numbers to this JSON file")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    model, blocks, info = shape_model(args) if args.shape else bs.build(args)
    if args.ids_only:
        return
    device = next(model.parameters()).device
    batch_size = args.batch_size or max(1, (32768 if device.type == "cuda" else 4096) // blocks.input_ids.shape[1])
    fwd = bs.time_forward(model, blocks, batch_size)["median_s"]
    bs.log(f"one plain forward: {fwd * 1e3:.1f} ms")

    def fresh() -> SparsityProbe:
        return SparsityProbe(model, blocks, mode=args.mode, batch_size=batch_size)

    # 1. the first search of the process, timed clean (nothing else has run the search's kernels yet)
    first_probe = fresh()
    first, t_first = timed(device, lambda: search_ppl_p(first_probe, args.p))
    bs.log(f"first search: {t_first * 1e3:.1f} ms, {first_probe.sparse_passes} sparse passes, c={first.cett:.5f}")

    # 2. each phase three times on fresh probes: synchronisations, wall time, kernel time
    def phases():
        probe = fresh()
        probe.prepare()
        eps, _ = probe.thresholds_for(args.c)
        return probe, eps

    def run_phase(name: str):
        if name == "prepare":
            probe = fresh()
            return lambda: probe.prepare(), probe
        probe, eps = phases()
        if name == "thresholds_for":
            other = args.c * 1.37  # not cached: a full refinement from the curves and the first target's points
            return lambda: probe.thresholds_for(other), probe
        if name == "sparse pass":
            return lambda: probe.sparse_pass(CETTRule(eps)), probe
        probe = fresh()
        return lambda: search_ppl_p(probe, args.p), probe

    rows = []
    for name in ("prepare", "thresholds_for", "sparse pass", "whole search"):
        fn, probe = run_phase(name)
        before = (probe.cett_evaluations, probe.sparse_passes)
        n, where = count_syncs(device, fn)
        work = (probe.cett_evaluations - before[0], probe.sparse_passes - before[1])
        fn, _ = run_phase(name)
        _, wall = timed(device, fn)
        fn, _ = run_phase(name)
        cuda = kernel_ms(device, fn)
        rows.append({"phase": name, "syncs": n, "wall_ms": wall * 1e3, "wall_fwd": wall / fwd, "kernel_ms": cuda,
                     "cett_evaluations": work[0], "sparse_passes": work[1], "where": where[:args.where]})

    print(f"\nmodel {info['model']} ({info['model_info'].get('layers', '?')} layers), {info['tokens']} tokens, "
          f"{info['dtype']}, {device}, mode {args.mode}; one plain forward {fwd * 1e3:.1f} ms\n")
    print("| phase | CETT evals | sparse passes | syncs | wall ms | wall fwd | CUDA kernel ms | wall - kernel ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        k = "" if r["kernel_ms"] is None else f"{r['kernel_ms']:.1f}"
        gap = "" if r["kernel_ms"] is None else f"{r['wall_ms'] - r['kernel_ms']:.1f}"
        n = "n/a" if r["syncs"] is None else r["syncs"]
        print(f"| {r['phase']} | {r['cett_evaluations']} | {r['sparse_passes']} | {n} | {r['wall_ms']:.1f} "
              f"| {r['wall_fwd']:.2f} | {k} | {gap} |")
    print(f"| whole search, first call in the process | {first_probe.cett_evaluations} | {first_probe.sparse_passes} "
          f"| | {t_first * 1e3:.1f} | {t_first / fwd:.2f} | | |")
    print(f"\nresult of the first search: c={first.cett:.5f} PPL ratio={first.ppl_ratio:.5f} "
          f"activation ratio={first.activation_ratio:.4f} converged={first.converged}")
    for r in rows:
        if r["where"]:
            print(f"\nsynchronisations in {r['phase']} (file:line count):")
            for loc, n in r["where"]:
                print(f"  {loc}  {n}")
    if args.out:
        atomic_write_json(args.out, {"info": info, "forward_ms": fwd * 1e3, "first_search_ms": t_first * 1e3,
                                     "first_search_sparse_passes": first_probe.sparse_passes, "phases": rows,
                                     "code": bs.code_version()})


if __name__ == "__main__":
    main()
