"""Mixture-of-Experts models (issue 10, section 1): every expert neuron is an FFN neuron.

Tiny random models of each MoE family transformers ships (Mixtral, Qwen2-MoE with its gated
shared expert, Qwen3-MoE, OLMoE, DeepSeek-V2 and DeepSeek-V3 with shared experts and dense
first layers, gpt-oss with its biased, transposed, interleaved experts and clamped SwiGLU,
Granite-MoE-shared with its shared MLP outside the MoE block, DBRX with its stacked 2-D expert
weights), odd sizes, plus the module-list layout of DeepSeek's remote code (hand-built here, as
the official ``modeling_deepseek.py`` lays it out). Everything the package reports is re-derived
in float64 from the weights: routing recomputed from the router weights with each family's rule
written out below, per-expert ``a``, neuron outputs with routing weights
``n_i = w_e a_i W_down_e[:, i]``, CETT per token, the masked MoE output, both activation ratios.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import Blocks
from torch import nn

import sparsing_utils as su
from sparsing_utils.ffn import count_hooks, find_ffn_sites, read_activations
from sparsing_utils.moe import find_moe, routed_top_k
from sparsing_utils.pareto import pareto_sweep
from sparsing_utils.probe import SparsityProbe
from sparsing_utils.results import PPLPResult, SparsityReport, sparse_inference
from sparsing_utils.rules import CETTRule, DenseRule, RoutedExpertsRule, apply_rule

VOCAB, D = 50, 24
COMMON = {"vocab_size": VOCAB, "hidden_size": D, "num_hidden_layers": 3, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 64, "initializer_range": 0.2,
          "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
MLA = {"num_key_value_heads": 4, "kv_lora_rank": 8, "q_lora_rank": 12, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4,
       "v_head_dim": 6}
# family -> (config class, model class, config arguments): E experts of width d_e, top-k, shared width
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                {"intermediate_size": 13, "num_local_experts": 5, "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  {"moe_intermediate_size": 11, "shared_expert_intermediate_size": 17, "intermediate_size": 19,
                   "num_experts": 7, "num_experts_per_tok": 3, "mlp_only_layers": [0], "norm_topk_prob": False}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  {"moe_intermediate_size": 11, "intermediate_size": 19, "num_experts": 7, "num_experts_per_tok": 3,
                   "head_dim": 6, "norm_topk_prob": True}),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              {"intermediate_size": 13, "num_experts": 6, "num_experts_per_tok": 2, "norm_topk_prob": False}),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                    {"intermediate_size": 19, "moe_intermediate_size": 11, "n_routed_experts": 7,
                     "num_experts_per_tok": 3, "n_shared_experts": 2, "first_k_dense_replace": 1,
                     "routed_scaling_factor": 1.3, **MLA}),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    {"intermediate_size": 19, "moe_intermediate_size": 11, "n_routed_experts": 8,
                     "num_experts_per_tok": 3, "n_shared_experts": 1, "n_group": 2, "topk_group": 1,
                     "first_k_dense_replace": 1, "routed_scaling_factor": 1.7, **MLA}),
    # a small swiglu_limit, so that the clamps of gpt-oss's SwiGLU act on these random weights
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                {"intermediate_size": 11, "num_local_experts": 5, "num_experts_per_tok": 2, "head_dim": 6,
                 "swiglu_limit": 0.35, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
                 "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}),
    "granitemoeshared": ("GraniteMoeSharedConfig", "GraniteMoeSharedForCausalLM",
                         {"intermediate_size": 13, "shared_intermediate_size": 17, "num_local_experts": 5,
                          "num_experts_per_tok": 2}),
    "dbrx": ("DbrxConfig", "DbrxForCausalLM",
             {"d_model": D, "n_heads": 4, "n_layers": 3, "max_seq_len": 64, "vocab_size": VOCAB,
              "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
              "ffn_config": {"ffn_hidden_size": 13, "moe_num_experts": 5, "moe_top_k": 2,
                             "moe_normalize_expert_weights": 1.5}}),
}
FAMILIES["jetmoe"] = ("JetMoeConfig", "JetMoeForCausalLM",
                      {"intermediate_size": 13, "num_local_experts": 5, "num_experts_per_tok": 2, "kv_channels": 6})
OWN_CONFIG = {"dbrx"}  # config arguments under other names than COMMON's
ALL_LAYOUTS = (*FAMILIES, "remote_deepseek")  # + the module-list layout


def build(family: str, *, experts_implementation: str = "eager", seed: int = 0) -> nn.Module:
    """A tiny random MoE model (float32, eval mode); ``"remote_deepseek"``: DeepSeek-V2's with each MoE
    block replaced by the remote-code layout (module list of expert MLPs), same weights."""
    import transformers as tf

    if family == "remote_deepseek":
        return to_remote_layout(build("deepseek_v2", seed=seed))
    cfg_name, cls_name, extra = FAMILIES[family]
    config = getattr(tf, cfg_name)(**(extra if family in OWN_CONFIG else {**COMMON, **extra}))
    config._experts_implementation = experts_implementation
    torch.manual_seed(seed)
    model = getattr(tf, cls_name)(config).float().eval()
    g = torch.Generator().manual_seed(seed)
    for block in moe_blocks(model).values():  # nonzero biases (initialised to 0), so that they are exercised
        router, ex = router_of(block), getattr(block, "experts", None)
        for bias in (getattr(router, "e_score_correction_bias", None),  # DeepSeek-V3's score correction
                     *((router.bias, ex.gate_up_proj_bias, ex.down_proj_bias) if family == "gpt_oss" else ()),
                     *((block.bias,) if family == "jetmoe" else ())):  # JetMoE's bias on the block output
            if bias is not None:
                bias.data.copy_(torch.randn(bias.shape, generator=g) * 0.1)
    return model


# -- the remote-code module-list layout (DeepSeek-V2/V3 modeling_deepseek.py) -----------------

class RemoteMLP(nn.Module):
    def __init__(self, d_in, width):
        super().__init__()
        self.gate_proj = nn.Linear(d_in, width, bias=False)
        self.up_proj = nn.Linear(d_in, width, bias=False)
        self.down_proj = nn.Linear(width, d_in, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class RemoteGate(nn.Module):
    """MoEGate of modeling_deepseek.py (greedy softmax routing): returns ``(topk_idx, topk_weight, aux_loss)``."""

    def __init__(self, weight, top_k, scale):
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.top_k, self.routed_scaling_factor = top_k, scale

    def forward(self, hidden_states):
        h = hidden_states.shape[-1]
        scores = F.linear(hidden_states.view(-1, h).float(), self.weight.float()).softmax(dim=-1)
        topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        return topk_idx, topk_weight * self.routed_scaling_factor, None


class RemoteMoE(nn.Module):
    """DeepseekMoE of modeling_deepseek.py (inference path: tokens sorted by expert, ``moe_infer``)."""

    def __init__(self, fused_block):
        super().__init__()
        ex = fused_block.experts
        n, d, de = ex.down_proj.shape
        self.experts = nn.ModuleList(RemoteMLP(d, de) for _ in range(n))
        with torch.no_grad():
            for e, mlp in enumerate(self.experts):
                mlp.gate_proj.weight.copy_(ex.gate_up_proj[e, :de])
                mlp.up_proj.weight.copy_(ex.gate_up_proj[e, de:])
                mlp.down_proj.weight.copy_(ex.down_proj[e])
        self.gate = RemoteGate(fused_block.gate.weight.detach(), fused_block.gate.top_k,
                               fused_block.gate.routed_scaling_factor)
        self.shared_experts = fused_block.shared_experts
        self.num_experts_per_tok = fused_block.gate.top_k

    def forward(self, hidden_states):
        identity, orig_shape = hidden_states, hidden_states.shape
        topk_idx, topk_weight, _ = self.gate(hidden_states)
        x = hidden_states.view(-1, orig_shape[-1])
        idxs = topk_idx.view(-1).argsort()
        sorted_tokens = x[idxs // topk_idx.shape[1]]
        counts = torch.bincount(topk_idx.view(-1), minlength=len(self.experts)).tolist()
        outs, start = [], 0
        for e, c in enumerate(counts):
            if c:
                outs.append(self.experts[e](sorted_tokens[start:start + c]))
            start += c
        new_x = torch.empty_like(sorted_tokens)
        new_x[idxs] = torch.cat(outs)
        y = new_x.view(*topk_idx.shape, -1).type(topk_weight.dtype).mul_(topk_weight.unsqueeze(-1)).sum(dim=1)
        return y.type(new_x.dtype).view(*orig_shape) + self.shared_experts(identity)


def to_remote_layout(model):
    for layer in model.model.layers:
        if hasattr(layer.mlp, "experts"):
            layer.mlp = RemoteMoE(layer.mlp)
    return model


# -- the brute force: routing, a, neuron outputs, in float64 ---------------------------------

def _softmax_topk(logits, k, renorm):
    p = logits.softmax(dim=-1)
    w, idx = p.topk(k, dim=-1)
    return (w / w.sum(dim=-1, keepdim=True) if renorm else w), idx


@torch.no_grad()
def route(family: str, block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each family's routing rule, from the router weights: ``(weights [T, k], experts [T, k])``."""
    r = router_of(block)
    if family == "dbrx":  # softmax over all experts, top-k, divided by the p-norm of the k weights
        p = (x @ r.layer.weight.double().T).softmax(dim=-1)
        w, idx = p.topk(block.top_k, dim=-1)
        return w / w.norm(p=block.moe_normalize_expert_weights, dim=-1, keepdim=True), idx
    logits = x @ (r.layer.weight if family == "jetmoe" else r.weight).double().T  # [T, E]
    if family in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
        renorm = family == "mixtral" or r.norm_topk_prob
        return _softmax_topk(logits, r.top_k, renorm)
    if family in ("gpt_oss", "granitemoeshared", "jetmoe"):  # top-k logits (gpt-oss: + a bias), softmax over k
        if family == "gpt_oss":
            logits = logits + r.bias.double()
        top, idx = logits.topk(r.top_k, dim=-1)
        return top.softmax(dim=-1), idx
    if family in ("deepseek_v2", "remote_deepseek"):
        w, idx = _softmax_topk(logits, r.top_k, False)
        return w * r.routed_scaling_factor, idx
    if family == "deepseek_v3":  # sigmoid scores, bias-corrected choice within the best groups
        scores = logits.sigmoid()
        choice = scores + r.e_score_correction_bias.double()
        g = choice.view(len(x), r.num_group, -1)
        best_groups = g.topk(2, dim=-1).values.sum(dim=-1).topk(r.topk_group, dim=-1).indices  # [T, topk_group]
        allowed = torch.zeros_like(g[..., 0], dtype=torch.bool).scatter_(1, best_groups, True)
        choice = choice.masked_fill(~allowed.repeat_interleave(g.shape[-1], dim=1), -torch.inf)
        idx = choice.topk(r.top_k, dim=-1).indices
        w = scores.gather(1, idx)
        return w / (w.sum(dim=-1, keepdim=True) + 1e-20) * r.routed_scaling_factor, idx
    raise KeyError(family)


