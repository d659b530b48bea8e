"""The official-search re-implementation (benchmarks/official_reference.py) on tiny models.

What "the bisection result equals brute force" means here: the official bisection over the
candidate index returns ``j* - 1`` with ``j*`` the first index (among ``0..K-2``) whose mean
CETT exceeds ``c`` -- on a monotone CETT curve that is *the largest candidate whose mean CETT
is <= c* (:func:`official_reference.brute_force_index`). A layer's mean CETT curve is not
exactly monotone at the resolution of 65,536 candidates (truncating one more neuron can
shorten a token's truncated sum), so on real layers the test checks the bisection's own
guarantee: ``CETT(idx) <= c < CETT(idx + 1)`` (a crossing), and equality with brute force on
a curve that is monotone by construction (orthogonal ``W_down`` columns).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import official_reference as ref
import pytest
import torch
from conftest import build_tiny_llama, build_tiny_tokenizer

K = ref.NUM_CANDIDATES


def _blocks(ids: torch.Tensor):
    return SimpleNamespace(input_ids=ids, attention_mask=torch.ones_like(ids))


def _random_blocks(n=4, length=32, vocab=101, seed=1):
    g = torch.Generator().manual_seed(seed)
    return _blocks(torch.randint(3, vocab, (n, length), generator=g))


# -- candidate grid ---------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 12345])
def test_exact_quantile_matches_torch(n):
    x = torch.rand(n, generator=torch.Generator().manual_seed(n)) * 3
    for q in (0.0, 0.5, 0.99, 1.0):
        want = float(torch.quantile(x, q))
        for method in ("kthvalue", "topk"):
            assert float(ref.exact_quantile(x, q, method=method)) == pytest.approx(want, rel=1e-6, abs=1e-7)


def test_candidate_grid_is_linear_from_min_to_q99():
    norms = torch.rand(200, 37, generator=torch.Generator().manual_seed(0)) ** 3 + 0.01
    grid = ref.candidate_grid(norms)
    assert grid.shape == (K,) and grid.dtype == torch.float32
    assert float(grid[0]) == pytest.approx(float(norms.min()), rel=1e-7)
    assert float(grid[-1]) == pytest.approx(float(torch.quantile(norms.reshape(-1), 0.99)), rel=1e-6)
    assert float(grid.double().diff().min()) > 0
    exact = torch.linspace(float(grid[0]), float(grid[-1]), K, dtype=torch.float64)
    assert float((grid.double() - exact).abs().max()) <= 2 * float(torch.finfo(torch.float32).eps) * float(grid[-1])
    strided = ref.candidate_grid(norms, quantile="strided")  # fewer than 65,536 norms: stride 1 = exact
    assert torch.allclose(strided, grid)


# -- per-layer bisection ------------------------------------------------------------------


def _all_candidate_cett(a, w_t, col, grid, chunk=2048):
    """Brute force: the mean CETT (search rule n <= t) at every candidate, batched."""
    a32, w32 = a.float(), w_t.float()
    norms = a32.abs() * col
    y = (a32 @ w32).norm(dim=-1)
    out = []
    for k0 in range(0, grid.numel(), chunk):
        t = grid[k0:k0 + chunk].view(-1, 1, 1)
        tail = torch.where(norms.unsqueeze(0) > t, torch.zeros(()), a32.unsqueeze(0))  # [k, tokens, d_ff]
        out.append(((tail @ w32).norm(dim=-1) / y).mean(dim=1))
    return torch.cat(out)


def test_bisection_equals_brute_force_on_a_monotone_curve():
    # Orthogonal W_down columns: ||sum_{i in D} n_i|| = sqrt(sum_{i in D} ||n_i||^2) grows with D.
    d = 16
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    scales = torch.rand(d, generator=g) + 0.5
    w_t = (q * scales).t().contiguous()  # [d_ff, d_model], row i = column i of W_down
    col = w_t.norm(dim=1)
    a = torch.randn(48, d, generator=g)
    norms = a.abs() * col
    grid = ref.candidate_grid(norms)
    values = _all_candidate_cett(a, w_t, col, grid).double()
    assert float((values.diff()).min()) > -1e-6  # monotone up to rounding
    levels = torch.unique(values)
    for i in (1, len(levels) // 3, len(levels) // 2, len(levels) - 2):
        c = float((levels[i] + levels[i + 1]) / 2)  # strictly between two plateaus
        res = ref.search_layer_threshold(a, w_t, col, c)
        want = ref.brute_force_index(values, c)
        assert res.index == want
        assert int((values[: K - 1] <= c).nonzero().max()) == want  # the largest candidate with CETT <= c
        assert not res.wrapped and res.products == 16
        assert res.threshold == float(grid[want]) and res.cett <= c


def test_bisection_brackets_the_target_on_a_real_layer():
    model = build_tiny_llama()
    sites = ref.find_ffn_sites(model)
    cap = ref.dense_capture(model, _random_blocks(), batch_size=4)
    site = sites[1]
    a = cap.acts[1]
    w_t, col = site.weight_t().detach(), site.column_norms()
    norms = a.float().abs() * col
    grid = ref.candidate_grid(norms)
    y = (a.float() @ w_t.float()).norm(dim=-1)
    for c in (0.01, 0.1, 0.3, 0.6):
        res = ref.search_layer_threshold(a, w_t, col, c)
        assert not res.wrapped and 0 <= res.index < K - 1
        lo = ref.layer_cett(a.float(), w_t.float(), norms, float(grid[res.index]), y)
        hi = ref.layer_cett(a.float(), w_t.float(), norms, float(grid[res.index + 1]), y)
        assert lo <= c < hi
        assert res.cett == pytest.approx(lo)
    # brute force on a coarser grid: the answer is one of the crossings of the (non-monotone) curve
    few = 257
    g = ref.candidate_grid(norms, num=few)
    values = torch.tensor([ref.layer_cett(a.float(), w_t.float(), norms, float(t), y) for t in g])
    assert bool((values.diff() < 0).any())  # not monotone, even at this resolution
    for c in (0.05, 0.2, 0.4):
        crossings = [j for j in range(few - 1) if values[j] <= c < values[j + 1]]
        idx = ref.search_layer_threshold(a, w_t, col, c, num_candidates=few).index
        assert idx in crossings
        if len(crossings) == 1:
            assert idx == ref.brute_force_index(values, c)


def test_wrap_around_defect():
    model = build_tiny_llama()
    cap = ref.dense_capture(model, _random_blocks(), batch_size=4)
    site = ref.find_ffn_sites(model)[0]
    a, w_t, col = cap.acts[0], site.weight_t().detach(), site.column_norms()
    # c = 0: already the smallest candidate truncates a neuron (CETT > 0), so none qualifies
    bad = ref.search_layer_threshold(a, w_t, col, 0.0)
    assert bad.wrapped and bad.index == K - 1
    assert bad.threshold == pytest.approx(float(torch.quantile((a.abs() * col).reshape(-1), 0.99)), rel=1e-5)
    assert bad.cett > 0.5  # the most aggressive candidate, not the mildest
    fixed = ref.search_layer_threshold(a, w_t, col, 0.0, faithful_defects=False)
    assert fixed.wrapped and fixed.threshold == 0.0 and fixed.cett == 0.0
    # through a whole evaluation: CETT 0 sparsifies to ~1% activation with the defect
    blocks = _random_blocks()
    ev = ref.evaluate_cett(model, blocks, 0.0)
    assert ev.wrapped_layers == [0, 1, 2] and ev.activation_ratio < 0.05
    ev_fixed = ref.evaluate_cett(model, blocks, 0.0, faithful_defects=False)
    assert ev_fixed.activation_ratio == 1.0 and ev_fixed.ppl_ratio == pytest.approx(1.0, abs=1e-6)
    assert ref.brute_force_index(torch.tensor([0.5, 0.6, 0.7]), 0.1) == 2
    assert ref.brute_force_index(torch.tensor([0.5, 0.6, 0.7]), 0.1, faithful_defects=False) == -1


def test_rule_mismatch_search_truncates_equal_norms_inference_keeps_them():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=24, num_hidden_layers=2, intermediate_size=40, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=101, hidden_act="relu", bos_token_id=None,
                      eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(cfg).eval()  # ReLU: many norms exactly 0
    blocks = _random_blocks()
    cap = ref.dense_capture(model, blocks)
    zero_frac = sum(float((x == 0).float().mean()) for x in cap.acts) / len(cap.acts)
    assert 0.2 < zero_frac < 0.8
    # eps = 0: the search rule (n <= 0) truncates the zeros, the official inference rule (n >= 0) keeps them
    faithful = ref.sparse_pass(model, blocks, [0.0, 0.0])
    fixed = ref.sparse_pass(model, blocks, [0.0, 0.0], faithful_defects=False)
    assert faithful.activation_ratio == 1.0
    assert fixed.activation_ratio == pytest.approx(1 - zero_frac, abs=1e-6)


def test_outer_bisection_counts_and_padding():
    model = build_tiny_llama()
    ids = _random_blocks(n=3, length=24).input_ids
    mask = torch.ones_like(ids)
    mask[2, 16:] = 0  # padding is excluded from the activations and the activation ratio
    blocks = SimpleNamespace(input_ids=ids, attention_mask=mask)
    res = ref.reference_ppl_p(model, blocks, 1.0, num_candidates=1024)
    assert res.outer_steps == 20 and res.evaluations == 21 and res.forward_passes == 42
    assert len(res.history) == 21 and res.history[-1]["c"] == res.cett
    assert res.products <= 21 * 3 * 10
    cap = ref.dense_capture(model, blocks)
    assert cap.acts[0].shape[0] == 3 * 24 - 8
    assert 0 < res.activation_ratio <= 1 and len(res.thresholds) == 3


# -- agreement with the project on a trained tiny model ----------------------------------


def _trained_tiny(steps=150):
    import pydoc_data.topics

    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tiny_tokenizer()
    text = "".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))[:60000]
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    cfg = LlamaConfig(hidden_size=48, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=101, bos_token_id=None, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train, held = ids[:50000], ids[50000:]
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, train.numel() - 65, (16,), generator=g)
        batch = torch.stack([train[s:s + 64] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    blocks = _blocks(held[: 8 * 128].reshape(8, 128))
    return model, blocks


def test_reference_and_project_agree_on_a_trained_tiny_model():
    from sparsing_utils.probe import SparsityProbe
    from sparsing_utils.search import search_ppl_p

    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, blocks = _trained_tiny()
    res = ref.reference_ppl_p(model, blocks, 5.0, outer_tol=1e-3, num_candidates=4096)
    assert res.outer_steps == 10 and res.wrapped_layers == []
    probe = SparsityProbe(model, blocks, mode="memory")
    mine = search_ppl_p(probe, 5.0)
    assert mine.converged, mine.message
    assert abs(mine.ppl_ratio - 1.05) <= 1e-3
    assert abs(res.ppl_ratio - 1.05) < 0.01
    assert mine.cett == pytest.approx(res.cett, rel=0.05)
    assert mine.activation_ratio == pytest.approx(res.activation_ratio, abs=0.02)
    # equal accuracy at the same CETT: the project's exact thresholds vs the reference's
    eps, cett = probe.thresholds_for(res.cett)
    assert float((cett - res.cett).abs().max()) < 1e-3
    cap = ref.dense_capture(model, blocks)
    check = ref.capture_cett(model, cap, [float(e) for e in eps])
    assert max(abs(x - res.cett) for x in check) < 1e-3
    from sparsing_utils.rules import CETTRule

    act = probe.sparse_pass(CETTRule(eps), per_token=False).activation_ratio
    assert act == pytest.approx(res.activation_ratio, abs=0.005)
    assert math.isfinite(res.ppl_dense)
