"""CETT math against float64 brute force (issue 2, items 5 and 10; PAPER.md Sec. 1).

For one token and threshold eps: D = {i : |a_i| * ||W_down[:, i]|| <= eps},
CETT = || sum_{i in D} a_i W_down[:, i] || / || W_down a ||  (0 when the output is 0).
"""
from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sparsing_utils.cett import (
    CETTCurve,
    NormHistogram,
    activation_limits,
    cett_per_token,
    cett_statistics,
    compare_limits,
    interpolate_thresholds,
    neuron_norms,
    nonzero_norms,
    refine_thresholds,
    truncated_norms,
    truncated_statistics,
)
from sparsing_utils.rules import CETTRule

D_FF, D_MODEL, TOKENS = 37, 13, 29


def brute_cett(a, w_t, col_norms, eps: float) -> list[float]:
    """Loop over tokens in float64: the set D, the sum of its neuron vectors, the norm ratio."""
    a64, w, cn = a.double(), w_t.double(), col_norms.double()
    out = []
    for t in range(a64.shape[0]):
        truncated = torch.zeros(w.shape[1], dtype=torch.float64)
        full = torch.zeros(w.shape[1], dtype=torch.float64)
        for i in range(a64.shape[1]):
            n_i = a64[t, i] * w[i]  # the neuron's output vector
            full += n_i
            if abs(float(a64[t, i])) * float(cn[i]) <= eps:
                truncated += n_i
        y = float(full.norm())
        out.append(float(truncated.norm()) / y if y > 0 else 0.0)
    return out


def brute_active(a, col_norms, eps: float) -> int:
    n = a.double().abs() * col_norms.double()
    return int((n > eps).sum())


def random_case(seed=0, relu=False, zero_token=None):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(TOKENS, D_FF, generator=g) * torch.rand(TOKENS, 1, generator=g) * 3
    if relu:
        a = a.clamp_min(0)  # exact zeros, as ReLU gives
    if zero_token is not None:
        a[zero_token] = 0
    w_t = torch.randn(D_FF, D_MODEL, generator=g) * torch.rand(D_FF, 1, generator=g)
    return a, w_t, w_t.norm(dim=1)


def midpoint_thresholds(a, col_norms, ranks=(0.05, 0.3, 0.5, 0.8, 0.97)):
    """Thresholds between two consecutive distinct neuron norms (never equal to any norm)."""
    n = neuron_norms(a, col_norms).reshape(-1).double().unique().sort().values
    out = []
    for r in ranks:
        k = int(r * (n.numel() - 1))
        out.append(float((n[k] + n[k + 1]) / 2))
    return out


@pytest.mark.parametrize("relu", [False, True])
def test_cett_per_token_matches_brute_force(relu):
    a, w_t, cn = random_case(seed=1 if relu else 2, relu=relu, zero_token=7)
    eps = [0.0] + midpoint_thresholds(a, cn) + [float(neuron_norms(a, cn).max()) * 2]
    got = cett_per_token(a, w_t, cn, torch.tensor(eps))
    assert got.shape == (len(eps), TOKENS) and got.dtype == torch.float32
    for k, e in enumerate(eps):
        ref = torch.tensor(brute_cett(a, w_t, cn, e), dtype=torch.float64)
        torch.testing.assert_close(got[k].double(), ref, atol=2e-6, rtol=1e-5)
    # known answers: a token whose output is all zero has CETT 0 everywhere
    assert torch.equal(got[:, 7], torch.zeros(len(eps)))
    # eps = 0 truncates only exact zeros, whose sum is zero: CETT 0 (ReLU) / 0 (no zeros either)
    assert torch.equal(got[0], torch.zeros(TOKENS))
    # eps above every norm truncates everything: CETT 1 (except the zero token)
    others = torch.tensor([t for t in range(TOKENS) if t != 7])
    torch.testing.assert_close(got[-1, others], torch.ones(TOKENS - 1), atol=1e-6, rtol=0)
    # the given y_norm is used instead of recomputing it
    y_norm = (a.double() @ w_t.double()).norm(dim=-1).float()
    torch.testing.assert_close(cett_per_token(a, w_t, cn, torch.tensor(eps), y_norm), got, atol=1e-6, rtol=1e-6)


