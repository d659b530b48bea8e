"""Operators and time of one exact CETT evaluation of an MoE model in memory mode, with the stored
expert rows padded once (``ExpertRows.cat(padded=True)``, the probe's way since session 9) against
rows padded again at every evaluation (the way before), side by side in one process (issue 10).

On CUDA the products of an expert's rows are padded to ``cett.gemm_rows`` rows; on the CPU no padding
is needed, so there the CUDA rule is applied for the comparison (``--cuda-padding``, the default on
the CPU). Each round evaluates every layer at one threshold (``probe.layer_cett``, no forward pass),
alternating the two ways; printed: the ATen operators per evaluation (``torch.profiler``, CPU
events) and the median time per evaluation.

    python benchmarks/moe_eval_ops.py                        # CPU, the CPU mixtral-moe shape
    python benchmarks/moe_eval_ops.py --device cuda --rounds 30
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.dirname(_HERE))

import bench_search as bs
import bench_shapes as bsh

from sparsing_utils import cett
from sparsing_utils.expert_rows import ExpertRows
from sparsing_utils.probe import SparsityProbe


def unbuffered(a):
    """The same stored rows without their padded buffers: the statistics pad them at each evaluation."""
    if not isinstance(a, ExpertRows):
        return a
    return ExpertRows(a.n_tokens, a.d_expert, a.rows, a.values, a.shared, a.lead, a.ascending)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="mixtral-moe", choices=[s for s in bsh.SHAPES if "moe" in s])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--rounds", type=int, default=20, help="timed evaluations of each way, alternating")
    ap.add_argument("--cuda-padding", choices=["auto", "yes", "no"], default="auto",
                    help="apply CUDA's row padding on the CPU (auto: yes on the CPU)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device here: use --device cpu")
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    if device.type == "cpu" and args.cuda_padding != "no":
        rule = cett.gemm_rows
        cett.gemm_rows = lambda n, dev: rule(n, torch.device("cuda"))  # the CUDA rule on the CPU
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n_blocks, block_len = bsh.TOKENS[device.type]
    model, info = bsh.build_model(args.shape, device, dtype, args.seed, block_len)
    blocks = bsh.token_blocks(model, info["vocab"], device, "random", args.seed, n_blocks, block_len)
    probe = SparsityProbe(model, blocks, mode="memory", batch_size=max(1, 32768 // block_len)).prepare()
    eps = probe.thresholds_for(0.1, exact=False)[0]  # [layers] a threshold near the search's
    held = list(probe._acts)
    ways = {"padded once (buffers)": held, "padded at each evaluation": [unbuffered(a) for a in held]}
    from torch.profiler import ProfilerActivity, profile

    out = {"shape": args.shape, "device": str(device), "tokens": n_blocks * block_len, "ways": {}}
    answers = {}
    for name, acts in ways.items():  # operators of one evaluation (warm)
        probe._acts = acts
        answers[name] = probe.layer_cett(eps)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            probe.layer_cett(eps)
        ops = [e for e in prof.events() if e.name.startswith("aten::")]
        top = sum(1 for e in ops if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
        out["ways"][name] = {"aten_ops": len(ops), "top_level_aten_ops": top, "times_s": []}
    same = torch.equal(*answers.values())
    for _ in range(args.rounds):
        for name, acts in ways.items():
            probe._acts = acts
            bs.sync(device)
            t = time.perf_counter()
            probe.layer_cett(eps)
            bs.sync(device)
            out["ways"][name]["times_s"].append(time.perf_counter() - t)
    layers = len(probe.sites)
    print(f"{args.shape} on {device} ({info['parameters'] / 1e6:.1f}M parameters, {layers} layers, "
          f"{out['tokens']} tokens), one exact evaluation of every layer; answers bitwise equal: {same}\n")
    print("| stored expert rows | ATen operators per evaluation (top-level) | median ms per evaluation (range) |")
    print("|---|---:|---|")
    for name, w in out["ways"].items():
        ts = [t * 1e3 for t in w["times_s"]]
        w["median_ms"] = statistics.median(ts)
        print(f"| {name} | {w['aten_ops']} ({w['top_level_aten_ops']}) | {w['median_ms']:.2f} "
              f"({min(ts):.2f}-{max(ts):.2f}) |")
    a, b = (w["median_ms"] for w in out["ways"].values())
    print(f"\npadded at each evaluation / padded once: {b / a:.2f}x (medians of {args.rounds}, alternating)")
    out["answers_equal"] = same
    if not math.isfinite(a):
        raise SystemExit("non-finite timing")
    return out


if __name__ == "__main__":
    main()