def _silu(t):
    return t / (1 + torch.exp(-t))


def _swiglu(wg, wu):
    """Llama-style expert ``x -> (silu(x W_gate^T) * (x W_up^T), silu(x W_gate^T))``."""
    return lambda x: (_silu(x @ wg.T) * (x @ wu.T), _silu(x @ wg.T))


def _gpt_oss(ex, e):
    """gpt-oss's expert: interleaved gate (even) and up (odd) columns of ``x W_gu + b``, both clamped at
    ``limit`` (the gate from above only), ``a = (up + 1) * gate * sigmoid(alpha gate)``; gate score
    ``gate * sigmoid(alpha gate)``."""
    w, b, lim, alpha = ex.gate_up_proj[e].double(), ex.gate_up_proj_bias[e].double(), ex.limit, ex.alpha

    def run(x):
        gate = (x @ w[:, 0::2] + b[0::2]).clamp(max=lim)
        up = (x @ w[:, 1::2] + b[1::2]).clamp(min=-lim, max=lim)
        glu = gate * torch.sigmoid(alpha * gate)
        return (up + 1) * glu, glu
    return run


@torch.no_grad()
def expert_parts(block: nn.Module):
    """Per expert ``(x -> (a, gate score) [T, d_e], W_down [d, d_e], output bias [d] or None)`` in float64,
    each layout written out from its weights."""
    if not hasattr(block, "experts"):  # JetMoE: input_linear [E, 2 d_e, d] (gate rows first), output_linear [E, d, d_e]
        w_in, w_out = block.input_linear.weight.double(), block.output_linear.weight.double()
        de = w_out.shape[2]
        return [(_swiglu(w_in[e, :de], w_in[e, de:]), w_out[e], None) for e in range(len(w_in))]
    ex = block.experts
    if isinstance(ex, nn.ModuleList):
        return [(_swiglu(m.gate_proj.weight.double(), m.up_proj.weight.double()), m.down_proj.weight.double(), None)
                for m in ex]
    if hasattr(ex, "mlp"):  # DBRX: w1 (gate), v1 (up), w2 (down, transposed), each [E * d_e, d]
        w1, v1, w2 = (getattr(ex.mlp, n).double().view(ex.num_experts, -1, D) for n in ("w1", "v1", "w2"))
        return [(_swiglu(w1[e], v1[e]), w2[e].T, None) for e in range(ex.num_experts)]
    if getattr(ex, "is_transposed", False):  # gpt-oss: [E, d, 2 d_e] and [E, d_e, d], biases
        return [(_gpt_oss(ex, e), ex.down_proj[e].double().T, ex.down_proj_bias[e].double())
                for e in range(ex.down_proj.shape[0])]
    de = ex.down_proj.shape[2]
    return [(_swiglu(ex.gate_up_proj[e, :de].double(), ex.gate_up_proj[e, de:].double()), ex.down_proj[e].double(),
             None) for e in range(ex.down_proj.shape[0])]


