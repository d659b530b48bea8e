"""Sparsification rules and masks (issue 2, items 5, 6 and 10; PAPER.md Sec. 1, Fig. 3 baselines).

The masks recorded by :func:`apply_rule` are compared with masks computed here from the
tensors the model really produced (captured by the test's own hooks, registered *before*
the rule's, so they see ``a`` and ``act(W_gate x)`` as the rule does).
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import TINY_D_FF, TINY_FAMILY_VOCAB, build_tiny_family

from sparsing_utils.ffn import count_hooks, find_ffn_sites
from sparsing_utils.rules import (
    CETTRule,
    DenseRule,
    FATRule,
    ReLURule,
    TopKRule,
    apply_rule,
)


def ids(batch=3, seq=13, seed=0, vocab=TINY_FAMILY_VOCAB):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def run(model, x):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


class Capture:
    """The test's own hooks: ``a`` as the rule sees it (pre-hook registered before the rule's),
    ``a`` after the rule (forward hook: the input the output projection really used), and the
    gate activation ``act(W_gate x)`` (forward hook on the activation module)."""

    def __init__(self, model):
        self.sites = find_ffn_sites(model)
        self.before, self.after, self.gate, self.handles = {}, {}, {}, []
        for s in self.sites:
            self.handles.append(s.module.register_forward_pre_hook(
                lambda m, args, _i=s.index: self.before.__setitem__(_i, args[0].detach().clone())))
            self.handles.append(s.module.register_forward_hook(
                lambda m, args, out, _i=s.index: self.after.__setitem__(_i, args[0].detach().clone())))
            if s.act_module is not None:
                self.handles.append(s.act_module.register_forward_hook(
                    lambda m, args, out, _i=s.index: self.gate.__setitem__(_i, out.detach().clone())))

    def remove(self):
        for h in self.handles:
            h.remove()


def run_rule(model, rule, x):
    """Logits under ``rule``, its recorded masks and the captured tensors."""
    cap = Capture(model)
    masks = {}
    try:
        with apply_rule(model, rule, record=lambda site, keep: masks.__setitem__(site.index, keep.clone())):
            out = run(model, x)
    finally:
        cap.remove()
    assert count_hooks(model) == 0
    return out, masks, cap


def assert_top_k(score, keep, k):
    """Exactly k kept per row, and they are the k largest scores (ties impossible here)."""
    score, keep = score.reshape(-1, score.shape[-1]), keep.reshape(-1, keep.shape[-1])
    assert torch.equal(keep.sum(dim=-1), torch.full((score.shape[0],), k))
    kept_min = torch.where(keep, score, torch.inf).min(dim=-1).values
    dropped_max = torch.where(keep, -torch.inf, score).max(dim=-1).values
    assert bool((kept_min >= dropped_max).all())


# -- Top-k -------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.3, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("score", ["magnitude", "norm", "gate"])
def test_topk_keep_direct(ratio, score):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 5, TINY_D_FF, generator=g)
    gate = torch.randn(2, 5, TINY_D_FF, generator=g)
    cn = torch.rand(TINY_D_FF, generator=g) + 0.1
    rule = TopKRule(ratio, score=score)
    keep = rule.keep(dataclasses.make_dataclass("S", [("index", int)])(0), a, gate, cn)
    k = max(1, round(ratio * TINY_D_FF))
    s = {"magnitude": a.abs(), "norm": a.abs() * cn, "gate": gate.abs()}[score]
    assert keep.shape == a.shape and keep.dtype == torch.bool
    assert_top_k(s, keep, k)
    assert rule.need_gate == (score == "gate")


@pytest.mark.parametrize("score", ["gate", "magnitude", "norm"])
def test_topk_per_token_in_model(score):
    model = build_tiny_family("llama")
    ratio = 0.3  # k = round(11.1) = 11 of 37
    out, masks, cap = run_rule(model, TopKRule(ratio, score=score), ids())
    k = round(ratio * TINY_D_FF)
    assert k == 11
    for s in cap.sites:
        keep = masks[s.index]
        assert keep.shape == (3, 13, TINY_D_FF)
        a = cap.before[s.index]
        ranked = {"gate": cap.gate[s.index].abs(), "magnitude": a.abs(),
                  "norm": a.abs() * s.column_norms()}[score]
        assert_top_k(ranked, keep, k)
        assert torch.equal(cap.after[s.index], a * keep)  # the projection used the masked a
    dense = run(model, ids())
    assert (out - dense).abs().max() > 1e-3


def test_topk_gate_on_gated_model_ranks_by_gate_not_a():
    model = build_tiny_family("qwen2")
    _, masks_gate, _ = run_rule(model, TopKRule(0.3, score="gate"), ids())
    _, masks_mag, _ = run_rule(model, TopKRule(0.3, score="magnitude"), ids())
    assert not torch.equal(masks_gate[0], masks_mag[0])  # the gate ranking is a different ranking


def test_topk_global_official_keeps_exactly_per_batch():
    model = build_tiny_family("llama")
    ratio = 0.3
    rule = TopKRule(ratio, scope="global", score="magnitude")
    assert rule.name == "topk_global_official" and rule.describe()["scope"] == "global"
    x = ids(batch=2, seq=13)
    _, masks, cap = run_rule(model, rule, x)
    numel = 2 * 13 * TINY_D_FF
    k = round(ratio * numel)  # 288.6 -> 289
    assert k == 289
    for s in cap.sites:
        keep = masks[s.index]
        assert int(keep.sum()) == k
        assert_top_k(cap.before[s.index].abs().reshape(1, -1), keep.reshape(1, -1), k)
        per_token = keep.sum(dim=-1)
        assert per_token.min() != per_token.max()  # not k per token: one ranking over the batch


def build_tiny_relu_llama(seed: int = 0):
    """A tiny random Llama with a ReLU gate (a = relu(W_gate x) * (W_up x)): about half of
    each token's gates are exact zeros."""
    import transformers as tf

    config = tf.LlamaConfig(hidden_size=24, num_hidden_layers=2, intermediate_size=TINY_D_FF, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=TINY_FAMILY_VOCAB, max_position_embeddings=64,
                            hidden_act="relu", initializer_range=0.2, bos_token_id=None, eos_token_id=None,
                            pad_token_id=None)
    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(config).to(torch.float32).eval()