def test_relu_zeros_at_eps_zero_are_the_only_truncation():
    """With exact zeros, eps=0 truncates exactly the zero neurons: nothing activated is lost."""
    a, w_t, cn = random_case(seed=3, relu=True)
    c, active = cett_statistics(a, w_t, cn, torch.tensor([0.0]))
    assert float(c[0]) == 0.0
    assert int(active[0]) == int((a != 0).sum()) == brute_active(a, cn, 0.0)


def test_truncated_norms_chunking_is_identical():
    a, w_t, cn = random_case(seed=4)
    eps = torch.tensor(midpoint_thresholds(a, cn, ranks=(0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95)))
    ref = truncated_norms(a, w_t, cn, eps)
    for max_elements in (1, 36, 37, 38, 100, 37 * 29, 37 * 29 * 3 + 5):
        got = truncated_norms(a, w_t, cn, eps, max_elements=max_elements)
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    # and against the brute force numerator
    for k, e in enumerate(eps.tolist()):
        n = neuron_norms(a, cn).double()
        num = ((a.double() * (n <= e)) @ w_t.double()).norm(dim=-1)
        torch.testing.assert_close(ref[k].double(), num, atol=1e-5, rtol=1e-5)
    # empty inputs
    assert truncated_norms(a[:0], w_t, cn, eps).shape == (eps.numel(), 0)
    assert truncated_norms(a, w_t, cn, eps[:0]).shape == (0, TOKENS)
    with pytest.raises(ValueError, match=r"a must be \[tokens, d_ff\]"):
        truncated_norms(a[None], w_t, cn, eps)


def _moe_case(seed: int, n_blocks: int = 5, width: int = 7, shared: int = 4, k: int = 2):
    """A virtual MoE activation vector (sparsing_utils.moe): ``n_blocks`` expert blocks of which
    ``k`` run on each token (the others exactly zero), then ``shared`` dense columns."""
    g = torch.Generator().manual_seed(seed)
    d_ff = n_blocks * width + shared
    a = torch.randn(TOKENS, d_ff, generator=g) * torch.rand(TOKENS, 1, generator=g) * 3
    ran = torch.zeros(TOKENS, n_blocks, dtype=torch.bool)
    for t in range(TOKENS):
        ran[t, torch.randperm(n_blocks, generator=g)[:k]] = True
    ran[3] = False  # a token on which no expert ran (only the shared columns)
    a[:, :n_blocks * width] *= ran.repeat_interleave(width, dim=1)
    a[5, :width] = 0  # an expert that ran and gave exact zeros
    a[5, 0] = 0.0
    w_t = torch.randn(d_ff, D_MODEL, generator=g) * torch.rand(d_ff, 1, generator=g)
    return a, w_t, w_t.norm(dim=1)


@pytest.mark.parametrize("shared", [0, 4])
def test_block_sparse_statistics_match_dense_and_brute_force(shared):
    """MoE layers: the statistics computed expert by expert on the tokens each one ran on equal the
    dense product's (CETT to float rounding, activated counts exactly) and the brute force."""
    a, w_t, cn = _moe_case(seed=21 + shared, shared=shared)
    eps = torch.tensor([0.0] + midpoint_thresholds(a, cn) + [float(neuron_norms(a, cn).max()) * 2])
    dense = cett_per_token(a, w_t, cn, eps)
    dense_sum, dense_active = cett_statistics(a, w_t, cn, eps)
    for max_elements in (1, 50, 1 << 26):
        got = cett_per_token(a, w_t, cn, eps, blocks=(5, 7), max_elements=max_elements)
        torch.testing.assert_close(got, dense, atol=1e-6, rtol=1e-6)
        c_sum, active = cett_statistics(a, w_t, cn, eps, blocks=(5, 7), max_elements=max_elements)
        assert torch.equal(active, dense_active)
        torch.testing.assert_close(c_sum, dense_sum, atol=1e-5, rtol=1e-6)
    for k, e in enumerate(eps.tolist()):
        ref = torch.tensor(brute_cett(a, w_t, cn, e), dtype=torch.float64)
        torch.testing.assert_close(got[k].double(), ref, atol=2e-6, rtol=1e-5)
        assert int(active[k]) == brute_active(a, cn, e)
    # a negative threshold activates the zeros of the experts that did not run: the dense path answers
    neg = torch.tensor([-1.0, 0.5])
    assert torch.equal(cett_statistics(a, w_t, cn, neg, blocks=(5, 7))[1], cett_statistics(a, w_t, cn, neg)[1])
    with pytest.raises(ValueError, match="do not fit"):
        cett_statistics(a, w_t, cn, eps, blocks=(6, 7))