def _shared_a(shared: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if hasattr(shared, "input_linear"):  # Granite-MoE-shared: gate and up halves of one map
        gate, up = (x @ shared.input_linear.weight.double().T).chunk(2, dim=-1)
        return _silu(gate) * up
    return _silu(x @ shared.gate_proj.weight.double().T) * (x @ shared.up_proj.weight.double().T)


@torch.no_grad()
def brute_force(family: str, model: nn.Module, i: int, x: torch.Tensor):
    """From MoE layer ``i``'s input ``x [T, d]``: ``(v [T, D], W [d, D], ran [T, E] bool, bias [T, d])`` in
    float64, where ``v_i = w_e(token) a_i`` for the chosen experts (0 elsewhere), ``g a_i`` for the shared
    expert (in the block, or the decoder layer's shared_mlp), and ``bias = sum_e w_e b_e`` (gpt-oss's expert
    output biases) or JetMoE's block bias (zeros elsewhere): the layer's FFN output is ``v W^T + bias``."""
    block, layer = moe_blocks(model)[i], layers_of(model)[i]
    x = x.double()
    weights, idx = route(family, block, x)
    experts = expert_parts(block)
    cols, parts = [], []
    ran = torch.zeros(len(x), len(experts), dtype=torch.bool).scatter_(1, idx, True)
    w_full = torch.zeros(len(x), len(experts), dtype=torch.float64).scatter_(1, idx, weights)
    bias = torch.zeros(len(x), x.shape[1], dtype=torch.float64)
    for e, (run, wd, b) in enumerate(experts):
        parts.append(run(x)[0] * w_full[:, e:e + 1])  # zero where the expert did not run
        cols.append(wd)
        if b is not None:
            bias += w_full[:, e:e + 1] * b
    if not hasattr(block, "experts"):
        bias += block.bias.double()
    shared = getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None) or \
        getattr(layer, "shared_mlp", None)
    if shared is not None:
        sg = getattr(block, "shared_expert_gate", None)
        parts.append(_shared_a(shared, x) * ((x @ sg.weight.double().T).sigmoid() if sg is not None else 1.0))
        cols.append((shared.down_proj if hasattr(shared, "down_proj") else shared.output_linear).weight.double())
    return torch.cat(parts, dim=1), torch.cat(cols, dim=1), ran, bias


def layers_of(model):
    return model.transformer.blocks if hasattr(model, "transformer") else model.model.layers


def block_of(layer):
    return next((getattr(layer, n) for n in ("mlp", "block_sparse_moe", "ffn")
                 if hasattr(getattr(layer, n, None), "experts") or hasattr(getattr(layer, n, None), "output_linear")),
                None)


def router_of(block):
    return block.gate if hasattr(block, "gate") else block.router


def moe_blocks(model):
    return {i: block_of(layer) for i, layer in enumerate(layers_of(model)) if block_of(layer) is not None}


def capture_inputs(model):
    """The test's own pre-hooks on every MoE block: ``{layer: [T, d] input}`` of the last forward."""
    store, handles = {}, []
    for i, block in moe_blocks(model).items():
        handles.append(block.register_forward_pre_hook(
            lambda m, args, _i=i: store.__setitem__(_i, args[0].detach().reshape(-1, D))))
    return store, handles


def capture_outputs(model):
    """The test's own forward hooks: ``{layer: [T, d]}`` the layer's FFN output of the last forward (the
    MoE block's, plus the decoder layer's shared_mlp where there is one)."""
    store, handles = {}, []

    def put(i, o):
        o = (o[0] if isinstance(o, tuple) else o).detach().reshape(-1, D)  # gpt-oss: (output, router scores)
        store[i] = store.get(i, 0) + o

    def clear(i):
        store.pop(i, None)
    for i, block in moe_blocks(model).items():
        handles.append(block.register_forward_pre_hook(lambda m, a, _i=i: clear(_i)))
        handles.append(block.register_forward_hook(lambda m, a, o, _i=i: put(_i, o)))
        outer = getattr(layers_of(model)[i], "shared_mlp", None)
        if outer is not None:
            handles.append(outer.register_forward_hook(lambda m, a, o, _i=i: put(_i, o)))
    return store, handles


def ids(batch=3, seq=13, seed=0):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


# -- the sites -----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ALL_LAYOUTS)
def test_sites_and_virtual_activations_equal_brute_force(family):
    """One site per MoE layer: d_ff = E d_e + d_shared; ``a`` = the float64 virtual vector from the
    router weights; ``y`` = the block output = ``W_cat a``; column norms of the concatenated W_down."""
    model = build(family)
    sites = find_ffn_sites(model)
    blocks = moe_blocks(model)
    assert len(sites) == 3 and {s.index for s in sites if s.moe is not None} == set(blocks)
    x = ids()
    store, handles = capture_inputs(model)
    seen = {}
    try:
        with read_activations(model, lambda s, a, y: seen.__setitem__(s.index, (a.clone(), y.clone())),
                              with_output=True):
            logits(model, x)
    finally:
        for h in handles:
            h.remove()
    for i, block in blocks.items():
        site = sites[i]
        v_ref, w_ref, ran, _ = brute_force(family, model, i, store[i])
        assert site.d_ff == v_ref.shape[1] and site.module is block and site.moe.ran is None  # cleared on exit
        a, y = seen[i]
        assert a.shape == (3, 13, site.d_ff) and y.shape == (3, 13, D)
        torch.testing.assert_close(a.reshape(-1, site.d_ff).double(), v_ref, atol=1e-5, rtol=1e-4)
        # y: the neurons' outputs only (gpt-oss's expert output biases left out, as a dense FFN's down bias)
        torch.testing.assert_close(y.reshape(-1, D).double(), v_ref @ w_ref.T, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(site.weight_t().double(), w_ref.T)
        torch.testing.assert_close(site.column_norms().double(), w_ref.norm(dim=0), atol=1e-6, rtol=1e-5)
        # experts that did not run contribute exact zeros
        not_ran = ~ran.repeat_interleave(site.moe.d_expert, dim=1)
        assert (a.reshape(-1, site.d_ff)[:, : not_ran.shape[1]][not_ran] == 0).all()
    assert count_hooks(model) == 0


@pytest.mark.parametrize("family", ALL_LAYOUTS)
def test_unmasked_logits_equal_the_unhooked_model(family):
    """With no neuron masked the model computes what it computes unhooked: bitwise for the eager
    experts (our forward is transformers' eager loop), to float tolerance for the remote-code
    layout (it sums the k experts in another order) and JetMoE (its router groups each expert's
    tokens by an unstable sort: the rows of each product in another order)."""
    model = build(family)
    x = ids(seed=3)
    ref = logits(model, x)
    with apply_rule(model, DenseRule()):
        out = logits(model, x)
    if family == "remote_deepseek":
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ref, logits(build("deepseek_v2"), x), atol=1e-5, rtol=1e-5)  # the layout is faithful
    elif family == "jetmoe":
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(out, ref)
    assert torch.equal(logits(model, x), ref) and count_hooks(model) == 0


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])
@pytest.mark.parametrize("impl", ["batched_mm", "grouped_mm"])
def test_unmasked_logits_equal_the_fused_kernels(family, impl):
    """The library's own batched/grouped expert kernels (the default: grouped_mm) against our eager
    loop: equal to float tolerance (gpt-oss: transposed, interleaved, biased weights). grouped_mm on
    the CPU needs 16-byte strides (d_expert 12)."""
    width = {"qwen2_moe": "moe_intermediate_size", "gpt_oss": "intermediate_size"}[family]
    FAMILIES[f"{family}_12"] = (*FAMILIES[family][:2], {**FAMILIES[family][2], width: 12})
    try:
        model = build(f"{family}_12", experts_implementation=impl)
    finally:
        del FAMILIES[f"{family}_12"]
    assert model.config._experts_implementation == impl
    x = ids(seed=4)
    ref = logits(model, x)
    with apply_rule(model, DenseRule()):
        out = logits(model, x)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


# More transformers families with fused experts, built from their config classes (tiny sizes under
# every config's own names): the sites are found and, unmasked, the logits are bitwise the model's own.
MORE_FAMILIES = ("phimoe", "granitemoe", "glm4_moe", "ernie4_5_moe", "minimax", "flex_olmo", "exaone_moe",
                 "granitemoe_swa", "granitemoehybrid")