def brute_top_k(score: torch.Tensor, k: int) -> torch.Tensor:
    """Per row of ``score [rows, n]``: the k largest, one at a time, skipping exact zeros."""
    keep = torch.zeros_like(score, dtype=torch.bool)
    for r in range(score.shape[0]):
        order = sorted(range(score.shape[1]), key=lambda j: -float(score[r, j]))
        for j in order[:k]:
            keep[r, j] = float(score[r, j]) != 0.0
    return keep


@pytest.mark.parametrize("scope", ["token", "global"])
@pytest.mark.parametrize("score", ["gate", "magnitude"])
def test_topk_never_activates_relu_zeros(score, scope):
    """On a ReLU model a token may have fewer than k nonzero gates: Top-k keeps those only
    (the official code masks |gate| < 1e-18), so exact zeros never count as activated."""
    model = build_tiny_relu_llama()
    ratio = 0.8  # k = 30 of 37 per token, more than most tokens' nonzero gates
    _, masks, cap = run_rule(model, TopKRule(ratio, score=score, scope=scope), ids())
    for s in cap.sites:
        ranked = (cap.gate[s.index] if score == "gate" else cap.before[s.index]).abs()  # [3, 13, 37]
        zero = ranked == 0
        assert 0.3 < float(zero.float().mean()) < 0.7  # ReLU zeros are there
        keep = masks[s.index]
        assert not bool((keep & zero).any())  # no zero is activated
        if scope == "token":
            k = round(ratio * TINY_D_FF)
            brute = brute_top_k(ranked.reshape(-1, TINY_D_FF), k).view_as(keep)
            nonzero = (~zero).sum(dim=-1)
            assert bool((nonzero < k).any())  # tokens where k reaches into the zeros
            assert torch.equal(keep.sum(dim=-1), nonzero.clamp_max(k))
        else:
            k = round(ratio * ranked.numel())
            brute = brute_top_k(ranked.reshape(1, -1), k).view_as(keep)
            assert int((~zero).sum()) < k and int(keep.sum()) == int((~zero).sum())
        assert torch.equal(keep, brute)
        assert torch.equal(cap.after[s.index], cap.before[s.index] * keep)


@pytest.mark.parametrize("kw", [{"ratio": 0}, {"ratio": 1.5}, {"ratio": -0.1}, {"ratio": 0.5, "score": "abs"},
                                {"ratio": 0.5, "scope": "batch"}])
def test_topk_bad_arguments(kw):
    with pytest.raises(ValueError, match="Top-k"):
        TopKRule(**kw)


# -- FAT and ReLU ------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma", "phi3", "gpt_neox"])
def test_fat_keeps_gate_above_eps(family):
    model = build_tiny_family(family)
    eps = 0.05
    _, masks, cap = run_rule(model, FATRule(eps), ids())
    fractions = []
    for s in cap.sites:
        gate = cap.gate[s.index] if s.gated else cap.before[s.index]  # plain FFN: the gate is a
        if s.gated:
            assert not torch.equal(gate, cap.before[s.index])
        keep = masks[s.index]
        assert torch.equal(keep, gate.abs() > eps)
        assert torch.equal(cap.after[s.index], cap.before[s.index] * keep)
        fractions.append(float(keep.float().mean()))
    assert all(0.05 < f < 0.98 for f in fractions), fractions  # a real cut, not all or nothing


def test_fat_bad_eps():
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="FAT eps"):
            FATRule(bad)


