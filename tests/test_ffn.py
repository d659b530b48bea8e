"""FFN access for every architecture family (issue 2, item 4).

Each family is a tiny random model built from its transformers config class (hidden 24,
2 layers, d_ff 37; see ``build_tiny_family`` in conftest). The activation vector ``a`` seen
by :func:`read_activations` is checked against a manual float64 recomputation from the
FFN input, captured by the test's own hook, with the family's formula written out here
(not through the model's modules): ``a = act(W_gate x) * (W_up x)`` or ``a = act(W_in x)``.
"""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    GATED_FAMILIES,
    TINY_D_FF,
    TINY_FAMILIES,
    TINY_FAMILY_VOCAB,
)
from torch import nn

import sparsing_utils.ffn as ffn_module
from sparsing_utils.ffn import (
    FFN_REGISTRY,
    REMOTE_CODE_MODEL_TYPES,
    count_hooks,
    edit_activations,
    find_ffn_sites,
    read_activations,
)
from sparsing_utils.rules import DenseRule, apply_rule

# family -> (path of the decoder layer list, path inside a layer of the module whose *input*
# is the FFN input x, path of W_down inside a layer)
LAYOUT = {
    "llama": ("model.layers", "mlp", "mlp.down_proj"),
    "mistral": ("model.layers", "mlp", "mlp.down_proj"),
    "qwen2": ("model.layers", "mlp", "mlp.down_proj"),
    "gemma": ("model.layers", "mlp", "mlp.down_proj"),
    "phi3": ("model.layers", "mlp", "mlp.down_proj"),
    "gpt2": ("transformer.h", "mlp", "mlp.c_proj"),
    "opt": ("model.decoder.layers", "fc1", "fc2"),
    "gpt_neox": ("gpt_neox.layers", "mlp", "mlp.dense_4h_to_h"),
}