# Granite-MoE-SWA and -hybrid: the shared_mlp next to the MoE block (measured as its shared part); hybrid: a
# Mamba layer first
MORE_EXTRA = {"granitemoe_swa": {"shared_intermediate_size": 17},
              "granitemoehybrid": {"shared_intermediate_size": 17, "layer_types": ["mamba", "attention"],
                                   "mamba_n_heads": 4, "mamba_d_head": 12, "mamba_n_groups": 1, "mamba_d_state": 8}}
MORE_CONFIG = {**COMMON, "num_hidden_layers": 2, "intermediate_size": 13, "moe_intermediate_size": 11,
               "num_local_experts": 5, "num_experts": 5, "n_routed_experts": 5, "num_experts_per_tok": 2}


@pytest.mark.parametrize("model_type", MORE_FAMILIES)
def test_more_fused_families(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **MORE_CONFIG, **MORE_EXTRA.get(model_type, {}))
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    sites = find_ffn_sites(model)
    moe = [s for s in sites if s.moe is not None]
    assert moe and all(s.moe.num_experts == 5 and s.moe.top_k == 2 for s in moe)
    if model_type in MORE_EXTRA:  # the decoder layer's shared_mlp is the shared part
        assert all(s.moe.d_shared == 17 and s.moe.shared_outside is not None for s in moe)
    x = ids(seed=8)
    ref = logits(model, x)
    with apply_rule(model, DenseRule()):
        assert torch.equal(logits(model, x), ref)
    if model_type == "phimoe":  # its sparsemixer routing is fixed at 2 experts whatever top_k says
        with pytest.raises(ValueError, match="chose 2 experts per token with top_k set to 1: its routing does not "
                                             "follow top_k"), apply_rule(model, RoutedExpertsRule(1)):
            logits(model, x)
    else:
        with apply_rule(model, RoutedExpertsRule(1)):
            assert not torch.equal(logits(model, x), ref)
    assert all(s.moe.top_k == 2 for s in moe) and count_hooks(model) == 0


# -- CETT, masking and the activation ratios ----------------------------------------------------

@pytest.mark.parametrize("family", ALL_LAYOUTS)
def test_cett_masked_output_and_both_ratios_equal_brute_force(family):
    """At thresholds eps_l: the probe's exact mean CETT (Eq. 2, over the experts that ran, routing
    weights included) and the sparse pass's activation ratios equal the float64 brute force, and
    the masked MoE output equals ``sum`` of the kept neuron outputs, computed from the block's input
    in the sparse pass itself (plus gpt-oss's expert output biases ``sum_e w_e b_e``: constants, kept
    in the model and left out of CETT's output norm, as a dense FFN's down bias; plus Granite-MoE-shared's
    shared_mlp, whose neurons are the layer's shared part and are masked too)."""
    model = build(family)
    x = ids(batch=4, seq=11, seed=5)
    probe = SparsityProbe(model, Blocks(x))
    sites = probe.sites
    blocks = moe_blocks(model)
    # thresholds at the 60% quantile of each layer's nonzero neuron norms
    eps = torch.stack([_quantile_nonzero(probe.activations(s.index), s.column_norms(), 0.6) for s in sites])
    cett = probe.layer_cett(eps)
    store, handles = capture_inputs(model)
    out, more = capture_outputs(model)
    handles += more
    try:
        with torch.no_grad():
            model(input_ids=x, use_cache=False)
        dense_in = dict(store)
        stats = probe.sparse_pass(CETTRule(eps))
        sparse_in = dict(store)
    finally:
        for h in handles:
            h.remove()
    for i in blocks:
        s = sites[i]
        # CETT per token over the dense pass (the probe's statistics)
        v, w, ran, _ = brute_force(family, model, i, dense_in[i])
        norms = v.abs() * w.norm(dim=0)
        y = v @ w.T
        tail = (v * (norms <= eps[i].double())) @ w.T
        ref_cett = (tail.norm(dim=1) / y.norm(dim=1)).mean()
        assert abs(float(cett[i]) - float(ref_cett)) < 1e-5
        # the sparse pass: masked output and both activation ratios, from that pass's own input
        v, w, ran, bias = brute_force(family, model, i, sparse_in[i])
        keep = (v.abs() * w.norm(dim=0)) > eps[i].double()
        assert 0 < keep.sum() < ran.sum() * s.moe.d_expert + len(v) * s.moe.d_shared
        torch.testing.assert_close(out[i].double(), (v * keep) @ w.T + bias, atol=1e-5, rtol=1e-4)
        if family == "gpt_oss":
            assert bias.abs().max() > 0.01
        ran_neurons = ran.sum(dim=1) * s.moe.d_expert + s.moe.d_shared
        assert abs(float(stats.layer_active[i]) - keep.sum().item() / (len(v) * s.d_ff)) < 1e-6
        assert abs(float(stats.layer_active_ran[i]) - keep.sum().item() / ran_neurons.sum().item()) < 1e-6
    for s in sites:  # dense FFN layers (DeepSeek's first, Qwen2-MoE's mlp_only_layers): both counts agree
        if s.moe is None:
            assert float(stats.layer_active_ran[s.index]) == pytest.approx(float(stats.layer_active[s.index]))
    assert stats.activation_ratio_ran > stats.activation_ratio  # fewer neurons ran than exist
    assert stats.activation_ratio == pytest.approx(float(stats.layer_active.mean()))


def _quantile_nonzero(a: torch.Tensor, col_norms: torch.Tensor, q: float) -> torch.Tensor:
    n = (a.float().abs() * col_norms).flatten()
    return n[n > 0].quantile(q)


def test_memory_and_stream_modes_agree_and_results_carry_both_ratios(tmp_path):
    """PPL-1% on Qwen2-MoE (shared expert, a dense first layer): stream mode gives the memory mode's
    answer; the result, its JSON and the table carry both activation ratios; a dense model's JSON
    does not gain the fields."""
    model = build("qwen2_moe")
    x = ids(batch=6, seq=33, seed=1)
    reports = {}
    for mode in ("memory", "stream"):
        probe = SparsityProbe(model, Blocks(x), mode=mode)
        reports[mode] = su.measure_probe(probe, [1])
    mem, stream = reports["memory"].results[0], reports["stream"].results[0]
    assert mem.cett == pytest.approx(stream.cett, abs=1e-9)
    torch.testing.assert_close(torch.tensor(mem.thresholds), torch.tensor(stream.thresholds), rtol=1e-5, atol=1e-7)
    assert mem.activation_ratio_ran == pytest.approx(stream.activation_ratio_ran, abs=1e-6)
    assert 0 < mem.activation_ratio < mem.activation_ratio_ran < 1
    assert mem.activation_ratio_ran == pytest.approx(sum(mem.layer_activation_ratio_ran) / 3, abs=1e-6)
    path = tmp_path / "r.json"
    reports["memory"].save(path)
    back = SparsityReport.load(path)
    assert back.results[0].activation_ratio_ran == mem.activation_ratio_ran
    assert "ran ratio" in back.table() and "over the neurons of the experts that ran" in back.table()
    assert all("activation_ratio_ran" in pt for pt in json.loads(path.read_text())["search_points"])
    dense = PPLPResult(p=1, cett=0.1, activation_ratio=0.5, ppl_dense=2, ppl_sparse=2.02, ppl_ratio=1.01,
                       thresholds=[0.1], layer_activation_ratio=[0.5], layer_cett=[0.1])
    assert "activation_ratio_ran" not in dense.to_dict() and "layer_activation_ratio_ran" not in dense.to_dict()
    # sparse_inference runs an MoE model with the result's thresholds
    with sparse_inference(model, mem):
        assert count_hooks(model) > 0
        logits(model, x[:1])
    assert count_hooks(model) == 0