def test_relu_rule_on_opt_keeps_nonzero_and_changes_nothing():
    model = build_tiny_family("opt")
    x = ids()
    dense = run(model, x)
    out, masks, cap = run_rule(model, ReLURule(), x)
    for s in cap.sites:
        a = cap.before[s.index].reshape(3, 13, TINY_D_FF)  # OPT's fc2 sees [batch*seq, d_ff]
        assert torch.equal(masks[s.index], a != 0)
        assert 0.2 < float((a != 0).float().mean()) < 0.8  # ReLU zeros are there
    assert torch.equal(out, dense)


# -- controls: nothing masked gives identical logits -------------------------------------


@pytest.mark.parametrize("rule", [DenseRule(), CETTRule([0.0, 0.0]), TopKRule(1.0, score="magnitude"),
                                  TopKRule(1.0, scope="global", score="norm")],
                         ids=["dense", "cett0", "topk1", "topk1-global"])
def test_nothing_masked_gives_identical_logits(rule):
    model = build_tiny_family("llama")  # SiLU: no exact zeros in a
    x = ids()
    dense = run(model, x)
    out, masks, _ = run_rule(model, rule, x)
    assert all(bool(m.all()) for m in masks.values())
    assert torch.equal(out, dense)


def test_nothing_masked_on_trained_model(trained_llama):
    model = trained_llama.model
    x = trained_llama.eval_ids[:4]
    dense = run(model, x)
    out, _, _ = run_rule(model, CETTRule([0.0] * len(find_ffn_sites(model))), x)
    assert torch.equal(out, dense)
    assert count_hooks(model) == 0


# -- CETTRule ----------------------------------------------------------------------------


def test_cett_rule_masks_exactly_small_neuron_norms():
    model = build_tiny_family("mistral")
    sites = find_ffn_sites(model)
    # brute-force column norms of W_down (Linear weight [d_model, d_ff]: column i)
    norms = [torch.stack([s.module.weight.detach()[:, i].double().pow(2).sum().sqrt() for i in range(s.d_ff)])
             for s in sites]
    # per-layer thresholds at different quantiles of that layer's dense neuron norms
    cap = Capture(model)
    run(model, ids())
    cap.remove()
    thresholds = [float(torch.quantile((cap.before[s.index].double().abs() * norms[s.index]).reshape(-1), q))
                  for s, q in zip(sites, (0.3, 0.6))]
    rule = CETTRule(thresholds)
    _, masks, cap = run_rule(model, rule, ids())
    for s in sites:
        n = cap.before[s.index].double().abs() * norms[s.index]  # a as the rule saw it (after layer 0's cut)
        expected = n > thresholds[s.index]
        assert torch.equal(masks[s.index], expected)
        assert torch.equal(cap.after[s.index], cap.before[s.index] * expected)
        assert abs(float(expected.float().mean()) - (0.7, 0.4)[s.index]) < 0.1
    assert rule.describe() == {"rule": "cett", "thresholds": pytest.approx(thresholds)}


def test_cett_rule_bad_thresholds():
    for bad in ([-0.1, 0.0], [float("nan"), 0.0], [float("inf")]):
        with pytest.raises(ValueError, match="thresholds must be finite and >= 0"):
            CETTRule(bad)


def test_rules_that_never_keep_zeros_say_so():
    """``keeps_zeros = False`` lets an MoE layer skip the mask of the experts that did not run (their
    ``a`` is exactly 0): every rule claiming it must reject zeros, at any threshold (0 included) and
    with zero columns of ``W_down``; the rules that may keep zeros say so."""
    site = find_ffn_sites(build_tiny_family("mistral"))[0]
    zeros = torch.zeros(2, 3, site.d_ff)
    col_norms = torch.rand(site.d_ff, generator=torch.Generator().manual_seed(3))
    col_norms[::5] = 0
    never = [CETTRule([0.0, 0.0]), CETTRule([1e-30, 2.0]), ReLURule()]
    for rule in never:
        assert rule.keeps_zeros is False
        assert not rule.keep(site, zeros, zeros, col_norms).any()
    assert DenseRule().keeps_zeros and TopKRule(0.5).keeps_zeros and FATRule(0.0).keeps_zeros
    assert DenseRule().keep(site, zeros, zeros, col_norms).all()  # a rule that does keep zeros


def test_apply_rule_non_finite_activations():
    model = build_tiny_family("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite FFN activations at model\.layers\.1\.mlp\.down_proj"), \
            apply_rule(model, DenseRule()):
        run(model, ids())
    assert count_hooks(model) == 0


def test_gate_rule_without_activation_module_is_refused():
    model = build_tiny_family("llama")
    sites = [dataclasses.replace(s, act_module=None) for s in find_ffn_sites(model)]
    with pytest.raises(ValueError, match="needs the activation module"), \
            apply_rule(model, FATRule(0.1), sites=sites):
        pass
    assert count_hooks(model) == 0
    # a rule scoring by |a| still works on those sites
    with apply_rule(model, TopKRule(0.5, score="magnitude"), sites=sites):
        assert torch.isfinite(run(model, ids())).all()
    assert math.isclose(count_hooks(model), 0)