@pytest.mark.parametrize("shared", [0, 4])
def test_expert_rows_statistics_equal_the_full_width_blocks(shared):
    """The same vector held as ExpertRows (each expert's rows of the tokens routed to it, in shuffled
    order, an expert block of exact zeros on a routed token included): per-token CETT and activated
    counts bitwise those of the full-width block path, for every chunking of the tokens."""
    from sparsing_utils.moe import ExpertRows

    a, w_t, cn = _moe_case(seed=31 + shared, shared=shared)
    cut = 5 * 7
    g = torch.Generator().manual_seed(2)
    ran = a[:, :cut].reshape(len(a), 5, 7).ne(0).any(dim=-1)  # [tokens, 5]
    ran[5, 0] = True  # token 5 was routed to expert 0, whose a there is exactly 0
    rows = [ran[:, e].nonzero().squeeze(1) for e in range(5)]
    rows = [r[torch.randperm(len(r), generator=g)] for r in rows]  # the forward's order is not the tokens'
    er = ExpertRows(len(a), 7, rows, [a[r, 7 * e:7 * e + 7] for e, r in enumerate(rows)],
                    a[:, cut:] if shared else None)
    assert torch.equal(er.full(), a)
    eps = torch.tensor([0.0] + midpoint_thresholds(a, cn)[::3])
    y_norm = (a @ w_t).norm(dim=1)
    for max_elements in (1, 50, 700, 1 << 26):
        ref = cett_statistics(a, w_t, cn, eps, y_norm, blocks=(5, 7), max_elements=max_elements)
        got = cett_statistics(er, w_t, cn, eps, y_norm, max_elements=max_elements)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
        per_token = cett_per_token(er, w_t, cn, eps, y_norm, max_elements=max_elements)
        assert torch.equal(per_token, cett_per_token(a, w_t, cn, eps, y_norm, blocks=(5, 7), max_elements=max_elements))
    neg = torch.tensor([-1.0, 0.5])  # activates the zeros of the experts that did not run: the full width answers
    assert torch.equal(cett_statistics(er, w_t, cn, neg)[1], cett_statistics(a, w_t, cn, neg)[1])


def test_cett_statistics_matches_brute_force():
    a, w_t, cn = random_case(seed=5, relu=True, zero_token=0)
    eps = [0.0] + midpoint_thresholds(a, cn)
    c_sum, active = cett_statistics(a, w_t, cn, torch.tensor(eps), max_elements=100)
    assert c_sum.dtype == torch.float64 and active.dtype == torch.float64
    for k, e in enumerate(eps):
        assert abs(float(c_sum[k]) - sum(brute_cett(a, w_t, cn, e))) < 1e-4
        assert int(active[k]) == brute_active(a, cn, e)


def _dyadic_case():
    """Inputs whose neuron norms are exact in float32 *and* float64: a_i = k/8 and W_down
    columns that are integer Pythagorean vectors (3,4)->5, (2,3,6)->7, (1,4,8)->9,
    (2,6,9)->11, (1,2,2)->3, placed on random coordinates with random signs."""
    g = torch.Generator().manual_seed(11)
    triples = [((3, 4), 5), ((2, 3, 6), 7), ((1, 4, 8), 9), ((2, 6, 9), 11), ((1, 2, 2), 3)]
    w_t = torch.zeros(D_FF, D_MODEL)
    norms = torch.zeros(D_FF)
    for i in range(D_FF):
        vec, norm = triples[i % len(triples)]
        scale = int(torch.randint(1, 4, (1,), generator=g))
        coords = torch.randperm(D_MODEL, generator=g)[: len(vec)]
        signs = torch.randint(0, 2, (len(vec),), generator=g) * 2 - 1
        w_t[i, coords] = torch.tensor(vec, dtype=torch.float32) * signs * scale
        norms[i] = norm * scale
    a = torch.randint(-16, 17, (TOKENS, D_FF), generator=g).float() / 8
    return a, w_t, norms


def test_dyadic_norms_are_exact():
    a, w_t, cn = _dyadic_case()
    assert torch.equal(w_t.norm(dim=1), cn)  # the column norms are exact
    assert torch.equal(neuron_norms(a, cn).double(), a.double().abs() * cn.double())