def _silu(x):
    return x / (1 + torch.exp(-x))


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _gelu_erf(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _w(module):
    return module.weight.detach().double()


def _b(module):
    return module.bias.detach().double() if getattr(module, "bias", None) is not None else 0.0


def manual_ffn(family: str, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, gate)`` from the FFN input ``x`` in float64; ``gate = act(W_gate x)`` (gated) or ``a``.

    OPT flattens the tokens before its FFN (``x`` is ``[batch*seq, d]``); callers reshape."""
    x = x.double()
    if family in ("llama", "mistral", "qwen2", "gemma"):
        act = _gelu_tanh if family == "gemma" else _silu
        gate = act(x @ _w(layer.mlp.gate_proj).T)
        return gate * (x @ _w(layer.mlp.up_proj).T), gate
    if family == "phi3":
        gate_pre, up = (x @ _w(layer.mlp.gate_up_proj).T).chunk(2, dim=-1)  # gate first, then up
        gate = _silu(gate_pre)
        return gate * up, gate
    if family == "gpt2":  # Conv1D: y = x @ W + b, W [in, out]
        a = _gelu_tanh(x @ _w(layer.mlp.c_fc) + _b(layer.mlp.c_fc))
        return a, a
    if family == "opt":
        a = torch.relu(x @ _w(layer.fc1).T + _b(layer.fc1))
        return a, a
    if family == "gpt_neox":
        a = _gelu_erf(x @ _w(layer.mlp.dense_h_to_4h).T + _b(layer.mlp.dense_h_to_4h))
        return a, a
    raise KeyError(family)


def w_down_columns(family: str, module: nn.Module) -> torch.Tensor:
    """``W_down`` as ``[d_model, d_ff]`` (column i = neuron i's output direction), float64."""
    w = _w(module)
    return w.T if family == "gpt2" else w  # Conv1D stores [d_ff, d_model]


def layers_of(model, family):
    return model.get_submodule(LAYOUT[family][0])


def capture_ffn_inputs(model, family):
    """Register the test's own pre-hooks that store each layer's FFN input; returns (store, handles)."""
    store, handles = {}, []
    for i, layer in enumerate(layers_of(model, family)):
        mod = layer.get_submodule(LAYOUT[family][1])
        handles.append(mod.register_forward_pre_hook(lambda m, args, _i=i: store.__setitem__(_i, args[0].detach())))
    return store, handles


def ids(batch=2, seq=11, seed=0):
    return torch.randint(0, TINY_FAMILY_VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


# ---------------------------------------------------------------------------------------


def test_every_family_is_registered():
    for family in TINY_FAMILIES:
        assert family in FFN_REGISTRY


def test_sites_found_for_every_layer(tiny_family):
    family, model = tiny_family
    sites = find_ffn_sites(model)
    layers = layers_of(model, family)
    assert len(sites) == len(layers) == 2
    for i, site in enumerate(sites):
        assert site.index == i
        assert site.module is layers[i].get_submodule(LAYOUT[family][2])
        assert model.get_submodule(site.name) is site.module
        assert site.d_ff == TINY_D_FF and site.d_model == 24
        assert site.gated == (family in GATED_FAMILIES)
        if site.gated:
            assert site.act_module is not None


def test_read_activations_equals_manual_ffn(tiny_family):
    family, model = tiny_family
    seen = {}
    store, handles = capture_ffn_inputs(model, family)
    try:
        with read_activations(model, lambda site, a, y: seen.__setitem__(site.index, (a.clone(), y.clone())),
                              with_output=True) as sites:
            logits(model, ids())
    finally:
        for h in handles:
            h.remove()
    layers = layers_of(model, family)
    assert sorted(seen) == [0, 1]
    for site in sites:
        a, y = seen[site.index]
        assert a.shape == (2, 11, TINY_D_FF) and y.shape == (2, 11, 24)
        a_ref, _ = manual_ffn(family, layers[site.index], store[site.index])
        a_ref = a_ref.reshape(2, 11, TINY_D_FF)  # OPT's FFN input is [batch*seq, d]
        assert a_ref.abs().max() > 0.05  # a non-trivial activation vector
        torch.testing.assert_close(a.double(), a_ref, atol=2e-5, rtol=1e-4)
        # y = W_down a, without the bias of the output projection
        y_ref = a_ref @ w_down_columns(family, site.module).T
        torch.testing.assert_close(y.double(), y_ref, atol=2e-5, rtol=1e-4)


def test_read_without_output_passes_only_a(tiny_family):
    _, model = tiny_family
    calls = []
    with read_activations(model, lambda *args: calls.append(len(args))):
        logits(model, ids())
    assert calls == [2, 2]


def test_column_norms_brute_force(tiny_family):
    family, model = tiny_family
    for site in find_ffn_sites(model):
        w = w_down_columns(family, site.module)  # [d_model, d_ff]
        brute = torch.tensor([math.sqrt(sum(float(v) ** 2 for v in w[:, i])) for i in range(w.shape[1])],
                             dtype=torch.float64)
        norms = site.column_norms()
        assert norms.dtype == torch.float32 and norms.shape == (TINY_D_FF,)
        torch.testing.assert_close(norms.double(), brute, rtol=1e-6, atol=0)
        # weight_t() is [d_ff, d_model] with y = a @ weight_t()
        torch.testing.assert_close(site.weight_t().detach().double(), w.T)


def test_edit_zeroing_equals_zeroing_w_down(tiny_family):
    family, model = tiny_family
    dropped = [0, 5, 17, 36]
    x = ids()
    base = logits(model, x)

    def zero(site, a, gate):
        a = a.clone()
        a[..., dropped] = 0
        return a

    with edit_activations(model, zero):
        edited = logits(model, x)
    by_hand = copy.deepcopy(model)
    with torch.no_grad():
        for i, layer in enumerate(layers_of(by_hand, family)):
            down = layer.get_submodule(LAYOUT[family][2])
            if family == "gpt2":
                down.weight[dropped, :] = 0  # Conv1D: rows are neurons
            else:
                down.weight[:, dropped] = 0
    reference = logits(by_hand, x)
    assert (edited - base).abs().max() > 1e-3, "zeroing 4 neurons must change the logits"
    torch.testing.assert_close(edited, reference, atol=1e-5, rtol=1e-5)
    assert count_hooks(model) == 0


def test_edit_returning_none_keeps_logits(tiny_family):
    _, model = tiny_family
    x = ids()
    base = logits(model, x)
    with edit_activations(model, lambda site, a, gate: None, need_gate=True):
        same = logits(model, x)
    assert torch.equal(base, same)


def test_gate_capture(tiny_family):
    family, model = tiny_family
    seen = {}
    store, handles = capture_ffn_inputs(model, family)

    def grab(site, a, gate):
        seen[site.index] = (a.clone(), None if gate is None else gate.clone())

    try:
        with edit_activations(model, grab, need_gate=True):
            logits(model, ids())
        with edit_activations(model, lambda s, a, g: seen.__setitem__(("nogate", s.index), g)):
            logits(model, ids())
    finally:
        for h in handles:
            h.remove()
    layers = layers_of(model, family)
    for i in range(2):
        a, gate = seen[i]
        assert gate is not None and gate.shape == a.shape
        _, gate_ref = manual_ffn(family, layers[i], store[i])
        assert a.shape == (2, 11, TINY_D_FF)
        gate_ref = gate_ref.reshape(a.shape)
        torch.testing.assert_close(gate.double(), gate_ref, atol=2e-5, rtol=1e-4)
        if family in GATED_FAMILIES:
            assert not torch.allclose(gate, a), "a gated FFN's gate differs from a"
        else:
            assert torch.equal(gate, a), "a plain FFN's gate is a itself"
        assert seen[("nogate", i)] is None  # no gate unless asked for


def test_structural_fallback_for_unregistered_model_type(tiny_llama, monkeypatch):
    """A Llama-shaped model whose model_type is unknown is found by the structural search."""
    monkeypatch.setattr(tiny_llama.config, "model_type", "my_new_llama", raising=False)
    assert tiny_llama.config.model_type not in FFN_REGISTRY
    sites = find_ffn_sites(tiny_llama)
    assert [s.name for s in sites] == [f"model.layers.{i}.mlp.down_proj" for i in range(3)]
    assert all(s.gated and s.act_module is tiny_llama.model.layers[s.index].mlp.act_fn for s in sites)


class _NoFFN(nn.Module):
    def __init__(self, model_type):
        super().__init__()
        self.config = SimpleNamespace(model_type=model_type)
        self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])  # no FFN anywhere
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([nn.Sequential(nn.Linear(8, 8))])

    def forward(self, x):
        return x


def test_unknown_model_error_names_what_was_searched():
    with pytest.raises(ValueError) as err:
        find_ffn_sites(_NoFFN("mystery_lm"))
    msg = str(err.value)
    assert "no FFN found in _NoFFN" in msg and "'mystery_lm'" in msg
    for searched in ("model.layers", "transformer.h", "gpt_neox.layers", "mlp.down_proj", "mlp.c_proj", "fc2",
                     "mlp.dense_4h_to_h", "FFN_REGISTRY"):
        assert searched in msg
    # a registered model_type whose modules are not where the registry says is named too
    with pytest.raises(ValueError, match=r"registry entry for 'llama': model\.layers\[i\]\.mlp\.down_proj"):
        find_ffn_sites(_NoFFN("llama"))
    # no config at all
    with pytest.raises(ValueError, match=r"model_type=None"):
        find_ffn_sites(nn.Sequential(nn.Linear(3, 3)))


def test_hooks_removed_after_context_and_exceptions(tiny_family):
    family, model = tiny_family
    x = ids()
    assert count_hooks(model) == 0
    # one hook on each output projection and one on each layer (its [batch, seq] shape),
    # plus one on each activation module for gate-ranked edits of gated FFNs
    with read_activations(model, lambda s, a: None):
        assert count_hooks(model) == 4
    assert count_hooks(model) == 0
    with edit_activations(model, lambda s, a, g: None, need_gate=True):
        assert count_hooks(model) == (6 if family in GATED_FAMILIES else 4)
    assert count_hooks(model) == 0

    # an exception raised inside the with-block
    for ctx in (lambda: read_activations(model, lambda s, a, y: None, with_output=True),
                lambda: edit_activations(model, lambda s, a, g: None, need_gate=True),
                lambda: apply_rule(model, DenseRule())):
        with pytest.raises(RuntimeError, match="inside the block"), ctx():
            assert count_hooks(model) > 0
            raise RuntimeError("inside the block")
        assert count_hooks(model) == 0

    # an exception raised inside a hook callback, during the forward
    def boom(*args):
        raise KeyError("from the hook")

    for ctx in (lambda: read_activations(model, boom), lambda: read_activations(model, boom, with_output=True),
                lambda: edit_activations(model, boom), lambda: edit_activations(model, boom, need_gate=True)):
        with pytest.raises(KeyError, match="from the hook"), ctx():
            logits(model, x)
        assert count_hooks(model) == 0
    # and the model still runs cleanly afterwards
    assert torch.isfinite(logits(model, x)).all()


def test_explicit_sites_subset(tiny_llama):
    """Hooks only on the sites passed (e.g. one layer)."""
    sites = find_ffn_sites(tiny_llama)
    seen = []
    with read_activations(tiny_llama, lambda s, a: seen.append(s.index), sites=sites[1:2]):
        assert count_hooks(tiny_llama) == 2
        logits(tiny_llama, torch.randint(0, 101, (1, 5)))
    assert seen == [1]


# -- the registry, entry by entry -------------------------------------------------------------

TRANSFORMERS_MODEL_TYPES = sorted(set(FFN_REGISTRY) - REMOTE_CODE_MODEL_TYPES)
# Tiny sizes under every config's own names (configs that do not know a name ignore it).
TINY_CONFIG = {"hidden_size": 24, "num_hidden_layers": 2, "intermediate_size": TINY_D_FF, "ffn_dim": TINY_D_FF,
               "n_inner": TINY_D_FF, "ffn_hidden_size": TINY_D_FF, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": TINY_FAMILY_VOCAB, "max_position_embeddings": 64,
               "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
# ... and what some families need on top for attention to fit these sizes (head_dim 6)
TINY_CONFIG_EXTRA = {"gptj": {"rotary_dim": 4}, "phi": {"partial_rotary_factor": 1.0}, "helium": {"head_dim": 6},
                     "minicpm3": {"num_key_value_heads": 4}}


def test_registry_names_only_real_model_types():
    """Every entry is a model type of transformers, or one of the named remote-code types."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    for model_type in FFN_REGISTRY:
        assert (model_type in CONFIG_MAPPING_NAMES) != (model_type in REMOTE_CODE_MODEL_TYPES), model_type


def _check_registry_sites(model, model_type, batch=2, seq=7):
    """find_ffn_sites through the registry entry alone: the module at the entry's path, its
    input is a (y = W_down a), and for gated FFNs the gate hook sees act(W_gate x) [.., d_ff]."""
    family = FFN_REGISTRY[model_type]
    sites = find_ffn_sites(model)
    layers = model.get_submodule(family.layers)
    assert len(sites) == len(layers) == 2
    for i, site in enumerate(sites):
        assert site.module is layers[i].get_submodule(family.down)
        assert site.name == f"{family.layers}.{i}.{family.down}" and site.layer is layers[i]
        assert site.gated == family.gated and site.d_model == 24
        if family.gated:
            assert site.act_module is layers[i].get_submodule(family.act)
    x = torch.randint(0, TINY_FAMILY_VOCAB, (batch, seq), generator=torch.Generator().manual_seed(0))
    seen = {}
    # clones: some models add to the FFN output in place afterwards (Falcon: mlp_output += attention_output)
    with read_activations(model, lambda site, a, y: seen.__setitem__(site.index, (a.clone(), y.clone())),
                          with_output=True):
        logits(model, x)
    gates = {}
    with edit_activations(model, lambda site, a, gate: gates.__setitem__(site.index, (a.clone(), gate.clone())),
                          need_gate=True):
        logits(model, x)
    for site in sites:
        a, y = seen[site.index]
        assert a.shape == (batch, seq, site.d_ff) and y.shape == (batch, seq, 24)
        torch.testing.assert_close(y, a @ site.weight_t().detach(), atol=1e-5, rtol=1e-4)
        a2, gate = gates[site.index]
        assert gate is not None and gate.shape == a2.shape
        if site.gated:
            assert not torch.equal(gate, a2)  # act(W_gate x), not a itself
    return sites


@pytest.mark.parametrize("model_type", TRANSFORMERS_MODEL_TYPES)
def test_registry_entry_on_its_transformers_model(model_type, monkeypatch):
    """A tiny random model of each registered model type, built from its transformers config
    class; the structural fallback is switched off, so only the registry entry can find it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    monkeypatch.setattr(ffn_module, "_LAYER_PATHS", ())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**TINY_CONFIG, **TINY_CONFIG_EXTRA.get(model_type, {})})).float().eval()
    assert model.config.model_type == model_type
    sites = _check_registry_sites(model, model_type)
    widths = {s.d_ff for s in sites}
    assert widths == ({96} if model_type == "bloom" else {TINY_D_FF})  # BLOOM fixes d_ff = 4 d_model