def test_stream_refinement_sorts_each_moe_layer_once(monkeypatch):
    """Stream mode refines every layer inside its hook with several exact evaluations of the same
    activations: an MoE layer's expert rows are put in token order once per hook, not once per
    evaluation (issue 10: 178 sorts in a 12-pass call on the H200), and the thresholds stay memory mode's."""
    from sparsing_utils.expert_rows import ExpertRows

    model = build("mixtral")
    x = ids(batch=6, seq=33, seed=1)
    sorts = []
    real_sorted = ExpertRows.sorted

    def counting(self):
        if not self.ascending:
            sorts.append(self.n_tokens)
        return real_sorted(self)

    memory = SparsityProbe(model, Blocks(x), mode="memory")
    eps_memory, _ = memory.thresholds_for(0.2)
    stream = SparsityProbe(model, Blocks(x), mode="stream")
    stream.prepare()
    monkeypatch.setattr(ExpertRows, "sorted", counting)
    evaluations = stream.cett_evaluations
    eps_stream, _ = stream.thresholds_for(0.2)
    assert stream.cett_evaluations - evaluations >= 2  # several rounds read the same sorted rows
    assert len(sorts) == len(stream.sites) == 3  # one per MoE layer's hook
    torch.testing.assert_close(eps_stream, eps_memory, rtol=0, atol=0)


def test_sparsing_measure_on_an_moe_folder(tmp_path, capsys):
    """The command line on a saved tiny Qwen2-MoE (model folder + the character tokenizer), stream mode:
    the table gets the ran-experts column and the JSON both ratios per result."""
    from conftest import build_tiny_tokenizer, markov_text

    from sparsing_utils import cli

    model = build("qwen2_moe")
    model.config.vocab_size = VOCAB
    folder = tmp_path / "moe"
    model.save_pretrained(folder)
    tok = build_tiny_tokenizer()
    tok.save_pretrained(folder)
    text = tmp_path / "t.txt"
    text.write_text("".join(ch for ch in markov_text(3000, seed=4) if tok.convert_tokens_to_ids(ch) < VOCAB))
    out = tmp_path / "r.json"
    rc = cli.main(["measure", "--model", str(folder), "--text", str(text), "--tokens", "512", "--block-len", "64",
                   "--p", "1", "--mode", "stream", "--out", str(out), "--quiet"])
    stdout = capsys.readouterr().out
    assert rc == 0
    assert "ran ratio" in stdout and "over the neurons of the experts that ran" in stdout
    r = json.loads(out.read_text())["results"][0]
    assert 0 < r["activation_ratio"] < r["activation_ratio_ran"] <= 1 and len(r["layer_activation_ratio_ran"]) == 3


# -- Fig. 2: the number of routed experts -------------------------------------------------------

@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "remote_deepseek", "gpt_oss", "granitemoeshared",
                                    "dbrx", "jetmoe"])
def test_routed_experts_curve(family):
    """pareto_sweep(probe, "experts"): the routers' top-k set to k on the same tokens; the all-expert
    activation ratio is (k d_e + d_shared) / (E d_e + d_shared) per MoE layer (1 for dense layers),
    rising with k; the ratio over the experts that ran is 1; k = the model's own top-k is the dense
    model; routers are restored."""
    model = build(family)
    probe = SparsityProbe(model, Blocks(ids(batch=4, seq=17, seed=2)))
    moe = [s for s in probe.sites if s.moe is not None]
    default_k = moe[0].moe.top_k
    most = 4 if family == "deepseek_v3" else moe[0].moe.num_experts  # V3: 1 of 2 groups of 4 experts
    ks = list(range(1, most + 1))
    curve = pareto_sweep(probe, "experts", ks)
    assert list(curve["rule"]) == ["experts"] * len(ks) and list(curve["value"]) == ks
    for k, r, ran in zip(ks, curve["activation_ratio"], curve["activation_ratio_ran"]):
        per_layer = [(k * s.moe.d_expert + s.moe.d_shared) / s.d_ff if s.moe is not None else 1.0 for s in probe.sites]
        assert r == pytest.approx(sum(per_layer) / len(per_layer), abs=1e-6)
        assert ran == pytest.approx(1.0)
    assert curve["activation_ratio"].is_monotonic_increasing and curve["activation_ratio"].nunique() == len(ks)
    own = curve[curve["value"] == default_k].iloc[0]
    assert own["ppl"] == pytest.approx(probe.dense.ppl, rel=1e-6)
    assert all(s.moe.top_k == default_k for s in moe)
    # placed by activation ratio: the nearest k
    placed = pareto_sweep(probe, "experts", activation_ratios=[float(curve["activation_ratio"].iloc[0]),
                                                               float(curve["activation_ratio"].iloc[-1])])
    assert list(placed["value"]) == [1, most]


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss", "dbrx"])
def test_routing_every_token_to_all_experts(family):
    """k = E: the router's [tokens, E] logits have the shape of the routing weights; the weights are still
    the ones next to the index (the logits never taken for them): the hooked model equals the model's own
    forward with its top-k set to E."""
    model = build(family)
    x = ids(seed=13)
    e_all = find_ffn_sites(model)[-1].moe.num_experts
    with routed_top_k(model, e_all):  # only attributes set: the model's own forward
        ref = logits(model, x)
    with apply_rule(model, RoutedExpertsRule(e_all)):
        torch.testing.assert_close(logits(model, x), ref, atol=1e-5, rtol=1e-5)
    assert not torch.equal(ref, logits(model, x))


def test_routed_top_k_restores_and_rejects_bad_k():
    model = build("deepseek_v3")
    routers = [b.gate for b in moe_blocks(model).values()]
    with pytest.raises(ValueError, match=r"k=5 out of range .*1\.\.4 .*1 of 2 expert groups"), routed_top_k(model, 5):
        pass
    with pytest.raises(RuntimeError, match="boom"), routed_top_k(model, 1):
        assert all(r.top_k == 1 for r in routers)
        raise RuntimeError("boom")
    assert all(r.top_k == 3 for r in routers)
    with pytest.raises(ValueError, match="no MoE layer"), routed_top_k(build_dense(), 1):
        pass
    with pytest.raises(ValueError, match="integer >= 1"):
        RoutedExpertsRule(0)


def build_dense():
    import transformers as tf

    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**{**COMMON, "intermediate_size": 13})).eval()


def test_hooks_and_forward_restored_after_exceptions():
    model = build("mixtral")
    x = ids()
    ref = logits(model, x)

    def boom(site, a, gate):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), su.edit_activations(model, boom):
        logits(model, x)
    assert count_hooks(model) == 0 and all("forward" not in b.__dict__ for b in moe_blocks(model).values())
    assert torch.equal(logits(model, x), ref)
    # nested contexts: a read inside an edit sees the edited vector; both removed on exit
    seen = {}
    with su.edit_activations(model, lambda s, a, g: torch.zeros_like(a)):
        with read_activations(model, lambda s, a: seen.__setitem__(s.index, a.abs().max().item())):
            logits(model, x)
        assert count_hooks(model) == 3
    assert set(seen.values()) == {0.0} and count_hooks(model) == 0


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss", "dbrx"])
def test_gate_ranked_rules_see_the_experts_gates(family):
    """Top-k by gate and FAT rank by act(W_gate x) of each expert that ran (zeros elsewhere); gpt-oss:
    its clamped gate times sigmoid(alpha gate)."""
    model = build(family)
    x = ids(seed=7)
    store, handles = capture_inputs(model)
    gates = {}
    try:
        with su.edit_activations(model, lambda s, a, g: gates.__setitem__(s.index, g.clone()), need_gate=True):
            logits(model, x)
    finally:
        for h in handles:
            h.remove()
    for i, block in moe_blocks(model).items():
        xin = store[i].double()
        _, idx = route(family, block, xin)
        ref = []
        for e, (run, _, _) in enumerate(expert_parts(block)):
            ran = (idx == e).any(dim=1, keepdim=True)
            ref.append(run(xin)[1] * ran)
        torch.testing.assert_close(gates[i].reshape(len(xin), -1).double(), torch.cat(ref, dim=1), atol=1e-5, rtol=1e-4)
    if family == "olmoe":  # k = round(0.1 * 78) of the 2 x 13 that ran
        stats = SparsityProbe(model, Blocks(x)).sparse_pass(su.TopKRule(0.1))
        assert stats.activation_ratio == pytest.approx(8 / 78) and stats.activation_ratio_ran == pytest.approx(8 / 26)


