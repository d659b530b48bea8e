"""PPL-p% on a model spread over several GPUs with ``device_map="auto"`` (issue 4, item 5).

    python benchmarks/check_device_map.py --gpus 2

Saves a random-initialised Llama (the 836M shape of issue 4 unless --small) to a temporary
folder, loads it back with ``device_map="auto"`` (what ``load_model(..., device_map="auto")``
passes to transformers) and a per-GPU memory cap that forces the layers onto every GPU, runs the PPL-1% search (memory and
stream modes) on self-sampled tokens, and compares with the same search on one GPU.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_search as bs

from sparsing_utils.probe import SparsityProbe
from sparsing_utils.search import search_ppl_p


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--load-ids", default=None, help="token ids saved by bench_search.py --save-ids")
    ap.add_argument("--small", action="store_true", help="llama-tiny instead of the 836M shape")
    args = ap.parse_args()
    name = "llama-tiny" if args.small else "llama836m"
    model, info = bs.random_llama(name, init_std=bs.INIT_STD[name], seed=0, dtype=torch.bfloat16,
                                  device=torch.device("cuda:0"), max_len=2048)
    tokens, block_len = bs.DEFAULTS[name]
    ids = torch.load(args.load_ids) if args.load_ids else bs.self_generated_ids(
        model, tokens // block_len, block_len, seed=0, gen_len=256, batch_size=tokens // block_len)
    blocks = SimpleNamespace(input_ids=ids, attention_mask=torch.ones_like(ids))
    rows = []
    for mode in ("memory", "stream"):
        torch.cuda.synchronize()
        t = time.perf_counter()
        r = search_ppl_p(SparsityProbe(model, blocks, mode=mode), 1.0)
        torch.cuda.synchronize()
        rows.append(("1 GPU", mode, time.perf_counter() - t, r))
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        del model
        torch.cuda.empty_cache()
        cap = {i: f"{int(weights / args.gpus / 2**20 * 1.15)}MiB" for i in range(args.gpus)}
        from transformers import AutoModelForCausalLM

        spread = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="auto",
                                                      max_memory=cap).eval()
    devices = sorted({str(p.device) for p in spread.parameters()})
    print(f"layers spread over {devices} (cap {cap})")
    for mode in ("memory", "stream"):
        torch.cuda.synchronize()
        t = time.perf_counter()
        r = search_ppl_p(SparsityProbe(spread, blocks, mode=mode), 1.0)
        torch.cuda.synchronize()
        rows.append((f"device_map over {len(devices)} GPUs", mode, time.perf_counter() - t, r))
    print("| placement | mode | wall s | dense PPL | c | act. ratio | PPL ratio | converged |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for where, mode, sec, r in rows:
        print(f"| {where} | {mode} | {sec:.2f} | {r.ppl_dense:.4f} | {r.cett:.6f} | {r.activation_ratio:.5f} | "
              f"{r.ppl_ratio:.5f} | {r.converged} |")


if __name__ == "__main__":
    main()