# Remote-code model types (no transformers class): a hand-built module with the official
# layout, names as in the model's own modeling file on the hub:
# model_type -> (FFN attribute of a decoder layer, gate, up, down, activation)
REMOTE_LAYOUTS = {
    "minicpm": ("mlp", "gate_proj", "up_proj", "down_proj", "act_fn"),  # modeling_minicpm.py, MiniCPMMLP
    "baichuan": ("mlp", "gate_proj", "up_proj", "down_proj", "act_fn"),  # modeling_baichuan.py, MLP
    "internlm2": ("feed_forward", "w1", "w3", "w2", "act_fn"),  # modeling_internlm2.py, InternLM2MLP
}


class _GatedMLP(nn.Module):
    def __init__(self, gate, up, down, act):
        super().__init__()
        self.names = (gate, up, down, act)
        setattr(self, gate, nn.Linear(24, TINY_D_FF, bias=False))
        setattr(self, up, nn.Linear(24, TINY_D_FF, bias=False))
        setattr(self, down, nn.Linear(TINY_D_FF, 24, bias=False))
        setattr(self, act, nn.SiLU())

    def forward(self, x):
        gate, up, down, act = (getattr(self, n) for n in self.names)
        return down(act(gate(x)) * up(x))


class _Layer(nn.Module):
    def __init__(self, ffn_name, *names):
        super().__init__()
        self.ffn_name = ffn_name
        setattr(self, ffn_name, _GatedMLP(*names))

    def forward(self, hidden_states):
        return hidden_states + getattr(self, self.ffn_name)(hidden_states)