def test_boundary_neuron_truncated_in_search_and_inference():
    """A neuron whose norm equals eps exactly is truncated by CETT (in D) and dropped by
    CETTRule: the search rule and the inference rule are the same comparison."""
    a, w_t, cn = _dyadic_case()
    n = neuron_norms(a, cn)
    t, j = 3, int(n[3].argmax())
    eps = float(n[t, j])  # an exact neuron norm
    assert (n == eps).sum() >= 1
    # CETT counts it in D: equals the brute force with "<="
    got = cett_per_token(a, w_t, cn, torch.tensor([eps]))[0]
    ref = brute_cett(a, w_t, cn, eps)
    torch.testing.assert_close(got.double(), torch.tensor(ref, dtype=torch.float64), atol=1e-6, rtol=1e-6)
    # ... and the result differs from the strict "<" truncation on that token
    strict = torch.tensor(brute_cett(a[t:t + 1], w_t, cn, math.nextafter(eps, 0.0)))
    assert abs(float(got[t]) - float(strict[0])) > 1e-3
    # statistics: not activated
    _, active = cett_statistics(a, w_t, cn, torch.tensor([eps]))
    assert int(active[0]) == int((n > eps).sum())
    # inference: CETTRule drops exactly the neurons with n <= eps
    rule = CETTRule([eps])
    keep = rule.keep(SimpleNamespace(index=0), a, None, cn)
    assert not bool(keep[t, j])
    assert torch.equal(keep, n > eps)
    assert int(keep.sum()) == int(active[0])


def test_norm_histogram_quantiles_within_one_bin():
    g = torch.Generator().manual_seed(6)
    layers = [torch.exp(torch.randn(5000, generator=g) * 2 - 3),  # log-normal norms over many decades
              torch.cat([torch.zeros(3000), torch.rand(7000, generator=g) * 5])]  # 30% exact zeros (ReLU)
    hist = NormHistogram(2)
    for i, x in enumerate(layers):
        for chunk in x.split(777):
            hist.add(i, chunk.view(-1, 7) if chunk.numel() % 7 == 0 else chunk)
    levels = torch.tensor([0.001, 0.1, 0.25, 0.299, 0.31, 0.5, 0.9, 0.99, 0.999])
    q = hist.quantiles(levels)
    assert q.shape == (2, levels.numel())
    bin_ratio = 10 ** (1 / 256)
    for i, x in enumerate(layers):
        s = x.double().sort().values
        lower = torch.quantile(x.double(), levels.double(), interpolation="lower")
        higher = torch.quantile(x.double(), levels.double(), interpolation="higher")
        for k, lev in enumerate(levels.tolist()):
            v = float(q[i, k])
            exact = float(s[max(0, math.ceil(lev * s.numel()) - 1)])  # smallest value with >= lev of mass <= it
            if exact == 0.0:
                assert v == 0.0, (i, lev, v)  # inside the zeros' mass
                continue
            assert exact <= v * (1 + 1e-6) and v <= exact * bin_ratio * (1 + 1e-6), (i, lev, v, exact)
            # torch.quantile brackets the order statistic; the histogram is within one bin of it
            assert float(lower[k]) / bin_ratio <= v * (1 + 1e-6), (i, lev, v, float(lower[k]))
            assert v <= float(higher[k]) * bin_ratio * (1 + 1e-6), (i, lev, v, float(higher[k]))
    # the zero count is kept apart
    assert float(hist.zeros[1]) == 3000 and float(hist.zeros[0]) == 0


def test_norm_histogram_counts_every_entry_in_its_bin():
    """Brute force: every entry's bin is floor((log10 x - LOG_MIN) / width), entries below 1e-12 (but
    not zero) in the first bin, above 1e6 in the last, exact zeros apart; chunks of more than CHUNK
    entries are split (float32 counts stay exact)."""
    g = torch.Generator().manual_seed(3)
    x = torch.exp(torch.randn(20011, generator=g, dtype=torch.float64) * 4).float()  # [n] many decades
    x[:37] = 0.0
    x[37:41] = torch.tensor([1e-20, 3e-13, 2e7, 1e9])  # out of range on both sides
    hist = NormHistogram(1)
    hist.CHUNK = 4096  # several histc calls per add
    hist.add(0, x.view(-1, 1))
    h = NormHistogram
    width = (h.LOG_MAX - h.LOG_MIN) / h.BINS
    pos = x[x > 0].double()
    idx = ((pos.log10() - h.LOG_MIN) / width).floor().clamp(0, h.BINS - 1).long()
    want = torch.bincount(idx, minlength=h.BINS).double()
    got = hist.counts[0]
    assert float(hist.zeros[0]) == 37 and float(got.sum()) == pos.numel()
    assert float(got[0]) == float(want[0]) >= 2 and float(got[-1]) == float(want[-1]) >= 2
    # float32 log10 may put an entry within rounding of a bin edge into the neighbouring bin
    moved = (got - want).abs().sum() / 2
    assert float(moved) <= 3, float(moved)


