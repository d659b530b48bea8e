"""What a search's first call in a fresh process pays that its second does not (issue 10, section 2).

The first call of :func:`~sparsing_utils.search.search_ppl_p` in a process is slower than the second
(RESULTS.md: 2-4 forward passes on the dense shapes, 8-13 on the MoE shape, at 16,384 tokens on an H200).
Under CUDA's lazy module loading a kernel's module is loaded on the first launch of any of its kernels,
inside that launch call; cuBLAS chooses an algorithm on the first product of each shape. This script
shows where that goes: in a fresh child process per shape (the models and tokens of
``bench_shapes.py``, after the plain forwards that time one forward pass, so the forward's kernels are
loaded), the search runs twice under ``torch.profiler``; from the first call's trace it lists every
launch call (runtime or driver API) that took at least ``--min-ms``, with the kernel it launched and
the ATen operator it ran in, and for each operator its host time in the first call minus the second.

    python benchmarks/first_call_loads.py --shapes llama-12x768,gpt-neox-12x768,mixtral-moe --out loads.json

Needs CUDA (the lazy loading is the CUDA driver's).
"""
from __future__ import annotations

import argparse
import bisect
import collections
import json
import os
import subprocess
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def long_launches(events: list[dict], min_ms: float) -> list[dict]:
    """Launch calls of at least ``min_ms`` in a chrome trace: ``{op, kernel, ms}`` each, ``op`` the
    innermost ATen operator running on the host at the call (``?`` for none)."""
    kernels = {e["args"]["correlation"]: e["name"] for e in events
               if e.get("cat") == "kernel" and "correlation" in e.get("args", {})}
    ops = sorted((e["ts"], e["ts"] + e.get("dur", 0.0), e["name"]) for e in events if e.get("cat") == "cpu_op")
    starts = [o[0] for o in ops]
    out = []
    for e in events:
        if e.get("cat") not in ("cuda_runtime", "cuda_driver") or e.get("name") not in LAUNCH_CALLS:
            continue
        if e.get("dur", 0.0) < min_ms * 1e3:
            continue
        t, op = e["ts"], "?"
        for j in range(bisect.bisect_right(starts, t) - 1, -1, -1):
            if ops[j][1] >= t:  # the latest-started operator still running: the innermost
                op = ops[j][2]
                break
            if t - ops[j][0] > 5e6:
                break
        out.append({"op": op, "kernel": kernels.get(e.get("args", {}).get("correlation"), "?")[:90],
                    "ms": e["dur"] / 1e3})
    return out


def by_frame(events) -> dict[str, float]:
    """Host self time (us) per ``operator <- innermost sparsing_utils / transformers frame`` of a
    profile recorded with Python stacks (the frames are the operators' ancestors in the event tree)."""
    out: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.device_type.name != "CPU" or e.name.startswith(("<built-in", "torch/")) or ".py(" in e.name:
            continue
        frame, p = "?", e.cpu_parent
        while p is not None:
            if "sparsing_utils/" in p.name or "transformers/" in p.name:
                frame = p.name.split("site-packages/")[-1]
                break
            p = p.cpu_parent
        out[f"{e.name} <- {frame}"] += e.self_cpu_time_total
    return dict(out)


def _trace(prof) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def run_child(args) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, _HERE)
    import bench_search as bs
    import bench_shapes as bsh

    from sparsing_utils.probe import SparsityProbe
    from sparsing_utils.search import search_ppl_p

    device = torch.device("cuda")
    n_blocks, block_len = bsh.TOKENS["cuda"]
    model, info = bsh.build_model(args.child, device, torch.bfloat16, args.seed, block_len)
    blocks = bsh.token_blocks(model, info["vocab"], device, "self", args.seed, n_blocks, block_len)
    batch = max(1, 32768 // block_len)
    fwd_s = bs.time_forward(model, blocks, batch, repeats=5)["median_s"]
    out: dict = {"shape": args.child, "forward_s": fwd_s, "mode": args.mode}
    averages = {}
    for label in ("first", "second"):
        probe = SparsityProbe(model, blocks, mode=args.mode, batch_size=batch, name=args.child)
        bs.sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=args.stack) as prof:
            t = time.perf_counter()
            res = search_ppl_p(probe, args.p, tol=args.tol)
            bs.sync(device)
            wall = time.perf_counter() - t
        probe.release()
        out[label] = {"wall_s": wall, "forward_equivalents": wall / fwd_s, "sparse_passes": probe.sparse_passes,
                      "cett": res.cett, "ppl_ratio": res.ppl_ratio}
        if args.stack:  # per operator and the innermost package frame that called it
            averages[label] = by_frame(prof.events())
        else:
            averages[label] = {e.key: e.self_cpu_time_total for e in prof.key_averages()}  # us per operator
        if label == "first":
            out["long_launches"] = long_launches(_trace(prof), args.min_ms)
    delta = {k: (v - averages["second"].get(k, 0.0)) / 1e3 for k, v in averages["first"].items()}
    out["host_ms_first_minus_second"] = dict(sorted(delta.items(), key=lambda kv: -kv[1])[:args.top])
    return out


