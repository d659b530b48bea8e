#!/usr/bin/env python
"""Write the training-lab sweeps: ``configs/<sweep>/<run>.json`` and ``configs/plan.json``.

The table below is the whole design (issue 8, item 5); the JSON files are its output, committed
so that the GPU session runs exactly these (``tests/test_sweeps.py`` checks they are in sync).

* activation: ReLU and SiLU at ~1M, ~2M, ~4M (and ~8M if time allows) non-embedding parameters,
  width/depth ratio ~21-27, each to 200 tokens per non-embedding parameter (the paper: >= 190);
* width_depth: ReLU, seven shapes at ~2M non-embedding parameters (1.83M-2.21M), hidden/layers
  from 1.6 to 144 (the ~2M activation run is the 26.7 point);
* seeds, seeds_silu: the ~2M ReLU (SiLU) run with seeds 1 and 2 (seed 0 is the activation run);
* repetition: the ~2M ReLU run on the first 5% of every domain (many epochs) against the
  full-corpus run;
* moe (Fig. 2 on our own models): the ~2M ReLU shape as Mixtral-style MoE models of 8 experts (top-4) and
  16 experts (top-7), each with the dense run's active FFN width (k x d_expert = 448) and tokens, and a second
  training of the dense config (the Pareto baseline, and how far a rerun lands from the first).

All: gated FFN with d_ff ~ 2.75 x hidden (a multiple of 32), head dim 32, tied embeddings, the
corpus tokenizer's vocabulary (8,192), sequences of 512, 131,072 tokens per step (no gradient
accumulation on one GPU), AdamW lr 3e-3, betas (0.9, 0.95), weight decay 0.1, clip 1.0,
warmup-stable-decay (1% warmup, linear decay to 0.1 x over the last 10%), 24 log-spaced
checkpoints before the final one, bf16 autocast, regional torch.compile.

``plan.json`` orders the runs by importance (what must finish first), names each run's place in
every sweep it belongs to, and estimates its wall time on one H200 from FLOPs under a stated
throughput assumption (see ``assumed_tokens_per_s``); ``scripts/run_sweeps.py`` schedules from it.

Usage: ``python scripts/make_sweeps.py [--check]`` (``--check``: exit 1 if the files differ).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sparsing_utils.training import H200_BF16_DENSE_FLOPS, TrainConfig, make_plan

VOCAB = 8192  # the corpus tokenizer (scripts/build_corpus.py --vocab-size 8192)

COMMON = {
    "d_ff": None, "ffn_ratio": None, "tie_embeddings": True, "vocab_multiple": 64, "corpus": "corpus",
    "seq_len": 512, "global_batch_tokens": 131072, "micro_batch_size": None, "tokens_per_param": 200.0,
    "lr": 3e-3, "betas": (0.9, 0.95), "weight_decay": 0.1, "grad_clip": 1.0, "warmup_fraction": 0.01,
    "decay_fraction": 0.1, "decay_shape": "linear", "min_lr_ratio": 0.1, "n_checkpoints": 24,
    "first_checkpoint_fraction": 0.005, "heldout_tokens": 65536, "log_every": 25, "seed": 0, "dtype": "auto",
    "compile": True,
}

# (hidden, layers, d_ff): d_ff ~ 2.75 hidden rounded to a multiple of 32; heads = hidden / 32
SHAPES = {
    "1m": (128, 5, 352), "2m": (160, 6, 448), "4m": (192, 9, 512), "8m": (256, 10, 704),
    "d64-l40": (64, 40, 176), "d96-l18": (96, 18, 256), "d128-l10": (128, 10, 352), "d160-l6": (160, 6, 448),
    "d192-l5": (192, 5, 512), "d224-l3": (224, 3, 608), "d288-l2": (288, 2, 800),
}

# MoE runs train on the dense 2M run's tokens (200 per non-embedding parameter of the dense model), not 200
# per parameter of all their experts
MOE_TOKENS = {"tokens_per_param": None, "total_tokens": 381419520}

# (run name, shape, changes, {sweep: name in that sweep}) in priority order: what must finish first.
RUNS = [
    ("relu-2m", "2m", {}, {"activation": "relu-2m", "width_depth": "relu-d160-l6", "seeds": "relu-2m-seed0",
                           "repetition": "relu-2m-full"}),
    ("silu-2m", "2m", {"activation": "silu"}, {"activation": "silu-2m", "seeds_silu": "silu-2m-seed0"}),
    ("relu-1m", "1m", {}, {"activation": "relu-1m"}),
    ("silu-1m", "1m", {"activation": "silu"}, {"activation": "silu-1m"}),
    ("relu-4m", "4m", {}, {"activation": "relu-4m"}),
    ("silu-4m", "4m", {"activation": "silu"}, {"activation": "silu-4m"}),
    ("relu-2m-seed1", "2m", {"seed": 1}, {"seeds": "relu-2m-seed1"}),
    ("relu-2m-seed2", "2m", {"seed": 2}, {"seeds": "relu-2m-seed2"}),
    ("relu-2m-frac005", "2m", {"train_fraction": 0.05}, {"repetition": "relu-2m-frac005"}),
    ("relu-d128-l10", "d128-l10", {}, {"width_depth": "relu-d128-l10"}),
    ("relu-d288-l2", "d288-l2", {}, {"width_depth": "relu-d288-l2"}),
    ("relu-d64-l40", "d64-l40", {}, {"width_depth": "relu-d64-l40"}),
    ("relu-d224-l3", "d224-l3", {}, {"width_depth": "relu-d224-l3"}),
    ("relu-d96-l18", "d96-l18", {}, {"width_depth": "relu-d96-l18"}),
    ("relu-d192-l5", "d192-l5", {}, {"width_depth": "relu-d192-l5"}),
    ("relu-8m", "8m", {}, {"activation": "relu-8m"}),
    ("silu-8m", "8m", {"activation": "silu"}, {"activation": "silu-8m"}),
    # SiLU seeds: the noise floor of the rising, converging SiLU curve (seed 0 is the activation run)
    ("silu-2m-seed1", "2m", {"activation": "silu", "seed": 1}, {"seeds_silu": "silu-2m-seed1"}),
    ("silu-2m-seed2", "2m", {"activation": "silu", "seed": 2}, {"seeds_silu": "silu-2m-seed2"}),
    # Fig. 2 on our own models: MoE runs with the dense run's active FFN width (k x d_expert = 448) and
    # its tokens, against a second training of the dense config (also: how far a rerun of the same
    # config and seed lands from the first, GPU non-determinism only)
    ("relu-2m-rerun", "2m", {}, {"moe": "relu-2m-rerun"}),
    ("relu-2m-moe8", "2m", {"d_ff": 112, "num_experts": 8, "experts_top_k": 4, **MOE_TOKENS}, {"moe": "relu-2m-moe8"}),
    ("relu-2m-moe16", "2m", {"d_ff": 64, "num_experts": 16, "experts_top_k": 7, **MOE_TOKENS},
     {"moe": "relu-2m-moe16"}),
]

# Throughput assumption for the estimates (not a measurement): model FLOP utilisation on one H200
# of 15% below 2.5M non-embedding parameters, 20% below 5M, 25% above, at most 6M tokens/s, plus
# 6 us per kernel for ~80 kernels per layer and step (what deep, narrow models pay), plus fixed
# costs per run: 60 s for compiling, 1 s per checkpoint, 60 s for tracking.
FIXED_SECONDS = 60 + 60


def assumed_tokens_per_s(n: int, flops: float, layers: int, batch_tokens: int) -> float:
    mfu = 0.15 if n < 2.5e6 else (0.20 if n < 5e6 else 0.25)
    compute = batch_tokens * flops / (mfu * H200_BF16_DENSE_FLOPS)  # seconds per step
    launch = layers * 80 * 6e-6
    return min(6e6, batch_tokens / (compute + launch))


def build() -> dict[str, dict]:
    files: dict[str, dict] = {}
    plan = {"about": __doc__.split("\n\n")[0], "vocab_size": VOCAB,
            "assumption": "estimates: MFU 15% (< 2.5M params), 20% (< 5M), 25% (larger) of 989.4 TFLOP/s, at most "
                          "6M tokens/s, + 80 kernels x 6 us per layer and step, + 120 s per run (compile, tracking) "
                          "+ 1 s per checkpoint; a guess, to be replaced by benchmarks/bench_training.py numbers",
            "runs": []}
    for priority, (name, shape, changes, sweeps) in enumerate(RUNS):
        d, layers, d_ff = SHAPES[shape]
        cfg = TrainConfig(**{**COMMON, "hidden_size": d, "num_layers": layers, "num_heads": d // 32, "d_ff": d_ff,
                             "name": name, **changes})
        p = make_plan(cfg, VOCAB)
        path = f"configs/{next(iter(sweeps))}/{name}.json"
        files[path] = cfg.to_dict()
        tps = assumed_tokens_per_s(p.non_embedding_params, p.flops_per_token, layers, cfg.global_batch_tokens)
        est = p.total_tokens / tps + FIXED_SECONDS + len(p.checkpoint_steps)
        plan["runs"].append({
            "run": name, "config": path, "priority": priority, "sweeps": sweeps,
            "non_embedding_params": p.non_embedding_params, "width_depth_ratio": round(d / layers, 2),
            "total_tokens": p.total_tokens, "steps": p.total_steps, "flops_per_token": p.flops_per_token,
            "assumed_tokens_per_s": round(tps), "est_seconds": round(est)})
    files["configs/plan.json"] = plan
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only compare with the files on disk")
    args = ap.parse_args(argv)
    stale = []
    for rel, payload in build().items():
        text = json.dumps(payload, indent=1) + "\n"
        path = REPO / rel
        if not path.is_file() or path.read_text() != text:
            stale.append(rel)
            if not args.check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    if args.check and stale:
        print("out of date (run scripts/make_sweeps.py):", *stale, sep="\n  ")
        return 1
    plan = build()["configs/plan.json"]
    total = sum(r["est_seconds"] for r in plan["runs"])
    print(f"{'run':18} {'N':>9} {'d/L':>6} {'tokens':>14} {'tok/s':>10} {'est s':>6}")
    for r in plan["runs"]:
        print(f"{r['run']:18} {r['non_embedding_params']:>9,} {r['width_depth_ratio']:>6} {r['total_tokens']:>14,} "
              f"{r['assumed_tokens_per_s']:>10,} {r['est_seconds']:>6}")
    print(f"total {total / 60:.1f} GPU-minutes (one run per GPU at a time); "
          f"{'up to date' if not stale else 'written: ' + str(len(stale)) + ' files'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