class _RemoteCodeLM(nn.Module):
    """``model.embed_tokens``, ``model.layers[i].<ffn>``, ``lm_head``: the official skeleton
    without attention (irrelevant to where the FFN sits)."""

    def __init__(self, model_type):
        super().__init__()
        self.config = SimpleNamespace(model_type=model_type)
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(TINY_FAMILY_VOCAB, 24)
        self.model.layers = nn.ModuleList([_Layer(*REMOTE_LAYOUTS[model_type]) for _ in range(2)])
        self.lm_head = nn.Linear(24, TINY_FAMILY_VOCAB, bias=False)

    def forward(self, input_ids, **kwargs):
        h = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            h = layer(h)
        return SimpleNamespace(logits=self.lm_head(h))


@pytest.mark.parametrize("model_type", sorted(REMOTE_CODE_MODEL_TYPES))
def test_registry_entry_on_remote_code_layout(model_type, monkeypatch):
    assert set(REMOTE_LAYOUTS) == REMOTE_CODE_MODEL_TYPES
    monkeypatch.setattr(ffn_module, "_LAYER_PATHS", ())
    torch.manual_seed(0)
    model = _RemoteCodeLM(model_type).eval()
    sites = _check_registry_sites(model, model_type)
    ffn, gate, up, down, act = REMOTE_LAYOUTS[model_type]
    x = torch.randint(0, TINY_FAMILY_VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    store, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        handles.append(getattr(layer, ffn).register_forward_pre_hook(
            lambda m, args, _i=i: store.__setitem__(_i, args[0].detach().double())))
    seen = {}
    try:
        with read_activations(model, lambda site, a: seen.__setitem__(site.index, a)):
            logits(model, x)
    finally:
        for h in handles:
            h.remove()
    for site in sites:
        mlp = getattr(model.model.layers[site.index], ffn)
        xin = store[site.index]
        a_ref = _silu(xin @ _w(getattr(mlp, gate)).T) * (xin @ _w(getattr(mlp, up)).T)
        torch.testing.assert_close(seen[site.index].double(), a_ref, atol=1e-6, rtol=1e-5)
        assert site.module is getattr(mlp, down) and site.act_module is getattr(mlp, act)