# -- bad input ----------------------------------------------------------------------------------

def test_incomplete_moe_blocks_get_clear_errors():
    model = build("qwen2_moe")
    layer = model.model.layers[1]
    broken = copy.deepcopy(layer)
    del broken.mlp.gate
    with pytest.raises(ValueError, match=r"model.layers.1.mlp \(Qwen2MoeSparseMoeBlock\) has experts but no router: "
                                         r"searched gate, router"):
        find_moe(broken, "model.layers.1")
    broken = copy.deepcopy(layer)
    del broken.mlp.experts.gate_up_proj
    with pytest.raises(ValueError, match="fused 3-D expert weights: expected gate_up_proj"):
        find_moe(broken, "model.layers.1")
    broken = copy.deepcopy(layer)
    broken.mlp.shared_expert = nn.Sequential(nn.Linear(D, 5), nn.Linear(5, D))
    with pytest.raises(ValueError, match="shared expert Sequential is not a gated MLP .*gate_proj/up_proj/down_proj"):
        find_moe(broken, "model.layers.1")
    broken = copy.deepcopy(layer)
    broken.mlp.experts = nn.Module()
    with pytest.raises(ValueError, match="neither fused 3-D expert weights nor module list"):
        find_moe(broken, "model.layers.1")
    # a transformers 4.x-style router that returns logits only: named at the first forward
    m = build("mixtral")
    for block in moe_blocks(m).values():
        block.gate = nn.Linear(D, 5, bias=False)
    with pytest.raises(ValueError, match="returned .*expected the chosen experts' indices and routing weights"), \
            apply_rule(m, DenseRule()):
        logits(m, ids())
    assert count_hooks(m) == 0


def test_bad_fused_layouts_and_outer_shared_mlp_get_clear_errors():
    """gpt-oss-style experts that are not gated or lack a bias; a shared expert in the block and a shared
    MLP next to it; the decoder layer's shared MLP called on another input than the block's."""
    layer = build("gpt_oss").model.layers[0]
    broken = copy.deepcopy(layer)
    broken.mlp.experts.has_gate = False
    with pytest.raises(ValueError, match=r"GptOssMLP\), fused 3-D expert weights: unsupported fused-expert layout "
                                         "has_gate=False"):
        find_moe(broken, "model.layers.0")
    broken = copy.deepcopy(layer)
    del broken.mlp.experts.down_proj_bias
    with pytest.raises(ValueError, match=r"has_bias=True but no down_proj_bias of shape \(5, 24\)"):
        find_moe(broken, "model.layers.0")
    model = build("granitemoeshared")
    broken = copy.deepcopy(model.model.layers[0])
    broken.block_sparse_moe.shared_expert = copy.deepcopy(broken.shared_mlp)
    with pytest.raises(ValueError, match="has a shared expert and the decoder layer another shared MLP"):
        find_moe(broken, "model.layers.0")
    block, outer = model.model.layers[0].block_sparse_moe, model.model.layers[0].shared_mlp
    h = torch.randn(1, 4, D)
    with torch.no_grad(), apply_rule(model, DenseRule()):
        assert "forward" in outer.__dict__
        with pytest.raises(RuntimeError, match="shared MLP next to model.layers.0.block_sparse_moe was called on "
                                               "another input"):
            outer(h)  # before the block
        block(h)
        with pytest.raises(RuntimeError, match="another input"):
            outer(h.clone())
    assert "forward" not in outer.__dict__ and "forward" not in block.__dict__ and count_hooks(model) == 0
    with torch.no_grad():
        ref = block(h) + outer(h)
        with apply_rule(model, DenseRule()):
            assert torch.equal(block(h) + outer(h), ref)


# -- the compact path (ExpertRows) against the full-width virtual vector --------------------------

def test_expert_rows_operations():
    """ExpertRows (4 experts of width 3, 2 shared columns, 9 tokens; rows out of order, one expert
    with no token) against the full [9, 14] matrix it stands for."""
    g = torch.Generator().manual_seed(11)
    rows = [torch.tensor([5, 1, 7]), torch.tensor([], dtype=torch.long), torch.tensor([0, 8, 2, 5]), torch.tensor([3])]
    values = [torch.randn(len(r), 3, generator=g) for r in rows]
    values[2][1] = 0  # an expert that ran and gave exact zeros
    er = su.ExpertRows(9, 3, rows, values, torch.randn(9, 2, generator=g), (3, 3))
    ref = torch.zeros(9, 14)
    for e, (r, x) in enumerate(zip(rows, values)):
        ref[r, 3 * e:3 * e + 3] = x
    ref[:, 12:] = er.shared
    assert er.shape == (9, 14) and er.d_ff == 14 and er.d_shared == 2
    assert torch.equal(er.full(), ref.view(3, 3, 14))
    srt = er.sorted()
    assert srt.ascending and all(bool((r[1:] > r[:-1]).all()) for r in srt.rows) and torch.equal(srt.full(), er.full())
    assert torch.equal(er.gather(ref * 2).full(), 2 * er.full())  # reads back the stored places only
    index = torch.tensor([0, 2, 5, 8])
    assert torch.equal(er.take(index).full(), ref[index]) and er.take(index).n_tokens == 4
    both = su.ExpertRows.cat([er.take(index), er])
    assert torch.equal(both.full(), torch.cat([ref[index], ref]))
    keep = er.map(lambda cols, x, _: x > 0)
    assert keep.dtype == torch.bool and torch.equal(keep.full(), ref.view(3, 3, 14) > 0)
    assert torch.equal(keep.row_sums(), (ref > 0).sum(dim=-1).float().view(3, 3))
    assert torch.equal(er.map(lambda cols, x, k: x * k, keep).full(), (ref * (ref > 0)).view(3, 3, 14))
    assert er.zeros_left_out() == 9 * 12 - 8 * 3
    assert bool(er.all_finite())
    values[3][0, 1] = float("nan")
    assert not bool(er.all_finite())
    assert er.nbytes == sum(t.numel() * t.element_size() for t in (*rows, *values, er.shared))


class DroppingRouter(nn.Module):
    """A router whose choices of expert ``gone`` and every slot of every 5th token are dropped (index
    ``E``, as capacity-limited routers mark them): an expert with no token, tokens with fewer experts
    and tokens routed to no expert at all (only the shared expert, if any, runs for them)."""

    def __init__(self, router, num_experts, gone=1):
        super().__init__()
        self.inner, self.num_experts, self.gone = router, num_experts, gone
        self.top_k = router.top_k

    def forward(self, h):
        out = list(self.inner(h))
        i = next(j for j, t in enumerate(out) if isinstance(t, torch.Tensor) and not t.is_floating_point())
        index = out[i].clone()
        flat = index.view(-1, index.shape[-1])
        flat[flat == self.gone] = self.num_experts
        flat[::5] = self.num_experts
        out[i] = index
        return tuple(out)


