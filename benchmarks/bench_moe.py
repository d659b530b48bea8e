"""PPL-p% on a Mixture-of-Experts model: memory mode against stream mode (issue 10, section 1).

A random OLMoE-style model (``--experts`` experts of width ``--d-expert``, top ``--top-k``, hidden
``--hidden``, ``--layers`` layers; float32 on the CPU, bf16 on CUDA), on tokens sampled uniformly.
For each mode: the PPL-p% search's wall time, its sparse and dense passes, what memory mode stores
(each expert's activations on the tokens routed to it, ``tokens x layers x top-k x d_expert`` values
and their token indices; the full virtual width would be ``E / top-k`` times larger) and the process's peak
memory (CUDA: the allocator's peak; CPU: the resident set's high-water mark, which only grows, so
stream mode runs first). Also the cost of the hooked forward (transformers' eager expert loop
showing ``a``) against the model's own forward, and whether both modes reach the same answer.

Usage::

    python benchmarks/bench_moe.py --out moe.json                   # CPU defaults (minutes)
    python benchmarks/bench_moe.py --device cuda --layers 16 --hidden 2048 --experts 64 --d-expert 1024 \\
        --top-k 8 --tokens 16384 --block-len 2048                  # OLMoE-1B-7B's shape
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import torch

from sparsing_utils.jsonio import atomic_write_json
from sparsing_utils.probe import SparsityProbe
from sparsing_utils.rules import DenseRule, apply_rule
from sparsing_utils.search import search_ppl_p


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def build(args, device):
    import transformers as tf

    config = tf.OlmoeConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                            num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
                            intermediate_size=args.d_expert, num_experts=args.experts, num_experts_per_tok=args.top_k,
                            max_position_embeddings=max(4096, args.block_len), initializer_range=args.init_std,
                            bos_token_id=None, eos_token_id=None, pad_token_id=None)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = tf.OlmoeForCausalLM(config).to(dtype).eval()
    ids = torch.randint(0, args.vocab, (args.tokens // args.block_len, args.block_len),
                        generator=torch.Generator().manual_seed(args.seed))
    return model, ids


class Blocks:
    def __init__(self, ids):
        self.input_ids, self.attention_mask = ids, torch.ones_like(ids)


def timed_forward(model, ids, device, hooked: bool) -> float:
    def run():
        with torch.no_grad():
            model(input_ids=ids.to(device), use_cache=False)

    run()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    if hooked:
        with apply_rule(model, DenseRule()):
            run()
    else:
        run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--d-expert", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--block-len", type=int, default=512)
    ap.add_argument("--p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init-std", type=float, default=0.1, help="weight init std (0.02 leaves the FFN negligible)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    model, ids = build(args, device)
    width = args.experts * args.d_expert
    out = {"shape": vars(args), "virtual_width": width, "device": str(device), "threads": torch.get_num_threads(),
           "load_avg_1min_before": os.getloadavg()[0]}
    batch = ids[: max(1, 4096 // args.block_len)]
    out["forward_s"] = {"model_own": timed_forward(model, batch, device, False),
                        "hooked_eager_loop": timed_forward(model, batch, device, True)}
    results = {}
    for mode in ("stream", "memory"):  # stream first: the CPU's peak resident set only grows
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        before = peak_bytes(device)
        t0 = time.perf_counter()
        probe = SparsityProbe(model, Blocks(ids), mode=mode)
        r = search_ppl_p(probe, args.p)
        seconds = time.perf_counter() - t0
        stored = probe.stored_bytes
        results[mode] = {"seconds": seconds, "sparse_passes": probe.sparse_passes, "dense_passes": probe.dense_passes,
                         "cett": r.cett, "ppl_ratio": r.ppl_ratio, "converged": r.converged,
                         "activation_ratio": r.activation_ratio, "activation_ratio_ran": r.activation_ratio_ran,
                         "stored_activation_bytes": stored, "peak_bytes": peak_bytes(device),
                         "peak_bytes_before": before, "thresholds": r.thresholds}
        print(f"{mode}: {seconds:.1f} s, {probe.sparse_passes} sparse + {probe.dense_passes} dense passes, "
              f"c {r.cett:.5f}, ratio {r.ppl_ratio:.4f}, activation {r.activation_ratio:.4f} (all experts) / "
              f"{r.activation_ratio_ran:.4f} (experts that ran), stored {stored / 2**20:.0f} MiB, "
              f"peak {results[mode]['peak_bytes'] / 2**20:.0f} MiB", file=sys.stderr)
        del probe
    out["modes"] = results
    out["same_answer"] = (abs(results["memory"]["cett"] - results["stream"]["cett"]) < 1e-9
                          and max(abs(a - b) for a, b in zip(results["memory"]["thresholds"],
                                                              results["stream"]["thresholds"])) < 1e-5)
    size = next(model.parameters()).element_size()
    out["stored_expected_bytes"] = args.tokens * args.layers * args.top_k * (args.d_expert * size + 8)  # + int64 rows
    out["full_width_bytes"] = args.tokens * args.layers * width * size  # tokens x layers x E d_expert x bytes
    out["load_avg_1min_after"] = os.getloadavg()[0]
    print(json.dumps({k: v for k, v in out.items() if k != "modes"}, indent=1))
    if args.out:
        atomic_write_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
