"""Do first-order (gradient) predictions explain the bumps of the PPL ratio? (issue 10, section 2)

The issue suggests a first guess of ``c`` from a first-order estimate of the loss increase of each
layer's truncation. On the self-sampled random models of ``bench_shapes.py`` the PPL ratio is bumpy
(RESULTS.md, "What the search does now"): between neighbouring ``c`` it scatters by two to three
times the 0.1-point tolerance, which is what makes the number of sparse passes a draw. If those
bumps were first order in the truncation, a backward pass would predict them and the search could
step on a smooth curve. This script measures whether they are.

On a grid of ``c`` (exact thresholds, ``SparsityProbe.thresholds_for``) it runs, for each ``c``,
the package's sparse pass (the measured ``log r(c)``, log of the sparse/dense PPL ratio) and a
sparse forward + backward of its own (the same truncation, ``|a_i| * ||W_down[:, i]|| > eps_l``,
in a forward pre-hook of the output projection), which gives ``G = d(sum of token NLL) / d a``
at every layer. The first-order change of the mean NLL when the kept set goes from ``K`` to
``K'`` is ``sum_l sum_{t,i} G a (1[K'] - 1[K]) / N`` (``a`` before truncation). Two predictions
of ``log r(c_j)``:

* ``from_dense``: from the dense pass (``K`` = all neurons; the first-order term alone);
* ``from_prev``: ``log r(c_{j-1})`` plus the first-order change from the sparse point ``c_{j-1}``
  (a local linearisation: it contains the interactions with everything already truncated).

Summary per shape: the standard deviation of the increments ``log r(c_j) - log r(c_{j-1})``
around a smooth trend (quadratic in ``log c``), against that of the prediction errors
``log r(c_j) - from_prev_j``. If the first-order term carried the bumps, the second would be
much smaller than the first.

Usage::

    python benchmarks/first_order_bumps.py --device cpu --shapes llama-12x768 --c-min 0.05 --c-max 0.2
    python benchmarks/first_order_bumps.py --device cuda --shapes llama-12x768,deep-narrow --out fo.json
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_search as bs
import bench_shapes as bsh

from sparsing_utils.ffn import find_ffn_sites
from sparsing_utils.jsonio import atomic_write_json
from sparsing_utils.probe import SparsityProbe
from sparsing_utils.rules import CETTRule


def forward_backward(model, sites, col_norms, ids: torch.Tensor, eps: torch.Tensor | None, batch: int):
    """Mean next-token NLL of a forward with every layer's ``a`` truncated at ``eps`` (None: dense),
    and per layer ``(score [tokens, d_ff], G * a [tokens, d_ff])``: ``score = |a| ||W_down[:, i]||``
    and ``G = d(sum NLL) / d(a after truncation)``, both float32, ``a`` before truncation."""
    held: dict[int, tuple] = {}
    out: dict[int, list] = {}
    total, n = 0.0, 0

    def make_hook(i: int):
        def pre(module, args):
            a = args[0]  # [batch, seq, d_ff]
            score = a.detach().abs().float() * col_norms[i]
            a_cut = a if eps is None else a * (score > float(eps[i]))
            a_cut.retain_grad()
            held[i] = (score, a.detach(), a_cut)
            return (a_cut,)
        return pre

    handles = [s.module.register_forward_pre_hook(make_hook(s.index)) for s in sites]
    try:
        emb = model.get_input_embeddings()
        for b0 in range(0, ids.shape[0], batch):
            chunk = ids[b0:b0 + batch].to(emb.weight.device)
            x = emb(chunk).detach().requires_grad_(True)
            with torch.enable_grad():
                logits = model(inputs_embeds=x).logits
                nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), chunk[:, 1:].reshape(-1),
                                      reduction="none")
                nll.sum().backward()
            total += float(nll.detach().sum())
            n += nll.numel()
            for i, (score, a, a_cut) in held.items():
                d = score.shape[-1]
                out.setdefault(i, []).append((score.reshape(-1, d), (a_cut.grad.float() * a.float()).reshape(-1, d)))
            held.clear()
    finally:
        for h in handles:
            h.remove()
    return total / n, {i: (torch.cat([p[0] for p in v]), torch.cat([p[1] for p in v])) for i, v in out.items()}, n


def first_order_change(state, eps_from: torch.Tensor | None, eps_to: torch.Tensor, n: int) -> float:
    """First-order change of the mean NLL when the thresholds go from ``eps_from`` (None: dense) to ``eps_to``."""
    total = 0.0
    for i, (score, ga) in state.items():
        keep_to = (score > float(eps_to[i])).float()
        keep_from = torch.ones_like(keep_to) if eps_from is None else (score > float(eps_from[i])).float()
        total += float((ga * (keep_to - keep_from)).double().sum())
    return total / n


def spread_around_trend(c: np.ndarray, y: np.ndarray) -> float:
    """Standard deviation of ``y`` around a quadratic in ``log c``."""
    x = np.log(c)
    return float(np.std(y - np.polyval(np.polyfit(x, y, 2), x)))


def run_shape(name: str, args) -> dict:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n_blocks, block_len = bsh.TOKENS[device.type]
    model, info = bsh.build_model(name, device, dtype, args.seed, block_len)
    for p in model.parameters():
        p.requires_grad_(False)
    gen_len = min(bsh.GEN_LEN[device.type], block_len)
    ids = bs.self_generated_ids(model, n_blocks, block_len, seed=args.seed, gen_len=gen_len,
                                batch_size=n_blocks * math.ceil(block_len / gen_len))
    blocks = SimpleNamespace(input_ids=ids, attention_mask=torch.ones_like(ids))
    sites = find_ffn_sites(model)
    if any(s.moe is not None for s in sites):
        raise SystemExit(f"{name}: MoE layers are not covered by this script (their a is routed per expert)")
    col_norms = {s.index: s.column_norms() for s in sites}
    probe = SparsityProbe(model, blocks, mode="memory")
    probe.prepare()
    batch = max(1, (32768 if device.type == "cuda" else 4096) // block_len)
    dense_nll, dense_state, n = forward_backward(model, sites, col_norms, ids, None, batch)
    grid = np.exp(np.linspace(math.log(args.c_min), math.log(args.c_max), args.points))
    rows, prev = [], None
    for c in grid:
        eps, _ = probe.thresholds_for(float(c))
        stats = probe.sparse_pass(CETTRule(eps))
        nll, state, _ = forward_backward(model, sites, col_norms, ids, eps, batch)
        row = {"c": float(c), "log_ratio": math.log(stats.ppl / probe.dense.ppl), "log_ratio_hooked": nll - dense_nll,
               "from_dense": first_order_change(dense_state, None, eps, n)}
        if prev is not None:
            row["from_prev"] = prev[1] + first_order_change(prev[2], prev[0], eps, n)
            row["prev_log_ratio"] = prev[1]
        prev = (eps, nll - dense_nll, state)
        rows.append(row)
        bs.log(f"{name}: c {c:.4f} log r {row['log_ratio']:.5f} from dense {row['from_dense']:+.5f}"
               + (f" from previous {row['from_prev']:.5f}" if "from_prev" in row else ""))
    c = np.array([r["c"] for r in rows[1:]])
    inc = np.array([r["log_ratio"] - r["prev_log_ratio"] for r in rows[1:]])
    err = np.array([r["log_ratio"] - r["from_prev"] for r in rows[1:]])
    lr = np.array([r["log_ratio"] for r in rows])
    summary = {"increments_sd": spread_around_trend(c, inc), "local_first_order_error_sd": spread_around_trend(c, err),
               "log_ratio_sd": spread_around_trend(grid, lr),
               "log_ratio_minus_dense_first_order_sd": spread_around_trend(grid, lr - np.array([r["from_dense"]
                                                                                               for r in rows])),
               "hooked_vs_package_max_abs": float(max(abs(r["log_ratio"] - r["log_ratio_hooked"]) for r in rows))}
    return {"shape": name, "model": info, "tokens": int(n), "rows": rows, "summary": summary}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default="llama-12x768", help="comma-separated names of bench_shapes.SHAPES (dense)")
    ap.add_argument("--c-min", type=float, default=0.1)
    ap.add_argument("--c-max", type=float, default=0.3)
    ap.add_argument("--points", type=int, default=21)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    unknown = [s for s in args.shapes.split(",") if s not in bsh.SHAPES]
    if unknown:
        ap.error(f"unknown shapes {unknown}; choose from {sorted(bsh.SHAPES)}")
    if not 0 < args.c_min < args.c_max < 1 or args.points < 4:
        ap.error("need 0 < --c-min < --c-max < 1 and --points >= 4")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [run_shape(name, args) for name in args.shapes.split(",")]
    print("\n| shape | tokens | sd of log r around trend | same minus first order from dense | "
          "sd of increments | sd of local first-order errors |\n|---|---:|---:|---:|---:|---:|")
    for r in results:
        s = r["summary"]
        print(f"| {r['shape']} | {r['tokens']} | {s['log_ratio_sd']:.5f} | {s['log_ratio_minus_dense_first_order_sd']:.5f} "
              f"| {s['increments_sd']:.5f} | {s['local_first_order_error_sd']:.5f} |")
    if args.out:
        atomic_write_json(args.out, {"args": vars(args), "results": results})
    return results


if __name__ == "__main__":
    main()
