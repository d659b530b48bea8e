"""Where the device waits for the host during a PPL-p% search (issue 10, section 2).

On small models a search's wall time on a GPU is well above its kernels' time (RESULTS.md,
``count_syncs.py``: SmolLM2's shape 562 ms wall for 407 ms of kernels). This script finds where:
it runs the search once (warm), then again under ``torch.profiler`` with Python stacks, and
walks the device timeline (kernels and copies): every interval in which the device runs nothing
is a *gap*; each gap is charged to the deepest ``sparsing_utils`` (or ``transformers``) Python
frame that was running on the host when the gap began. Printed: the device busy time, the total
of the gaps, and the gaps summed per Python frame (largest first).

Usage::

    python benchmarks/trace_gaps.py --shape smollm2-shape --device cuda --trace trace.json.gz
    python benchmarks/trace_gaps.py --shape gpt-neox-12x768 --device cuda --min-gap-us 20
    python benchmarks/trace_gaps.py --from-trace trace.json.gz     # analyse a kept trace (any machine)

``--from-trace`` also sums the kernels' device time per package frame that launched them (the
kernel's launch call, matched by its correlation id). Running a search needs CUDA (on the CPU
there is no device timeline); analysing a kept trace does not.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_search as bs
import bench_shapes as bsh

from sparsing_utils.jsonio import atomic_write_json
from sparsing_utils.probe import SparsityProbe
from sparsing_utils.search import search_ppl_p

DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def device_gaps(events: list[dict], min_gap_us: float) -> tuple[float, float, list[tuple[float, float]]]:
    """``(busy us, span us, [(gap start, gap length), ...])`` of the device intervals in a chrome trace."""
    iv = sorted((e["ts"], e["ts"] + e.get("dur", 0.0)) for e in events if e.get("cat") in DEVICE_CATS)
    if not iv:
        return 0.0, 0.0, []
    busy, gaps = 0.0, []
    start, end = iv[0]
    for s, e in iv[1:]:
        if s > end:
            busy += end - start
            if s - end >= min_gap_us:
                gaps.append((end, s - end))
            start, end = s, e
        else:
            end = max(end, e)
    busy += end - start
    return busy, iv[-1][1] - iv[0][0], gaps


def charge_gaps(events: list[dict], gaps: list[tuple[float, float]], roots: tuple[str, ...]) -> collections.Counter:
    """Sum of gap lengths per deepest Python frame of ``roots`` running on the host when each gap began."""
    frames = sorted((e["ts"], e["ts"] + e.get("dur", 0.0), e["name"]) for e in events
                    if e.get("cat") == "python_function" and any(r in e["name"] for r in roots))
    starts = [f[0] for f in frames]
    out: collections.Counter = collections.Counter()
    for t, length in gaps:
        i = bisect.bisect_right(starts, t)
        best = None  # the running frame that started last (the deepest)
        for j in range(i - 1, -1, -1):
            s, e, name = frames[j]
            if e >= t:
                best = name
                break
            if t - s > 5e6:  # frames longer than 5 s: none here
                break
        out[best or "(no package frame)"] += length
    return out


def kernels_by_frame(events: list[dict]) -> collections.Counter:
    """Device time (us) per ``(kernel name, package frame that launched it)``; ``model forward`` for
    kernels launched from transformers' code, ``?`` when no package frame was running."""
    launches = {e["args"]["correlation"]: e["ts"] for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    frames = sorted((e["ts"], e["ts"] + e.get("dur", 0.0), e["name"]) for e in events
                    if e.get("cat") == "python_function" and ("sparsing_utils" in e["name"] or "transformers" in e["name"]))
    starts = [f[0] for f in frames]
    out: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") not in DEVICE_CATS:
            continue
        t = launches.get(e.get("args", {}).get("correlation"))
        where = "?"
        if t is not None:
            for j in range(bisect.bisect_right(starts, t) - 1, -1, -1):
                if frames[j][1] >= t:
                    name = frames[j][2]
                    where = "model forward" if "transformers" in name else name.split("sparsing_utils/")[-1]
                    break
                if t - frames[j][0] > 5e6:
                    break
        out[(e["name"][:60], where)] += e.get("dur", 0.0)
    return out


def report(events: list[dict], min_gap_us: float, top: int) -> dict:
    """Print the device's busy time, its gaps charged to host frames and the kernels per frame."""
    busy, span, gaps = device_gaps(events, min_gap_us)
    charged = charge_gaps(events, gaps, ("sparsing_utils", "transformers"))
    total_gap = sum(g for _, g in gaps)
    print(f"device: busy {busy / 1e3:.1f} ms of a {span / 1e3:.1f} ms span; gaps >= {min_gap_us:g} us: "
          f"{len(gaps)}, {total_gap / 1e3:.1f} ms\n")
    print("| host frame when the device went idle | gaps ms | share of gaps |\n|---|---:|---:|")
    for name, us in charged.most_common(top):
        print(f"| `{name}` | {us / 1e3:.2f} | {us / max(total_gap, 1e-9):.1%} |")
    kernels = kernels_by_frame(events)
    print("\n| kernel | launched from | device ms |\n|---|---|---:|")
    for (name, where), us in kernels.most_common(top):
        print(f"| `{name}` | `{where}` | {us / 1e3:.2f} |")
    return {"device_busy_s": busy / 1e6, "span_s": span / 1e6, "gaps": len(gaps), "gap_s": total_gap / 1e6,
            "by_frame_s": {k: v / 1e6 for k, v in charged.most_common()},
            "kernels_s": [[k[0], k[1], v / 1e6] for k, v in kernels.most_common()]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="smollm2-shape", choices=sorted(bsh.SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--data", choices=["self", "random"], default="self")
    ap.add_argument("--mode", choices=["memory", "stream"], default="memory")
    ap.add_argument("--p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-gap-us", type=float, default=10.0, help="shorter idle intervals are not listed")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--trace", default=None, help="also keep the chrome trace here (.json.gz)")
    ap.add_argument("--from-trace", default=None, help="analyse this kept trace (.json.gz) instead of running a search")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.from_trace:
        with gzip.open(args.from_trace, "rt") as f:
            trace = json.load(f)
        out = report(trace["traceEvents"] if isinstance(trace, dict) else trace, args.min_gap_us, args.top)
        if args.out:
            atomic_write_json(args.out, out)
        return out
    device = torch.device(args.device)
    if device.type != "cuda":
        ap.error("the device timeline needs CUDA (--device cuda)")
    from torch.profiler import ProfilerActivity, profile

    n_blocks, block_len = bsh.TOKENS["cuda"]
    model, info = bsh.build_model(args.shape, device, torch.bfloat16, args.seed, block_len)
    blocks = bsh.token_blocks(model, info["vocab"], device, args.data, args.seed, n_blocks, block_len)
    fwd_s = bs.time_forward(model, blocks, max(1, 32768 // block_len), repeats=5)["median_s"]
    search_ppl_p(SparsityProbe(model, blocks, mode=args.mode), args.p)  # warm: kernels loaded
    probe = SparsityProbe(model, blocks, mode=args.mode)
    bs.sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        t = time.perf_counter()
        res = search_ppl_p(probe, args.p)
        bs.sync(device)
        wall = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
        if args.trace:
            with gzip.open(args.trace, "wt") as f:
                json.dump(trace, f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    print(f"\n{args.shape}, {args.mode} mode, {n_blocks} x {block_len} {args.data} tokens; one forward {fwd_s * 1e3:.1f} ms")
    print(f"search under the profiler: wall {wall * 1e3:.1f} ms, {probe.sparse_passes} sparse passes, "
          f"{probe.cett_evaluations} CETT evaluations, c {res.cett:.5f}, PPL ratio {res.ppl_ratio:.5f}")
    out = {"shape": args.shape, "mode": args.mode, "data": args.data, "forward_s": fwd_s, "wall_s": wall,
           "sparse_passes": probe.sparse_passes, "cett_evaluations": probe.cett_evaluations,
           **report(events, args.min_gap_us, args.top)}
    if args.out:
        atomic_write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