def test_compare_limits_same_decision_as_float32():
    """For every bf16 / fp16 value x and float32 limit L: x > L iff x > compare_limits(L) (exhaustive
    over the 65,536 bit patterns of the half-precision type, for limits between, on and around them)."""
    g = torch.Generator().manual_seed(0)
    for dtype, bits in ((torch.bfloat16, torch.int16), (torch.float16, torch.int16)):
        x = torch.arange(-32768, 32768, dtype=torch.int32).to(bits).view(dtype)
        x = x[torch.isfinite(x.float())]  # [values] every finite value of the type
        mags = x.float().abs()
        limits = torch.cat([mags[torch.randint(0, len(mags), (40,), generator=g)],  # on a value
                            mags[torch.randint(0, len(mags), (40,), generator=g)] * (1 + 1e-3),  # between
                            torch.rand(40, generator=g) * 10,
                            torch.tensor([0.0, 1e-40, 7e4, 1e30, 4e38, math.inf])])  # [K] float32
        low = compare_limits(limits, dtype)
        assert low.dtype == dtype
        for lim, lo in zip(limits, low):
            assert torch.equal(x.float() > lim, x > lo), (dtype, float(lim), float(lo))
            assert torch.equal(x.float().abs() <= lim, x.abs() <= lo)
    assert compare_limits(limits, torch.float32) is limits


def test_activation_limits_of_several_layers_equal_each_alone():
    g = torch.Generator().manual_seed(1)
    cn = torch.rand(4, 11, generator=g)
    cn[2, 3] = 0.0  # a zero column: never activated
    eps = torch.rand(4, 3, generator=g)
    both = activation_limits(cn, eps)
    assert both.shape == (4, 3, 11)
    for i in range(4):
        assert torch.equal(both[i], activation_limits(cn[i], eps[i]))
    assert math.isinf(float(both[2, 0, 3]))


def test_statistics_with_given_limits_and_without_counts():
    """truncated_statistics with limits made on the host (compare_limits of the activations' dtype)
    and counts=False gives the same norms as computing them itself."""
    g = torch.Generator().manual_seed(2)
    a = torch.randn(TOKENS, D_FF, generator=g).to(torch.bfloat16)
    w_t = torch.randn(D_FF, D_MODEL, generator=g)
    cn = w_t.float().pow(2).sum(1).sqrt()
    eps = torch.tensor([0.0, 0.3, 1.1])
    want, kept = truncated_statistics(a, w_t, cn, eps)
    got, none = truncated_statistics(a, w_t, cn, eps, limits=compare_limits(activation_limits(cn, eps), a.dtype),
                                     counts=False)
    assert none is None and kept is not None and torch.equal(got, want)


def test_nonzero_norms_divide_like_the_norms():
    """Bitwise the quotients of the former where(y > 0, num / y.clamp_min(tiny), 0), 0 where y = 0."""
    y = torch.tensor([0.0, 1e-30, 2.5, 3.0, 7e-3])
    num = torch.tensor([0.0, 1e-31, 1.0, 3.0, 1e-3])
    before = torch.where(y > 0, num / y.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(num))
    assert torch.equal(num / nonzero_norms(y), before)


