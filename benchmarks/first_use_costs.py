"""What the first use of each tensor operation costs in a fresh CUDA process (issue 10).

The project's search is slower on its first call in a process than on later ones (about
0.2 s on an H200 for models of 0.1-0.8B parameters): with CUDA's lazy module loading (the
default), each kernel is loaded on its first launch, and the search launches kernels that a
plain forward does not. This script runs a plain forward of a random Llama, then times the
first and the second use of each operation the search's code paths use (synchronised),
so that the operations worth avoiding can be chosen by measurement.

    python benchmarks/first_use_costs.py            # CUDA; prints a markdown table
"""
from __future__ import annotations

import time

import torch


def main() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    dev = torch.device("cuda")
    cfg = LlamaConfig(hidden_size=768, num_hidden_layers=2, intermediate_size=2048, num_attention_heads=12,
                      vocab_size=32000, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).to(dev).eval()
    ids = torch.randint(0, 32000, (2, 512), device=dev)
    with torch.no_grad():
        for _ in range(2):
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    torch.cuda.synchronize()
    a = torch.randn(1024, 2048, device=dev).to(torch.bfloat16)  # [tokens, d_ff]
    w = torch.randn(768, 2048, device=dev).to(torch.bfloat16)  # W_down [d_model, d_ff]
    y = torch.randn(1024, 768, device=dev).to(torch.bfloat16)
    proj = torch.randn(768, 64)
    f32 = a.float()
    ops = {
        "sketch fp32 matmul (w.t().float() @ proj)": lambda: w.t().float() @ proj.to(dev),
        "sketch bf16 matmul (w.t() @ proj.bf16)": lambda: w.t() @ proj.to(dev, torch.bfloat16),
        "column norms fp32 (.float().norm(dim=1))": lambda: w.t().float().norm(dim=1),
        "row norms fp32 (.float().norm(dim=-1))": lambda: y.float().norm(dim=-1),
        "pow(2).mean(-1) fp32 (as RMSNorm)": lambda: y.float().pow(2).mean(-1),
        "pow(2).sum(-1).sqrt() fp32": lambda: y.float().pow(2).sum(-1).sqrt(),
        "isfinite(a).all()": lambda: torch.isfinite(a).all(),
        "abs <= limits, masked product (bf16)": lambda: (a * (a.abs() <= 0.5)) @ w.t(),
        "boolean index flat[flat > 0]": lambda: f32.reshape(-1)[f32.reshape(-1) > 0],
        "log10 + clamp + long": lambda: f32.abs().log10().clamp_(-12, 6).long(),
        "bincount": lambda: torch.bincount((f32.abs() * 100).long().reshape(-1).clamp_(0, 4607), minlength=4608),
        "cumsum float64": lambda: torch.ones(4, 4608, device=dev, dtype=torch.float64).cumsum(dim=1),
        "searchsorted": lambda: torch.searchsorted(torch.arange(100.0, device=dev), torch.rand(24, device=dev)),
        "sort": lambda: torch.rand(24, device=dev).sort(),
        "double sum": lambda: f32.double().sum(),
        "cross_entropy fp32": lambda: torch.nn.functional.cross_entropy(f32[:, :1000], torch.zeros(1024, dtype=torch.long,
                                                                                               device=dev)),
        "where": lambda: torch.where(f32 > 0, f32, torch.zeros_like(f32)),
        "sum(dim=-1, dtype=float32) of bool": lambda: (a > 0).sum(dim=-1, dtype=torch.float32),
        "H2D non_blocking int64": lambda: torch.zeros(8, 2048, dtype=torch.long).to(dev, non_blocking=True),
    }
    print("| operation | first use ms | second use ms |\n|---|---:|---:|")
    for name, fn in ops.items():
        times = []
        for _ in range(2):
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(1e3 * (time.perf_counter() - t))
        print(f"| {name} | {times[0]:.2f} | {times[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
