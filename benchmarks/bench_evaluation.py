"""Speed of `sparsing evaluate`: items per second, dense and PPL-p% sparse, side by side in one run.

The sparse model runs the harness's forwards with the metric's CETT hooks (a mask per layer, counted
for the activation ratio), so its cost over the dense model is the hooks' cost. Issue 9 asks for the
sparse evaluation to stay within 1.3x of the dense time. Settings alternate (dense, sparse, dense,
sparse, ...) on the same items so that a change in machine load hits both; the median of the repeats
is reported, with the load average before and after (the numbers are not clean on a busy machine).

    python benchmarks/bench_evaluation.py --tasks piqa,lambada --limit 100 --repeats 3 --out bench_eval.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparsing_utils.evaluation import evaluate_model
from sparsing_utils.jsonio import atomic_write_json
from sparsing_utils.models import load_model
from sparsing_utils.results import SparsityReport


def forward_pass_ratio(loaded, result, batch_size: int, repeats: int) -> dict:
    """The hooks' cost alone: one [batch, 64] forward, dense and under sparse_inference with the
    evaluation's counting recorder, alternating; medians in ms."""
    from sparsing_utils.evaluation import ActivationCounter
    from sparsing_utils.ffn import find_ffn_sites
    from sparsing_utils.results import sparse_inference

    ids = torch.randint(0, loaded.tokenizer.vocab_size, (batch_size, 64), generator=torch.Generator().manual_seed(0))
    counter = ActivationCounter(find_ffn_sites(loaded.model))
    times = {"dense": [], "sparse": []}
    with torch.no_grad():
        loaded.model(ids)
        for _ in range(repeats):
            t = time.perf_counter()
            loaded.model(ids)
            times["dense"].append(time.perf_counter() - t)
            with sparse_inference(loaded.model, result, record=counter.record):
                t = time.perf_counter()
                loaded.model(ids)
                times["sparse"].append(time.perf_counter() - t)
    dense, sparse = statistics.median(times["dense"]) * 1e3, statistics.median(times["sparse"]) * 1e3
    return {"repeats": repeats, "dense_ms": dense, "sparse_ms": sparse, "ratio": sparse / dense, "times_s": times}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--result", default=str(ROOT / "data" / "results" / "smollm2_pydoc_8192.json"),
                    help="PPL-p%% result of the same model (sparsing measure)")
    ap.add_argument("--p", type=float, default=10.0, help="which p of the result (10: the sparsest)")
    ap.add_argument("--tasks", default="piqa,lambada")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out", default=None, help="JSON with every timing")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = [t for t in args.tasks.split(",") if t]
    report = SparsityReport.load(args.result)
    loaded = load_model(args.model, dtype="float32", device="cpu")
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {"dense": [], "sparse": []}
    for _ in range(args.repeats):
        for setting in ("dense", "sparse"):
            ev = evaluate_model(loaded, tasks, data_dir=args.data_dir, limit=args.limit, batch_size=args.batch_size,
                                sparsity=report if setting == "sparse" else None, p=args.p)
            runs[setting].append({t: {"items": r.n_items, "seconds": r.seconds, "tokens": r.tokens,
                                      "activation_ratio": r.activation_ratio} for t, r in ev.tasks.items()})
    forward = forward_pass_ratio(loaded, report.result(args.p), args.batch_size, repeats=max(5, 3 * args.repeats))
    load_after = os.getloadavg()
    print(f"model {args.model} | PPL-{args.p:g}% | limit {args.limit} | batch {args.batch_size} | "
          f"threads {torch.get_num_threads()} | {args.repeats} repeats (median) | load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print(f"{'task':<11} {'items':>6} {'dense it/s':>10} {'sparse it/s':>11} {'sparse/dense time':>17} "
          f"{'act. ratio':>10}")
    summary = {}
    for t in tasks:
        dense = statistics.median(r[t]["seconds"] for r in runs["dense"])
        sparse = statistics.median(r[t]["seconds"] for r in runs["sparse"])
        items = runs["dense"][0][t]["items"]
        summary[t] = {"items": items, "dense_items_per_s": items / dense, "sparse_items_per_s": items / sparse,
                      "time_ratio": sparse / dense, "activation_ratio": runs["sparse"][0][t]["activation_ratio"]}
        s = summary[t]
        print(f"{t:<11} {items:>6} {s['dense_items_per_s']:>10.2f} {s['sparse_items_per_s']:>11.2f} "
              f"{s['time_ratio']:>17.3f} {s['activation_ratio']:>10.4f}")
    total_dense = sum(statistics.median(r[t]["seconds"] for r in runs["dense"]) for t in tasks)
    total_sparse = sum(statistics.median(r[t]["seconds"] for r in runs["sparse"]) for t in tasks)
    print(f"all tasks: sparse/dense time {total_sparse / total_dense:.3f} (target <= 1.3)")
    print(f"forward pass alone ([{args.batch_size}, 64] tokens, {forward['repeats']} alternating repeats, median): "
          f"dense {forward['dense_ms']:.1f} ms, sparse with counting {forward['sparse_ms']:.1f} ms, "
          f"ratio {forward['ratio']:.3f}")
    if args.out:
        atomic_write_json(args.out, {"args": vars(args), "threads": torch.get_num_threads(),
                                     "load_average_before": load_before, "load_average_after": load_after,
                                     "runs": runs, "summary": summary,
                                     "time_ratio_all": total_sparse / total_dense, "forward_pass": forward,
                                     "measured_at": time.time()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