def _capture(model, x, mask, compact, batch=2):
    """``{layer: (a, y)}`` read in batches of ``batch`` blocks (as the probes below run): full width
    ``a [blocks, seq, d_ff]``, or compact: a list of one ExpertRows per batch."""
    seen = {}
    with torch.no_grad(), read_activations(model, lambda s, a, y: seen.setdefault(s.index, []).append((a, y.clone())),
                                           with_output=True, compact=compact):
        for b in range(0, len(x), batch):
            model(input_ids=x[b:b + batch], attention_mask=mask[b:b + batch], use_cache=False)
    return {i: ([a for a, _ in v] if compact else torch.cat([a for a, _ in v]), torch.cat([y for _, y in v]))
            for i, v in seen.items()}


@pytest.mark.parametrize("family,dropping", [(f, False) for f in ALL_LAYOUTS]
                         + [(f, True) for f in ("mixtral", "qwen2_moe", "deepseek_v2", "remote_deepseek")])
def test_compact_path_equals_full_width_reference(family, dropping):
    """The hooks hold each MoE layer's v per expert (ExpertRows): what they show, the CETT statistics
    (memory and stream mode, padded blocks, several batches), the masks and counts of a sparse pass
    and its logits equal those of the full-width vector [tokens, E d_e + d_s] (bitwise; the dense
    product without expert blocks to float tolerance). ``dropping``: an expert with no token and
    tokens routed to no expert (DroppingRouter)."""
    from sparsing_utils.cett import cett_statistics, l2_norm

    model = build(family)
    if dropping:
        for block in moe_blocks(model).values():
            block.gate = DroppingRouter(block.gate, find_moe(nn.ModuleDict({"mlp": block}), "x").num_experts)
    x = ids(batch=5, seq=13, seed=9)
    mask = torch.ones_like(x)
    mask[1, 9:] = 0  # padding at the end of two blocks
    mask[3, 4:] = 0
    real = mask.bool().reshape(-1)
    full, compact = _capture(model, x, mask, False), _capture(model, x, mask, True)
    sites = find_ffn_sites(model)
    moe = [s for s in sites if s.moe is not None]
    for s in moe:
        parts = compact[s.index][0]
        assert all(isinstance(er, su.ExpertRows) for er in parts) and parts[0].lead == (2, 13)
        assert torch.equal(torch.cat([er.full() for er in parts]), full[s.index][0])
        assert torch.equal(compact[s.index][1], full[s.index][1])
        if dropping:
            assert all(len(er.rows[1]) == 0 for er in parts)  # expert 1 got no token
            assert not any(bool((r % 5 == 0).any()) for er in parts for r in er.rows)  # every 5th token: no expert
        assert s.moe.ran is None
    # CETT statistics: the probe (per expert) against the full-width a of the real tokens
    probe = SparsityProbe(model, Blocks(x, mask), batch_size=2)
    stream = SparsityProbe(model, Blocks(x, mask), batch_size=2, mode="stream")
    eps = torch.stack([_quantile_nonzero(full[s.index][0].reshape(-1, s.d_ff)[real], s.column_norms(), 0.5)
                       for s in sites])
    cett = probe.layer_cett(eps)
    assert torch.equal(stream.layer_cett(eps), cett)
    for s in sites:
        a = full[s.index][0].reshape(-1, s.d_ff)[real]  # [real tokens, d_ff]
        y_norm = l2_norm(full[s.index][1].reshape(-1, D)[real])
        assert torch.equal(probe.activations(s.index), a)
        ref, _ = cett_statistics(a, s.weight_t().detach(), s.column_norms(), eps[s.index:s.index + 1], y_norm,
                                 blocks=s.expert_blocks)
        assert float(cett[s.index]) == float((ref / len(a)).float())
        dense_ref, _ = cett_statistics(a, s.weight_t().detach(), s.column_norms(), eps[s.index:s.index + 1], y_norm)
        assert float(cett[s.index]) == pytest.approx(float(dense_ref / len(a)), abs=1e-6)
    # sparse passes: masks, counts and logits against a full-width edit by the same rule (batches of 2)
    norms = {s.index: s.column_norms() for s in sites}
    for rule in (CETTRule(eps), su.TopKRule(0.3), su.FATRule(0.05)):
        masks, counts = {}, {}

        def reference(site, a, gate, _rule=rule, _masks=masks):
            keep = _rule.keep(site, a, gate, norms[site.index])
            if site.moe is not None:
                keep = keep & site.moe.ran_mask()
            assert torch.equal(keep, _masks[site.index][-1])
            return a * keep

        def record(s, k, _masks=masks):
            _masks.setdefault(s.index, []).append(k)

        def count(s, n, _counts=counts):
            _counts.setdefault(s.index, []).append(n)

        for b in range(0, len(x), 2):
            ids_b, mask_b = x[b:b + 2], mask[b:b + 2]
            with torch.no_grad(), apply_rule(model, rule, record=record, count=count):
                out = model(input_ids=ids_b, attention_mask=mask_b, use_cache=False).logits
            with torch.no_grad(), su.edit_activations(model, reference, need_gate=rule.need_gate):
                assert torch.equal(out, model(input_ids=ids_b, attention_mask=mask_b, use_cache=False).logits)
        stats = probe.sparse_pass(rule)  # its counts: per expert, padding excluded
        for s in sites:
            kept = torch.cat(masks[s.index])  # [blocks, seq, d_ff]
            assert torch.equal(torch.cat(counts[s.index]), kept.sum(dim=-1, dtype=torch.float32))
            kept = kept.reshape(-1, s.d_ff)[real]
            assert float(stats.layer_active[s.index]) == pytest.approx(float(kept.float().mean()), abs=1e-7)
    assert count_hooks(model) == 0


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_tokens_routed_to_no_expert_count_only_shared_neurons(family):
    """With DroppingRouter, every 5th token runs no routed expert: its neurons that ran are the
    shared ones (d_s; none for Mixtral, whose output for it is 0), and both activation ratios of a
    sparse pass equal the counts from the full-width mask."""
    model = build(family)
    for block in moe_blocks(model).values():
        block.gate = DroppingRouter(block.gate, find_moe(nn.ModuleDict({"mlp": block}), "x").num_experts)
    x = ids(batch=4, seq=10, seed=12)
    probe = SparsityProbe(model, Blocks(x))
    eps = torch.stack([_quantile_nonzero(probe.activations(s.index), s.column_norms(), 0.4) for s in probe.sites])
    ran_counts, masks = {}, {}

    def record(site, keep):
        masks[site.index] = keep.reshape(-1, site.d_ff)
        ran_counts[site.index] = site.ran_neurons(keep).reshape(-1)

    with torch.no_grad(), apply_rule(model, CETTRule(eps), record=record):
        model(input_ids=x, use_cache=False)
    stats = probe.sparse_pass(CETTRule(eps))
    for s in probe.sites:
        if s.moe is None:
            continue
        assert bool((ran_counts[s.index][::5] == s.moe.d_shared).all())
        assert not masks[s.index][::5, : s.moe.num_experts * s.moe.d_expert].any()
        if s.moe.d_shared == 0:
            assert not bool(probe.activations(s.index)[::5].any())
        assert float(stats.layer_active[s.index]) == pytest.approx(float(masks[s.index].float().mean()), abs=1e-7)
        assert float(stats.layer_active_ran[s.index]) == pytest.approx(
            float(masks[s.index].sum() / ran_counts[s.index].sum()), abs=1e-7)


