"""The per-layer tensor operations of the search, timed side by side with candidate rewrites.

    python benchmarks/op_costs.py --device cuda --tokens 16384 --d-ff 1536 --d-model 576

One layer's activations ``a [tokens, d_ff]`` (bf16 on CUDA, float32 on the CPU, drawn like a
SwiGLU's), its ``W_down`` and per-neuron limits; each operation is timed (CUDA events, median of
``--repeats`` after warm-up) in its current form (the package's code as of this script's commit,
written out here) and in the candidate forms, and every candidate is checked to give the same
values as the current form (bitwise, or the count of differing entries is printed). Issue 10,
section 2: where a sparse pass and an exact CETT evaluation spend their time besides the matmuls.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F


def timer(device, fn, repeats):
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def round_down(limits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The largest ``dtype`` value <= each float32 limit: for ``x`` of ``dtype``, ``x > L`` iff
    ``x > round_down(L)`` (exact)."""
    r = limits.to(dtype)
    too_big = r.float() > limits
    return torch.where(too_big, torch.nextafter(r, torch.full_like(r, -math.inf)), r)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--d-ff", type=int, default=1536)
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    T, D, M = args.tokens, args.d_ff, args.d_model
    a = (F.silu(torch.randn(T, D, generator=g)) * torch.randn(T, D, generator=g)).to(device, dt)
    w_t = (torch.randn(D, M, generator=g) / math.sqrt(D)).to(device, dt)
    cn = w_t.float().pow(2).sum(1).sqrt()  # [d_ff]
    eps = 0.3 * float((a.float().abs() * cn).median())
    lim32 = (eps / cn).contiguous()  # [d_ff] float32
    lim_low = round_down(lim32, dt)
    rows = []

    def row(name, fn, check=None):
        t = timer(device, fn, args.repeats)
        rows.append({"op": name, "ms": t * 1e3, "check": check})
        print(f"{name:<64} {t * 1e3:8.3f} ms  {check or ''}", flush=True)

    def same(x, y):
        if x.dtype == torch.bool or x.dtype == y.dtype:
            n = int((x != y).sum())
            return "bitwise" if n == 0 else f"{n} entries differ"
        return f"max abs diff {float((x.float() - y.float()).abs().max()):.3g}"

    # --- the sparse pass's edit (rules.CETTRule.sparsify + apply_rule's count) ---
    def edit_now():
        mag = a.abs()
        keep = mag > lim32
        new = torch.mul(a, keep, out=mag)
        n = keep.sum(dim=-1, dtype=torch.float32)
        return new, keep, n

    def edit_low_where():
        keep = a.abs() > lim_low
        return torch.where(keep, a, 0), keep, keep.sum(dim=-1, dtype=torch.float32)

    def edit_low_mul():
        mag = a.abs()
        keep = mag > lim_low
        new = torch.mul(a, keep, out=mag)
        return new, keep, keep.sum(dim=-1, dtype=torch.float32)

    ref = edit_now()
    row("edit now: abs, > f32 limits, mul(out), count", edit_now)
    for name, fn in [("edit: abs, > rounded-down limits, where, count", edit_low_where),
                     ("edit: abs, > rounded-down limits, mul(out), count", edit_low_mul)]:
        new = fn()
        row(name, fn, f"keep {same(ref[1], new[1])}, values {same(ref[0].abs(), new[0].abs())}, "
                      f"counts {same(ref[2], new[2])}")
    row("  abs", lambda: a.abs())
    mag = a.abs()
    row("  > f32 limits", lambda: mag > lim32)
    row("  > rounded-down limits", lambda: mag > lim_low)
    keep = mag > lim32
    row("  mul(a, keep)", lambda: a * keep)
    row("  where(keep, a, 0)", lambda: torch.where(keep, a, 0))
    row("  keep.sum(-1, float32)", lambda: keep.sum(dim=-1, dtype=torch.float32))
    row("plain SwiGLU of the layer (silu(g) * u, no matmul)", lambda: F.silu(a) * a)
    row("down projection a @ W_down^T", lambda: a @ w_t)

    # --- the per-layer count bookkeeping of a sparse pass ---
    layers = 30
    active = torch.zeros(layers, dtype=torch.float64, device=device)
    per_tok = torch.zeros(layers, T, dtype=torch.float32, device=device)

    def count_now():
        for i in range(layers):
            n = keep.sum(dim=-1, dtype=torch.float32)
            active[i] += n.sum(dtype=torch.float64)
            per_tok[i, 0:T] = n / D

    buf = torch.zeros(layers, T, dtype=torch.float32, device=device)

    def count_buffered():
        for i in range(layers):
            torch.sum(keep, dim=-1, dtype=torch.float32, out=buf[i])
        buf.double().sum(dim=1)
        buf / D

    row(f"count bookkeeping now, {layers} layers (count, sum f64, +=, /d_ff, copy)", count_now)
    row(f"count into one buffer, {layers} layers (count out=, then sums once)", count_buffered)

    # --- one exact CETT evaluation of the layer (cett.truncated_statistics, one threshold) ---
    y_norm = (a.float() @ w_t.float()).pow(2).sum(-1).sqrt()
    chunk = max(1, (1 << 26) // D)

    def cett_now():
        out = []
        for t0 in range(0, T, chunk):
            ac = a[t0:t0 + chunk]
            tail = ac.abs().unsqueeze(0) <= lim32.unsqueeze(0).unsqueeze(1)
            masked = ac.unsqueeze(0) * tail
            s = masked.reshape(-1, D) @ w_t
            out.append((s.float().pow(2).sum(-1).sqrt(), D - tail.sum(dim=-1, dtype=torch.int32)))
        nrm = torch.cat([o[0] for o in out])
        return (nrm / y_norm).double().sum(), torch.cat([o[1].reshape(-1) for o in out])

    def cett_where():
        out = []
        for t0 in range(0, T, chunk):
            ac = a[t0:t0 + chunk]
            tail = ac.abs() <= lim_low
            s = torch.where(tail, ac, 0) @ w_t
            out.append((s.float().pow(2).sum(-1).sqrt(), D - tail.sum(dim=-1, dtype=torch.int32)))
        nrm = torch.cat([o[0] for o in out])
        return (nrm / y_norm).double().sum(), torch.cat([o[1].reshape(-1) for o in out])

    def cett_nocount():
        out = []
        for t0 in range(0, T, chunk):
            ac = a[t0:t0 + chunk]
            s = torch.where(ac.abs() <= lim_low, ac, 0) @ w_t
            out.append(s.float().pow(2).sum(-1).sqrt())
        return (torch.cat(out) / y_norm).double().sum()

    r0, r1 = cett_now(), cett_where()
    row("CETT evaluation now (abs, <= f32, mul, matmul, norm, count)", cett_now)
    row("CETT evaluation: <= rounded-down limits, where", cett_where,
        f"cett sum diff {float(r0[0] - r1[0]):.3g}, counts {same(r0[1], r1[1])}")
    row("CETT evaluation: where, no activated count", cett_nocount, f"cett sum diff {float(r0[0] - cett_nocount()):.3g}")

    # --- session 7: the exact evaluation as _cett_sums runs it (truncated_statistics, counts off) ---
    lim_row = lim_low.unsqueeze(0)  # [1, d_ff], the limits of one threshold

    def eval_mul():  # abs, <= (broadcast limits), bf16 x bool product, matmul, l2_norm via float/pow/sum/sqrt
        tail = a.abs().unsqueeze(0) <= lim_row.unsqueeze(1)
        s = (a.unsqueeze(0) * tail).reshape(-1, D) @ w_t
        return s.float().pow(2).sum(-1).sqrt()

    def eval_where():  # the product of the rows masked by where (no bf16 x bool type promotion)
        s = torch.where(a.abs() <= lim_row, a, 0) @ w_t
        return s.float().pow(2).sum(-1).sqrt()

    def eval_where_vnorm():
        s = torch.where(a.abs() <= lim_row, a, 0) @ w_t
        return torch.linalg.vector_norm(s, dim=-1, dtype=torch.float32)

    def eval_where_sqsum():  # squares summed in float32 by one reduction over the bf16 product
        s = torch.where(a.abs() <= lim_row, a, 0) @ w_t
        return torch.sum(s.float().square(), dim=-1).sqrt()

    e0 = eval_mul()
    row("exact eval (one layer) now: abs, <= broadcast, mul bf16 x bool, mm, float-pow-sum-sqrt", eval_mul)
    row("exact eval: where(|a| <= lim, a, 0), mm, float-pow-sum-sqrt", eval_where, same(e0, eval_where()))
    row("exact eval: where, mm, linalg.vector_norm(dtype=float32)", eval_where_vnorm, same(e0, eval_where_vnorm()))
    row("exact eval: where, mm, square-sum-sqrt", eval_where_sqsum, same(e0, eval_where_sqsum()))
    row("  where(|a| <= lim, a, 0) alone", lambda: torch.where(a.abs() <= lim_row, a, 0))
    row("  |a| <= lim (broadcast) alone", lambda: a.abs() <= lim_row)
    s_b = torch.where(a.abs() <= lim_row, a, 0) @ w_t
    row("  norm of the bf16 product: float-pow-sum-sqrt", lambda: s_b.float().pow(2).sum(-1).sqrt())
    row("  norm of the bf16 product: linalg.vector_norm(dtype=float32)",
        lambda: torch.linalg.vector_norm(s_b, dim=-1, dtype=torch.float32))

    # --- session 7: the sparse pass's edit and count as apply_rule runs them ---
    def edit_sparsify():
        mag = a.abs()
        keep = mag > lim_low
        new = torch.mul(a, keep, out=mag)
        return new, keep.sum(dim=-1, dtype=torch.float32)

    def edit_where_int():
        keep = a.abs() > lim_low
        return torch.where(keep, a, 0), keep.sum(dim=-1).float()

    def edit_where_i32():
        keep = a.abs() > lim_low
        return torch.where(keep, a, 0), keep.sum(dim=-1, dtype=torch.int32).float()

    r0 = edit_sparsify()
    row("edit + count now: abs, >, mul(out=|a|), sum(dtype=float32)", edit_sparsify)
    for name, fn in [("edit + count: abs, >, where, sum() int64 -> float", edit_where_int),
                     ("edit + count: abs, >, where, sum(dtype=int32) -> float", edit_where_i32)]:
        r1 = fn()
        row(name, fn, f"values {same(r0[0], r1[0])}, counts {same(r0[1], r1[1])}")
    kp = a.abs() > lim_low
    row("  count: sum(dtype=float32)", lambda: kp.sum(dim=-1, dtype=torch.float32))
    row("  count: sum() int64", lambda: kp.sum(dim=-1))
    row("  count: sum(dtype=int32)", lambda: kp.sum(dim=-1, dtype=torch.int32))

    # --- the guide curve's histogram (cett.NormHistogram.add) on 1,024 tokens ---
    sub = (a[:1024].float().abs() * cn).reshape(-1)
    bins = 18 * 256
    counts64 = torch.zeros(bins, dtype=torch.float64, device=device)
    counts32 = torch.zeros(bins, dtype=torch.int32, device=device)

    def idx_of(x):
        logs = x.clamp_min(torch.finfo(x.dtype).tiny).log10().clamp_(-12.0, 6.0 - 1e-6)
        return ((logs + 12.0) * (bins / 18.0)).long()

    idx = idx_of(sub)
    pos = sub > 0
    row("histogram index_add_ float64 (1,024 tokens)", lambda: counts64.index_add_(0, idx, pos.double()))
    row("histogram index_add_ int32", lambda: counts32.index_add_(0, idx, pos.int()))
    row("histogram bin index (log10, clamp, long)", lambda: idx_of(sub))

    # --- the loss of a pass (probe._run) ---
    Tl = min(T, 16384)
    logits = torch.randn(Tl, args.vocab, device=device, dtype=dt)
    target = torch.randint(0, args.vocab, (Tl,), device=device)
    row(f"cross_entropy(logits.float()) [{Tl} x {args.vocab}]",
        lambda: F.cross_entropy(logits.float(), target, reduction="none"))
    row("logits.float() alone", lambda: logits.float())

    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                       "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
