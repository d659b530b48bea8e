"""The sparse pass's per-layer edit under the CETT rule, variant by variant (issue 10, section 2).

Each FFN layer of a sparse pass computes the mask ``|a| > limits``, counts the kept neurons of
each token and zeroes the rest. On ``a [tokens, d_ff]`` (default 16384 x 1536, SmolLM2's width
at the H200 token budget) this times, in float32 and bfloat16:

* ``today``: ``keep = a.abs() > limits``; ``keep.sum(-1)``; ``a * keep`` (three full-size temporaries);
* ``where``: ``torch.where(keep, a, 0)`` instead of the product (NOT bitwise equal: a dropped
  negative entry becomes +0.0, the product gives -0.0);
* ``over_abs``: the product written over ``|a|`` (``torch.mul(a, keep, out=mag)``), what
  :meth:`CETTRule.sparsify` does (two temporaries, the same bytes moved);
* ``one_buffer``: ``a.abs().gt_(limits)`` (0/1 in ``a``'s dtype), its sum, ``mul_(a)`` in place (one
  temporary, more bytes moved: the 0/1 mask is read in ``a``'s dtype, not as bytes);
* ``count_nonzero``: ``over_abs`` with the count from ``torch.count_nonzero``.

It prints the median and minimum of ``--repeats`` runs and whether each result equals ``today``'s
bit for bit. On a shared CPU the times are under load: compare variants of one run only.

    python benchmarks/bench_rule_edit.py --threads 1
"""
from __future__ import annotations

import argparse
import time

import torch


def today(a, lim):
    keep = a.abs() > lim
    return a * keep, keep.sum(dim=-1, dtype=torch.float32)


def where(a, lim):
    keep = a.abs() > lim
    return torch.where(keep, a, 0), keep.sum(dim=-1, dtype=torch.float32)


def over_abs(a, lim):
    mag = a.abs()
    keep = mag > lim
    return torch.mul(a, keep, out=mag), keep.sum(dim=-1, dtype=torch.float32)


def one_buffer(a, lim):
    t = a.abs().gt_(lim)
    n = t.sum(dim=-1, dtype=torch.float32)
    return t.mul_(a), n


def count_nonzero(a, lim):
    mag = a.abs()
    keep = mag > lim
    return torch.mul(a, keep, out=mag), torch.count_nonzero(keep, dim=-1).float()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--d-ff", type=int, default=1536)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        a = torch.randn(args.tokens, args.d_ff, generator=g).to(dtype)
        a[0, :5] = torch.tensor([0.0, -0.0, float("nan"), -1e-30, 1e-30])  # signed zeros, NaN, tiny values
        lim = torch.rand(args.d_ff, generator=g)
        lim[0] = 0.0
        ref, ref_n = today(a, lim)
        bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
        for f in (today, where, over_abs, one_buffer, count_nonzero):
            out, n = f(a, lim)
            same = torch.equal(out.view(bits), ref.view(bits)) and torch.equal(n, ref_n)
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                f(a, lim)
                times.append(time.perf_counter() - t0)
            times.sort()
            print(f"{str(dtype).replace('torch.', ''):9s} {f.__name__:14s} median {times[len(times) // 2] * 1e3:7.1f} ms"
                  f"  min {times[0] * 1e3:7.1f} ms  bitwise equal to today: {same}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