def test_interpolate_thresholds_on_known_curve():
    eps_grid = torch.linspace(0, 1, 11)
    curves = torch.stack([eps_grid**2, 1 - torch.exp(-3 * eps_grid)])  # two monotone layers
    curve = CETTCurve(torch.stack([eps_grid, eps_grid * 2]), curves)
    for target in (0.0, 0.01, 0.25, 0.3, 0.5, 0.77):
        got = interpolate_thresholds(curve, target)
        for layer in range(2):
            ref = np.interp(target, curves[layer].numpy(), curve.eps[layer].numpy())
            assert abs(float(got[layer]) - ref) < 1e-6, (target, layer)
    # a grid point is hit exactly: eps^2 = 0.25 at eps 0.5
    assert abs(float(interpolate_thresholds(curve, 0.25)[0]) - 0.5) < 1e-6
    # above the curve's last point: that point's threshold
    assert torch.allclose(interpolate_thresholds(curve, 1.5), torch.tensor([1.0, 2.0]))
    # per-layer targets
    got = interpolate_thresholds(curve, torch.tensor([0.25, 0.0]))
    assert abs(float(got[0]) - 0.5) < 1e-6 and float(got[1]) == 0.0


def test_interpolate_uses_running_maximum():
    """A dip (truncated contributions cancel) does not send the threshold backwards."""
    curve = CETTCurve(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), torch.tensor([[0.0, 0.2, 0.1, 0.3]]))
    assert abs(float(interpolate_thresholds(curve, 0.15)[0]) - 0.75) < 1e-6
    assert abs(float(interpolate_thresholds(curve, 0.25)[0]) - 2.5) < 1e-6


def _mean_cett_f64(a, w_t, cn, eps: float) -> float:
    """Independent float64 mean CETT (vectorised brute force) for the bisection reference."""
    a64, w = a.double(), w_t.double()
    n = a64.abs() * cn.double()
    y = (a64 @ w).norm(dim=-1)
    num = ((a64 * (n <= eps)) @ w).norm(dim=-1)
    return float(torch.where(y > 0, num / y, torch.zeros_like(y)).mean())


def _bisect(f, target, hi, iters=60):
    lo = 0.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return hi


@pytest.mark.parametrize("target", [0.02, 0.1, 0.3])
def test_refine_thresholds_reaches_target(target):
    g = torch.Generator().manual_seed(8)
    layers = []
    for scale in (0.5, 1.0, 4.0):  # three layers with different norm scales
        a = torch.randn(2000, D_FF, generator=g) * scale
        w_t = torch.randn(D_FF, 16, generator=g) * torch.rand(D_FF, 1, generator=g)
        layers.append((a, w_t, w_t.norm(dim=1)))
    calls = []

    def evaluate(eps, active):
        calls.append(active.clone())
        out = torch.full((len(layers),), float("nan"))
        for i, (a, w_t, cn) in enumerate(layers):
            if active[i]:
                out[i] = cett_per_token(a, w_t, cn, eps[i:i + 1]).double().mean()
        return out

    # a coarse curve: 8 quantiles of the norms, as the probe builds it from the histogram
    grid = torch.stack([torch.cat([torch.zeros(1), torch.quantile(neuron_norms(a, cn).reshape(-1),
                                                                  torch.linspace(0.05, 0.95, 8))])
                        for a, _, cn in layers])
    cett = torch.stack([cett_per_token(a, w_t, cn, grid[i]).mean(dim=1) for i, (a, w_t, cn) in enumerate(layers)])
    eps, got, evals = refine_thresholds(evaluate, CETTCurve(grid, cett), target, tol=1e-4)
    assert evals == len(calls) <= 8
    for i, (a, w_t, cn) in enumerate(layers):
        assert abs(float(got[i]) - target) <= 1e-4, (i, float(got[i]))
        exact = _mean_cett_f64(a, w_t, cn, float(eps[i]))  # independent re-evaluation
        assert abs(exact - target) <= 1e-4 + 1e-6
        ref = _bisect(lambda e, a=a, w_t=w_t, cn=cn: _mean_cett_f64(a, w_t, cn, e), target, float(neuron_norms(a, cn).max()))
        assert abs(float(eps[i]) - ref) <= 0.01 * ref, (i, float(eps[i]), ref)
    # converged layers are not evaluated again
    assert all(bool(c.sum() <= p.sum()) for p, c in itertools.pairwise(calls))


def test_refine_unreachable_target_keeps_best_point():
    a = torch.randn(50, D_FF, generator=torch.Generator().manual_seed(9))
    w_t = torch.randn(D_FF, 8, generator=torch.Generator().manual_seed(10))
    cn = w_t.norm(dim=1)

    def evaluate(eps, active):
        return cett_per_token(a, w_t, cn, eps[:1]).mean(dim=1)

    grid = torch.tensor([[0.0, float(neuron_norms(a, cn).median()), float(neuron_norms(a, cn).max())]])
    curve = CETTCurve(grid, torch.stack([cett_per_token(a, w_t, cn, grid[0]).mean(dim=1)]))
    eps, got, evals = refine_thresholds(evaluate, curve, 1.5, max_iter=5)  # CETT never exceeds ~1
    assert evals == 5 and float(got[0]) <= 1.0 + 1e-6 and torch.isfinite(eps).all()
    assert abs(float(got[0]) - float(evaluate(eps, None)[0])) < 1e-6  # the best point is a real evaluation