def test_pad_rows_pads_on_cuda_only():
    """cett.gemm_rows / pad_rows: rows varying in number are padded to a multiple of 128 on CUDA (fewer
    distinct GEMM shapes for cuBLAS), never on the CPU; the padding is zero rows, the tensor itself when
    none are needed."""
    from sparsing_utils import cett

    assert [cett.gemm_rows(n, torch.device("cuda")) for n in (0, 1, 127, 128, 129, 4000)] == [0, 128, 128, 128, 256, 4096]
    assert [cett.gemm_rows(n, torch.device("cpu")) for n in (1, 129)] == [1, 129]
    t = torch.arange(6.0).reshape(3, 2)
    assert cett.pad_rows(t) is t


def test_memory_mode_pads_stored_expert_rows_once(monkeypatch):
    """Memory mode holds each MoE layer's stored rows in buffers padded once (ExpertRows.cat(padded=True)):
    the exact CETT evaluations then pad nothing, and give the answers of rows padded at every evaluation."""
    from sparsing_utils import cett
    from sparsing_utils.expert_rows import ExpertRows

    monkeypatch.setattr(cett, "gemm_rows", lambda n, device: -(-n // 16) * 16 + 16)  # padding forced on the CPU
    model = build("mixtral")
    probe = SparsityProbe(model, Blocks(ids(batch=4, seq=11, seed=3)), batch_size=2)
    probe.prepare()
    held = [a for a in probe._acts if isinstance(a, ExpertRows)]
    assert held
    for a in held:
        for r, x, (rb, xb) in zip(a.rows, a.values, a.padded_buffers()):
            n = len(r)
            assert rb.shape[0] == xb.shape[0] == -(-n // 16) * 16 + 16
            assert torch.equal(rb[:n], r) and torch.equal(xb[:n], x)
            assert r.data_ptr() == rb.data_ptr() and x.data_ptr() == xb.data_ptr()  # views: the entries held once
            assert not rb[n:].any() and not xb[n:].any()
        shared = 0 if a.shared is None else a.shared.numel() * a.shared.element_size()
        assert a.nbytes == shared + sum(rb.numel() * rb.element_size() + xb.numel() * xb.element_size()
                                        for rb, xb in a.padded_buffers())  # the memory held, padding included
    eps = torch.full((len(probe.sites),), 0.05)
    calls = []

    def spy(t, _pad=cett.pad_rows):
        calls.append(t.shape[0])
        return _pad(t)

    monkeypatch.setattr(cett, "pad_rows", spy)
    with_buffers = probe.layer_cett(eps)
    assert calls == []  # no padding per evaluation
    for i, a in enumerate(probe._acts):  # the same rows without their buffers: padded at the evaluation
        if isinstance(a, ExpertRows):
            probe._acts[i] = ExpertRows(a.n_tokens, a.d_expert, a.rows, a.values, a.shared, a.lead, a.ascending)
    padded_each_time = probe.layer_cett(eps)
    assert calls  # the padding ran
    assert torch.equal(with_buffers, padded_each_time)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the rows are padded for products on CUDA only")
def test_cuda_stored_expert_rows_padded_once():
    """On CUDA (where cett.gemm_rows pads): memory mode's stored rows sit in buffers of gemm_rows rows, and
    the exact CETT of every layer is bitwise that of the same rows padded at each evaluation."""
    from sparsing_utils import cett
    from sparsing_utils.expert_rows import ExpertRows

    model = build("mixtral").to("cuda")
    probe = SparsityProbe(model, Blocks(ids(batch=4, seq=11, seed=3)), batch_size=2).prepare()
    held = [a for a in probe._acts if isinstance(a, ExpertRows)]
    assert held
    for a in held:
        for r, (rb, _) in zip(a.rows, a.padded_buffers()):
            assert rb.shape[0] == cett.gemm_rows(len(r), rb.device) and rb.is_cuda
    eps = torch.full((len(probe.sites),), 0.05)
    once = probe.layer_cett(eps)
    probe._acts = [ExpertRows(a.n_tokens, a.d_expert, a.rows, a.values, a.shared, a.lead, a.ascending)
                   if isinstance(a, ExpertRows) else a for a in probe._acts]
    assert torch.equal(once, probe.layer_cett(eps))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v2", "gpt_oss", "remote_deepseek"])
def test_padded_expert_rows_give_the_same_answers(family, monkeypatch):
    """The padding CUDA gets (cett.pad_rows), forced on the CPU with odd multiples: the experts' outputs,
    the exact CETT statistics (zero rows added to a token add exactly nothing), the sparse pass's counts and
    its logits equal those without padding (the products to float rounding: other row counts may take
    other GEMM kernels)."""
    from sparsing_utils import cett

    model = build(family)
    x = ids(batch=4, seq=11, seed=3)

    mask = torch.ones_like(x)
    sites = find_ffn_sites(model)

    def answers():
        probe = SparsityProbe(model, Blocks(x), batch_size=2)
        eps = torch.stack([_quantile_nonzero(probe.activations(s.index), s.column_norms(), 0.5) for s in probe.sites])
        stats = probe.sparse_pass(CETTRule(eps))
        with torch.no_grad(), apply_rule(model, CETTRule(eps)):
            logits = model(input_ids=x, use_cache=False).logits
        with torch.no_grad(), read_activations(model, lambda s, a: None):
            dense = model(input_ids=x, use_cache=False).logits
        parts = _capture(model, x, mask, compact=True)  # per expert: truncated sums and counts at two thresholds
        tails = {s.index: [cett.truncated_statistics(er, s.weight_t().detach(), s.column_norms(),
                                                     torch.stack([eps[s.index] * 0.5, eps[s.index]]))
                           for er in parts[s.index][0]] for s in sites if s.moe is not None}
        return probe.layer_cett(eps), stats, logits, dense, tails

    cett_0, stats_0, logits_0, dense_0, tails_0 = answers()
    padded = []
    for multiple in (5, 16):
        monkeypatch.setattr(cett, "gemm_rows", lambda n, device, m=multiple: -(-n // m) * m + m)  # always some rows

        def spy(t, _pad=cett.pad_rows):
            out = _pad(t)
            padded.append(out.shape[0] - t.shape[0])
            return out

        monkeypatch.setattr(cett, "pad_rows", spy)
        monkeypatch.setattr(su.moe, "pad_rows", spy)
        cett_p, stats_p, logits_p, dense_p, tails_p = answers()
        torch.testing.assert_close(cett_p, cett_0, atol=1e-6, rtol=0)
        for i, per_batch in tails_0.items():
            for (norms_0, kept_0), (norms_p, kept_p) in zip(per_batch, tails_p[i]):
                assert torch.equal(kept_p, kept_0)  # zero rows: never activated, wherever they are added
                torch.testing.assert_close(norms_p, norms_0, atol=1e-6, rtol=1e-6)
        assert torch.equal(stats_p.layer_active, stats_0.layer_active)
        assert torch.equal(stats_p.layer_active_ran, stats_0.layer_active_ran)
        torch.testing.assert_close(logits_p, logits_0, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dense_p, dense_0, atol=1e-5, rtol=1e-5)
    assert padded and min(padded) > 0  # the padded paths ran
