"""First-use cost of single tensor operations, each in its own fresh process after a model's forward.

    python benchmarks/first_use_isolated.py --family llama --out first_use.json

Under CUDA's lazy module loading, the first launch of a kernel whose module the process has not
loaded yet costs tens of milliseconds (issue 10: about 0.25 s of the search's first call on an
H200). Which operations pay it depends on what ran before, so each operation here runs in a
fresh child process, right after two plain forwards of a small random model of ``--family``
(the kernels a user's process has loaded when it starts a search): the child prints the
operation's first and second call times (synchronised). An operation whose first call costs
about its second shares its kernels' module with the forward.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

# name -> statement; the names a, a32, keep, lim32, lim16, w_t, logits, target, idx, x32, x64, ints,
# cpu_ids, flat, i64 are defined in the child (shapes of one layer of a SmolLM2-sized model, 4,096 tokens).
OPS = {
    "noop (a + 0)": "a + 0",
    "abs bf16": "a.abs()",
    "gt bf16 > f32": "a > lim32",
    "gt bf16 > bf16": "a > lim16",
    "le bf16 <= bf16": "a <= lim16",
    "where(bool, bf16, 0)": "torch.where(keep, a, 0)",
    "mul bf16 * bool": "a * keep",
    "mul(out=) bf16 * bool": "torch.mul(a, keep, out=a.clone())",
    "masked_fill bf16": "a.masked_fill(keep, 0)",
    "sum bool -> f32, dim": "keep.sum(dim=-1, dtype=torch.float32)",
    "sum bool -> i32, dim": "keep.sum(dim=-1, dtype=torch.int32)",
    "count_nonzero dim": "torch.count_nonzero(a, dim=-1)",
    "sum f32 -> f64": "x32.sum(dtype=torch.float64)",
    "sum f32 dim": "x32.sum(dim=-1)",
    "sum f64": "x64.sum()",
    "add f64": "x64 + x64",
    "div f32": "x32 / 3.0",
    "sqrt f32": "x32.sqrt()",
    "pow2 f32": "x32.pow(2)",
    "l2_norm (float, pow, sum, sqrt)": "a.float().pow(2).sum(-1).sqrt()",
    "norm f32 dim": "a.float().norm(dim=-1)",
    "float() of bf16": "a.float()",
    "double() of f32": "x32.double()",
    "half() of f32": "x32.half()",
    "clamp_min f32": "x32.clamp_min(1e-30)",
    "clamp f32": "x32.clamp(-1, 1)",
    "isfinite all": "torch.isfinite(a).all()",
    "cross_entropy f32": "F.cross_entropy(logits, target, reduction='none')",
    "cross_entropy f32 ignore_index (the search loss)": "F.cross_entropy(logits, target, reduction='none', ignore_index=-100)",
    "log_softmax + index_select at host indices (the NLL)": "logits.log_softmax(-1).view(-1).index_select(0, flat)",
    "index_select f32 at host indices": "logits.view(-1).index_select(0, flat)",
    "neg f32": "-x32",
    "square by mul f32": "x32 * x32",
    "rsqrt f32": "x32.abs().rsqrt()",
    "sub f64": "x64 - x64",
    "log_softmax f32": "logits.log_softmax(-1)",
    "logsumexp f32": "logits.logsumexp(-1)",
    "amax f32": "logits.amax(-1)",
    "max f32 dim": "logits.max(-1)",
    "exp f32": "x32.exp()",
    "log f32": "x32.abs().log()",
    "log10 f32": "x32.abs().log10()",
    "log2 f32": "x32.abs().log2()",
    "gather f32": "logits.gather(1, target.unsqueeze(1))",
    "index_add_ f64": "torch.zeros(4608, dtype=torch.float64, device=dev).index_add_(0, idx, x64[:idx.numel()])",
    "index_add_ f32": "torch.zeros(4608, device=dev).index_add_(0, idx[:x32.numel()], x32.reshape(-1))",
    "index_add_ i32": "torch.zeros(4608, dtype=torch.int32, device=dev).index_add_(0, idx, ints[:idx.numel()])",
    "scatter_add_ f64": "torch.zeros(4608, dtype=torch.float64, device=dev).scatter_add_(0, idx, x64[:idx.numel()])",
    "bincount": "torch.bincount(idx, minlength=4608)",
    "histc": "torch.histc(x32, bins=100, min=-3, max=3)",
    "shift right i32": "x32.view(torch.int32) >> 15",
    "long() of f32": "x32.long()",
    "searchsorted": "torch.searchsorted(x32.reshape(-1)[:4608].sort().values, x32.reshape(-1)[:100])",
    "cumsum f64": "x64.cumsum(0)",
    "sort f32": "x32.reshape(-1)[:4608].sort()",
    "index_select bf16": "a.index_select(0, idx[:64] % a.shape[0])",
    "nonzero": "keep[0].nonzero()",
    "matmul bf16 (sketch)": "a @ w_t[:, :64]",
    "matmul f32": "a32 @ w_t.float()",
    "matmul bf16 [t, d_ff] @ [d_ff, d]": "a @ w_t",
    "pinned H2D non_blocking": "cpu_ids.pin_memory().to(dev, non_blocking=True)",
    "stack": "torch.stack([x32, x32])",
    "cat f32": "torch.cat([x32, x32])",
    "copy_ into slice": "x32[:2].copy_(x32[2:4] / 3)",
    "nextafter bf16": "torch.nextafter(lim16, torch.full_like(lim16, -1.0))",
    "eq f32": "x32 == 0",
    "ne bf16": "a != 0",
    "any dim": "keep.any(dim=-1)",
    "topk": "x32.topk(8, dim=-1)",
    # the MoE's hooked expert loop (sparsing_utils.moe): routing order, rows, padding, the ran mask
    "argsort stable int64": "i64.argsort(stable=True)",
    "floor_divide int64": "i64 // 4096",
    "remainder int64": "i64 % 4096",
    "sub and mul int64 (a remainder without %)": "i64 - (i64 // 4096) * 4096",
    "pad int64 (cett.pad_rows of rows)": "F.pad(i64, (0, 100))",
    "pad bf16 rows (cett.pad_rows of values)": "F.pad(a, (0, 0, 0, 100))",
    "scatter_ bool (the ran mask)": "torch.zeros(4096, 9, dtype=torch.bool, device=dev).scatter_(1, i64[:8192].view(4096, 2) % 9, True)",
    "index bf16 rows by int64 (h[tok])": "a[i64[:2048] % 4096]",
}

FAMILIES = {  # small random models; the forward's kernels are what matter, not the size
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"hidden_size": 576, "num_hidden_layers": 2, "intermediate_size": 1536,
                                                      "num_attention_heads": 9, "num_key_value_heads": 3}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"hidden_size": 768, "num_hidden_layers": 2,
                                                             "intermediate_size": 3072, "num_attention_heads": 12}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"hidden_size": 512, "num_hidden_layers": 2, "intermediate_size": 1024,
                                                            "num_attention_heads": 8, "num_key_value_heads": 8,
                                                            "num_local_experts": 8, "num_experts_per_tok": 2}),
}


def child(name: str, family: str) -> None:
    import torch
    import torch.nn.functional as F  # noqa: F401 (used by the statements)
    import transformers

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: a dry run of the statements
    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    cfg_cls, model_cls, kw = FAMILIES[family]
    cfg = getattr(transformers, cfg_cls)(vocab_size=32000, max_position_embeddings=4096, **kw)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg).to(dev, torch.bfloat16).eval()
    ids = torch.randint(0, 32000, (2, 2048))
    with torch.no_grad():
        for _ in range(2):
            model(input_ids=ids.to(dev), attention_mask=torch.ones_like(ids).to(dev), use_cache=False)
    sync()
    g = torch.Generator().manual_seed(1)
    a = torch.randn(4096, 1536, generator=g).to(dev, torch.bfloat16)
    a32 = a.float()
    lim32 = torch.rand(1536, generator=g).to(dev)
    lim16 = lim32.to(torch.bfloat16)
    keep = a.abs() > lim16 if name != "gt bf16 > bf16" else torch.rand(4096, 1536, generator=g).to(dev) > 0.5
    w_t = torch.randn(1536, 576, generator=g).to(dev, torch.bfloat16)
    logits = torch.randn(1024, 32000, generator=g).to(dev)
    target = torch.randint(0, 32000, (1024,), generator=g).to(dev)
    idx = torch.randint(0, 4608, (100000,), generator=g).to(dev)
    x32 = torch.randn(64, 1024, generator=g).to(dev)
    x64 = torch.randn(100000, generator=g, dtype=torch.float64).to(dev)
    ints = torch.ones(100000, dtype=torch.int32).to(dev)
    cpu_ids = torch.randint(0, 32000, (8, 2048), generator=g)
    flat = (torch.arange(1024) * 32000 + target.cpu()).to(dev)  # each row's target in the flattened logits
    i64 = torch.randint(0, 2 * 4096, (8192,), generator=g).to(dev)  # top-2 routing slots of 4,096 tokens
    sync()
    env = dict(globals())
    env.update(locals())
    times = []
    for _ in range(2):
        t = time.perf_counter()
        eval(OPS[name], env)
        sync()
        times.append(time.perf_counter() - t)
    print(json.dumps({"op": name, "family": family, "first_ms": times[0] * 1e3, "second_ms": times[1] * 1e3}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="llama", help=f"comma-separated from {', '.join(FAMILIES)}")
    ap.add_argument("--ops", default=None, help="comma-separated names (default: all)")
    ap.add_argument("--jobs", type=int, default=6, help="children at once")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.family)
        return
    names = args.ops.split(",") if args.ops else list(OPS)

    def run(job):
        name, family = job
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", name, "--family", family],
                           check=False, capture_output=True, text=True, timeout=300)
        lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
        return json.loads(lines[-1]) if lines else {"op": name, "family": family, "error": p.stderr[-400:]}

    jobs = [(n, f) for f in args.family.split(",") for n in names]
    with ThreadPoolExecutor(args.jobs) as ex:
        results = list(ex.map(run, jobs))
    for r in results:
        if "error" in r:
            print(f"{r['family']:<9} {r['op']:<36} ERROR {r['error']}")
        else:
            print(f"{r['family']:<9} {r['op']:<36} first {r['first_ms']:8.2f} ms  second {r['second_ms']:7.3f} ms")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