def test_curve_add_points_keeps_grid_sorted():
    curve = CETTCurve(torch.tensor([[0.0, 1.0, 3.0]]), torch.tensor([[0.0, 0.1, 0.3]]))
    merged = curve.add_points(torch.tensor([[2.0, 0.5]]), torch.tensor([[0.2, 0.05]]))
    assert merged.eps.tolist() == [[0.0, 0.5, 1.0, 2.0, 3.0]]
    assert torch.allclose(merged.cett, torch.tensor([[0.0, 0.05, 0.1, 0.2, 0.3]]))


def test_pending_copy_on_the_cpu_is_the_tensor_itself():
    from sparsing_utils.cett import PendingCopy

    t = torch.tensor([1.5, -2.0], dtype=torch.float64)
    assert PendingCopy(t).get() is t


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the asynchronous copy (pinned memory, event) exists on CUDA only")
def test_pending_copy_from_cuda_waits_for_its_copy_only():
    from sparsing_utils.cett import PendingCopy

    x = torch.arange(6, dtype=torch.float64, device="cuda")
    pending = PendingCopy(x * 2)
    big = torch.randn(4096, 4096, device="cuda")
    for _ in range(8):  # kernels queued after the copy
        big = big @ big / 64
    got = pending.get()
    assert got.device.type == "cpu" and got.is_pinned()
    assert torch.equal(got, torch.arange(6, dtype=torch.float64) * 2)


@pytest.mark.parametrize("seed", range(6))
def test_one_layer_refinement_in_floats_takes_the_batched_steps_bitwise(seed):
    """``refine_steps`` of a one-layer curve (Python floats, stream mode's path) asks for the same
    thresholds, in the same order, and returns the same answer bitwise as the batched tensor steps of
    the same layer inside a several-layer curve; on bumpy exact curves (not the grid's shape), for
    targets below, inside and above the grid, including a layer whose target is out of reach."""
    from sparsing_utils.cett import refine_steps

    g = torch.Generator().manual_seed(seed)
    layers, k = 3, 9
    grid = torch.cat([torch.zeros(layers, 1), torch.rand(layers, k - 1, generator=g).cumsum(1) * 0.05], dim=1)
    cett = torch.cat([torch.zeros(layers, 1), torch.rand(layers, k - 1, generator=g).cumsum(1)], dim=1)
    cett = cett / cett[:, -1:] * 0.6  # [layers, K], up to 0.6
    wiggle = torch.rand(layers, generator=g, dtype=torch.float64) * 0.02

    def exact(eps: torch.Tensor, layer_ids: list[int]) -> torch.Tensor:  # bumpy, monotone-ish, float64
        e = eps.double()
        w = wiggle[layer_ids]
        return (1 - torch.exp(-e * 30.0)) * 0.7 + w * torch.sin(e * 400.0)

    def drive(steps, layer_ids):
        asked = []
        try:
            eps, _ = next(steps)
            while True:
                asked.append(eps.clone())
                eps, _ = steps.send(exact(eps, layer_ids))
        except StopIteration as done:
            return asked, done.value

    for target in (0.05, 0.2, 0.45, 0.69, 0.75):
        curve = CETTCurve(grid, cett)
        asked_all, (e_all, c_all, n_all) = drive(refine_steps(curve, target, tol=1e-4), list(range(layers)))
        for i in range(layers):
            one = CETTCurve(grid[i:i + 1], cett[i:i + 1])
            asked, (e1, c1, n1) = drive(refine_steps(one, target, tol=1e-4), [i])
            assert torch.equal(e1, e_all[i:i + 1]) and torch.equal(c1, c_all[i:i + 1]), (target, i)
            # the layer's own asks: while it was active in the batched rounds
            assert [float(a[0]) for a in asked] == [float(a[i]) for a in asked_all[:len(asked)]], (target, i)
            assert n1 <= n_all