def report(row: dict, top: int) -> None:
    f, s = row["first"], row["second"]
    launches = row["long_launches"]
    print(f"\n### {row['shape']} ({row['mode']} mode): one forward {row['forward_s'] * 1e3:.1f} ms; under the profiler "
          f"first call {f['wall_s'] * 1e3:.0f} ms ({f['sparse_passes']} sparse passes), second "
          f"{s['wall_s'] * 1e3:.0f} ms ({s['sparse_passes']}); launches >= the threshold: {len(launches)}, "
          f"{sum(x['ms'] for x in launches):.1f} ms\n")
    by_op = collections.defaultdict(lambda: [0.0, 0, set()])
    for x in launches:
        b = by_op[x["op"]]
        b[0] += x["ms"]
        b[1] += 1
        b[2].add(x["kernel"][:60])
    print("| operator | long launches | ms | kernels (first 60 characters) |\n|---|---:|---:|---|")
    for op, (ms, n, names) in sorted(by_op.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"| `{op}` | {n} | {ms:.1f} | {'; '.join(sorted(names))[:200]} |")
    print("\n| operator | host ms, first call minus second |\n|---|---:|")
    for op, ms in list(row["host_ms_first_minus_second"].items())[:top]:
        print(f"| `{op}` | {ms:.1f} |")


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="llama-12x768,gpt-neox-12x768,mixtral-moe",
                    help="comma-separated shapes of bench_shapes.py")
    ap.add_argument("--mode", choices=["memory", "stream"], default="memory")
    ap.add_argument("--p", type=float, default=1.0)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-ms", type=float, default=1.0, help="launch calls at least this long are listed")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--stack", action="store_true",
                    help="also the package frames of each operator (Python stacks: host times inflated, compare deltas; "
                         "names them on the CPU, not yet on the H200, where every operator came back under '?')")
    ap.add_argument("--out", default=None, help="all results as JSON (written atomically)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run_child(args)))
        return []
    sys.path.insert(0, _HERE)
    import bench_shapes as bsh

    shapes = args.shapes.split(",")
    unknown = [s for s in shapes if s not in bsh.SHAPES]
    if unknown:
        ap.error(f"unknown shapes {unknown}: choose from {', '.join(bsh.SHAPES)}")
    import torch

    if not torch.cuda.is_available():
        ap.error("the lazy loading measured here is CUDA's: run on a machine with a GPU")
    rows = []
    root = os.path.dirname(_HERE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    for shape in shapes:  # a fresh process each: nothing loaded but what its own forward loaded
        cmd = [sys.executable, os.path.abspath(__file__), "--child", shape, "--mode", args.mode, "--p", str(args.p),
               "--tol", str(args.tol), "--seed", str(args.seed), "--min-ms", str(args.min_ms), "--top", str(args.top),
               *(["--stack"] if args.stack else [])]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
        lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            raise SystemExit(f"{shape}: the child failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        row = json.loads(lines[-1][len("RESULT "):])
        report(row, args.top)
        rows.append(row)
    if args.out:
        from sparsing_utils.jsonio import atomic_write_json

        atomic_write_json(args.out, {"argv": sys.argv[1:], "shapes": rows})
    return rows


if __name__ == "__main__":
    main()
