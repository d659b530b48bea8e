"""Find every layer's FFN and read or edit its activation vector ``a``.

The paper (Luo et al. 2024, Sec. 3.1, and PAPER.md Sec. 1) defines a neuron's output as
``n_i = a_i * W_down[:, i]``, where ``a`` is the input of the FFN's *last* linear map:
``a = act(W_gate x) * (W_up x)`` for gated FFNs (Llama, Mistral, Qwen2, Gemma, Phi-3,
MiniCPM, SmolLM2) and ``a = act(W_in x)`` for plain ones (GPT-2, OPT, GPT-NeoX). One
forward pre-hook on that output projection therefore reads and edits ``a`` for every
architecture. The gated models' Top-k and FAT baselines rank neurons by the gate
activation ``act(W_gate x)``, which a forward hook on the activation module provides.

Mixture-of-Experts layers (:mod:`sparsing_utils.moe`) are one site each: ``a`` is the virtual
activation vector of all experts of the layer, routing weights folded in, and ``W_down`` their
concatenated output projections; inside the context managers the MoE block runs through
:meth:`~sparsing_utils.moe.MoELayer.forward`, which shows that vector (full width, or with
``compact=True`` each expert's rows only, :class:`~sparsing_utils.moe.ExpertRows`).

Hooks exist only inside the context managers below and are removed in ``finally``.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .moe import MoELayer, find_moe

__all__ = [
    "FFN_REGISTRY",
    "REMOTE_CODE_MODEL_TYPES",
    "FFNSite",
    "count_hooks",
    "edit_activations",
    "find_ffn_sites",
    "read_activations",
]


@dataclass(frozen=True)
class _Family:
    layers: str  # dotted path from the model to the ModuleList of decoder layers
    down: str  # dotted path from a layer to the FFN output projection (input = a)
    act: str | None  # dotted path from a layer to the activation module act(W_gate x)
    gated: bool


# model_type -> where the FFN lives; tests/test_ffn.py checks every entry against a tiny model
# of its transformers config class (or, for remote code, a module laid out as the official code).
# The structural fallback in ``find_ffn_sites`` covers families missing here that follow the same shapes.
_LLAMA_LIKE = _Family("model.layers", "mlp.down_proj", "mlp.act_fn", True)  # gate_proj, up_proj, act_fn
_FUSED_GATE_UP = _Family("model.layers", "mlp.down_proj", "mlp.activation_fn", True)  # gate_up_proj
FFN_REGISTRY: dict[str, _Family] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2",
                     "granite", "cohere", "stablelm", "smollm3", "helium", "minicpm3"), _LLAMA_LIKE),
    **dict.fromkeys(("phi3", "glm", "glm4"), _FUSED_GATE_UP),
    "gpt2": _Family("transformer.h", "mlp.c_proj", "mlp.act", False),
    "gpt_bigcode": _Family("transformer.h", "mlp.c_proj", "mlp.act", False),
    "opt": _Family("model.decoder.layers", "fc2", "activation_fn", False),
    "gpt_neox": _Family("gpt_neox.layers", "mlp.dense_4h_to_h", "mlp.act", False),
    "phi": _Family("model.layers", "mlp.fc2", "mlp.activation_fn", False),
    "falcon": _Family("transformer.h", "mlp.dense_4h_to_h", "mlp.act", False),
    "gptj": _Family("transformer.h", "mlp.fc_out", "mlp.act", False),
    "bloom": _Family("transformer.h", "mlp.dense_4h_to_h", None, False),
    # Model types that exist only as remote code on the hub (load with trust_remote_code=True):
    "minicpm": _LLAMA_LIKE,  # openbmb/MiniCPM-*, modeling_minicpm.py
    "baichuan": _LLAMA_LIKE,  # baichuan-inc/Baichuan2-*, modeling_baichuan.py
    "internlm2": _Family("model.layers", "feed_forward.w2", "feed_forward.act_fn", True),  # w1 gate, w3 up
}
# The registry's model types that transformers does not define (tested on hand-built layouts).
REMOTE_CODE_MODEL_TYPES = frozenset({"minicpm", "baichuan", "internlm2"})

# Where the structural fallback looks for the decoder layers and the output projection.
_LAYER_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers",
                "transformer.layers", "transformer.blocks", "layers", "h", "decoder.layers")
_DOWN_NAMES = ("mlp.down_proj", "mlp.c_proj", "fc2", "mlp.fc2", "mlp.dense_4h_to_h",
               "mlp.fc_out", "feed_forward.w2", "mlp.w2", "ffn.down_proj", "mlp.out_proj")
_ACT_NAMES = ("mlp.act_fn", "mlp.act", "mlp.activation_fn", "activation_fn", "feed_forward.act_fn")


def _get(root: nn.Module, path: str) -> nn.Module | None:
    obj: object = root
    for part in path.split("."):
        if not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj if isinstance(obj, nn.Module) else None


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D: weight [in, out], y = x @ W + b.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _in_out(module: nn.Module) -> tuple[int, int] | None:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if _is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return None


@dataclass(frozen=True, eq=False)
class FFNSite:
    """One layer's FFN: its output projection (whose input is ``a``) and activation module.

    For an MoE layer, ``moe`` describes the block (``module`` is the block itself), ``d_ff`` is
    ``E * d_expert + d_shared`` and ``W_down`` the experts' concatenated output projections."""

    index: int
    name: str  # qualified name of the output projection inside the model (MoE: of the block)
    module: nn.Module  # nn.Linear(d_ff -> d_model) or GPT-2 Conv1D (MoE: the block)
    act_module: nn.Module | None  # gate activation act(W_gate x) (gated FFNs only)
    gated: bool
    d_ff: int
    d_model: int
    # The decoder layer holding the FFN: its input's shape restores [batch, seq] for
    # architectures that flatten the tokens before the FFN (OPT feeds fc2 [batch*seq, d_ff]).
    layer: nn.Module | None = field(default=None, repr=False)
    moe: MoELayer | None = field(default=None, repr=False)

    def weight_t(self) -> torch.Tensor:
        """``W_down`` transposed, ``[d_ff, d_model]``, so that ``y = a @ weight_t()``."""
        if self.moe is not None:
            return self.moe.weight_t()
        w = self.module.weight
        return w if _is_conv1d(self.module) else w.t()

    def column_norms(self) -> torch.Tensor:
        """``||W_down[:, i]||_2`` for each neuron, float32 ``[d_ff]`` (PAPER.md Sec. 1)."""
        return self.weight_t().detach().float().pow(2).sum(dim=1).sqrt()  # = norm(dim=1): see cett.l2_norm

    @property
    def expert_blocks(self) -> tuple[int, int] | None:
        """MoE layers: ``(E, d_expert)``, the expert blocks at the front of ``a`` (zero on the tokens
        their expert did not run on), for :func:`~sparsing_utils.cett.truncated_statistics`; else None."""
        return None if self.moe is None else (self.moe.num_experts, self.moe.d_expert)

    def ran_neurons(self, keep: torch.Tensor) -> torch.Tensor:  # keep [batch, seq, ...] -> [batch, seq] float32
        """Neurons that ran on each token of the forward whose mask ``keep`` is: for an MoE layer those
        of the experts routed to the token plus shared ones (:meth:`MoELayer.ran_neurons`), else all
        ``d_ff``. The denominator of the MoE models' ``activation_ratio_ran`` (README, MoE models).
        Only the leading ``[batch, seq]`` of ``keep`` is read (any ``[batch, seq, ...]`` tensor of that forward)."""
        if self.moe is not None:
            return self.moe.ran_neurons()
        return keep.new_full(keep.shape[:-1], self.d_ff, dtype=torch.float32)


def find_ffn_sites(model: nn.Module) -> list[FFNSite]:
    """Locate every decoder layer's FFN output projection (or MoE block: :func:`~sparsing_utils.moe.find_moe`).

    Looks up ``config.model_type`` in :data:`FFN_REGISTRY`; otherwise searches the usual
    layer containers and projection names and checks shapes (input = ``d_ff``, output =
    hidden size). An unknown model gets a ``ValueError`` naming everything searched.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    family = FFN_REGISTRY.get(model_type) if model_type else None
    tried: list[str] = []
    if family is not None:
        layers = _get(model, family.layers)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            sites = _sites_from(layers, family.layers, (family.down,), (family.act,) if family.act else (),
                                family.gated)
            if sites:
                return sites
        tried.append(f"registry entry for {model_type!r}: {family.layers}[i].{family.down}")
    for path in _LAYER_PATHS:
        layers = _get(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            gated = _looks_gated(layers[0])
            sites = _sites_from(layers, path, _DOWN_NAMES, _ACT_NAMES, gated)
            if sites:
                return sites
    tried.append("layer containers " + ", ".join(_LAYER_PATHS))
    tried.append("output projections " + ", ".join(_DOWN_NAMES))
    raise ValueError(
        f"no FFN found in {type(model).__name__} (model_type={model_type!r}). Searched: "
        + "; ".join(tried)
        + ". Add an entry to sparsing_utils.ffn.FFN_REGISTRY naming the layer list and the "
        "FFN's last linear map (its input is the activation vector a)."
    )


def _looks_gated(layer: nn.Module) -> bool:
    names = {name.rsplit(".", 1)[-1] for name, _ in layer.named_modules()}
    return "gate_proj" in names or "gate_up_proj" in names or {"w1", "w3"} <= names


def _sites_from(layers: nn.ModuleList, path: str, down_names: Sequence[str], act_names: Sequence[str],
                gated: bool) -> list[FFNSite]:
    sites = []
    act_seen: set[int] = set()
    for i, layer in enumerate(layers):
        moe = find_moe(layer, f"{path}.{i}")
        if moe is not None:
            sites.append(FFNSite(i, moe.name, moe.block, None, True, moe.d_ff, moe.d_model, layer, moe))
            continue
        found = None
        for down in down_names:
            module = _get(layer, down)
            shape = _in_out(module) if module is not None else None
            if shape is not None:
                found = (down, module, shape)
                break
        if found is None:
            return []
        down, module, (d_ff, d_model) = found
        act = None
        if gated:
            for name in act_names:
                candidate = _get(layer, name)
                if candidate is not None and id(candidate) not in act_seen:
                    act = candidate
                    act_seen.add(id(candidate))
                    break
        sites.append(FFNSite(i, f"{path}.{i}.{down}", module, act, gated, d_ff, d_model, layer))
    return sites


# ---------------------------------------------------------------------------------------
# Context managers. The callbacks receive the FFN site and tensors shaped [batch, seq, d_ff]
# (also for architectures that run the FFN on flattened [batch*seq, d] tokens, e.g. OPT).
# ---------------------------------------------------------------------------------------

EditFn = Callable[[FFNSite, torch.Tensor, "torch.Tensor | None"], "torch.Tensor | None"]


def _bias(module: nn.Module) -> torch.Tensor | None:
    return getattr(module, "bias", None)


def _track_token_shapes(sites: Sequence[FFNSite], shapes: dict[int, torch.Size], handles: list) -> None:
    """Record each layer's ``[batch, seq]`` (from its hidden-states input) in ``shapes``."""
    for site in sites:
        if site.layer is None or site.moe is not None:  # an MoE block's forward sees [batch, seq, d] itself
            continue

        def layer_hook(module, args, kwargs, _site=site):
            h = args[0] if args else kwargs.get("hidden_states")
            if isinstance(h, torch.Tensor) and h.dim() >= 3:
                shapes[_site.index] = h.shape[:-1]
        handles.append(site.layer.register_forward_pre_hook(layer_hook, with_kwargs=True))


def _unflatten(t: torch.Tensor | None, lead: torch.Size | None) -> torch.Tensor | None:
    """``[batch*seq, d]`` -> ``[batch, seq, d]`` when the FFN ran on flattened tokens."""
    if t is None or t.dim() != 2 or lead is None or math.prod(lead) != t.shape[0]:
        return t
    return t.view(*lead, t.shape[-1])


@contextlib.contextmanager
def read_activations(model: nn.Module, fn: Callable[..., None], *, sites: Sequence[FFNSite] | None = None,
                     with_output: bool = False, compact: bool = False) -> Iterator[list[FFNSite]]:
    """Call ``fn(site, a)`` (or ``fn(site, a, y)`` with ``with_output``) on every forward.

    ``a`` is the FFN activation vector ``[batch, seq, d_ff]``; ``y = W_down a`` is the FFN
    output without its bias ``[batch, seq, d_model]`` (the sum of the neuron outputs, the
    denominator of CETT, Eq. 2). One forward hook per layer, removed on exit. With ``compact``,
    an MoE layer's ``a`` comes as :class:`~sparsing_utils.moe.ExpertRows` (each expert's rows of
    the tokens routed to it, never the full ``E * d_expert`` width); dense layers are unchanged.
    """
    sites = list(sites) if sites is not None else find_ffn_sites(model)
    handles: list = []
    shapes: dict[int, torch.Size] = {}
    try:
        _track_token_shapes(sites, shapes, handles)
        for site in sites:
            if site.moe is not None:
                def moe_read(a, y, _site=site):
                    fn(_site, a, y) if with_output else fn(_site, a)
                handles.append(_entered(site.moe.visiting(read=moe_read, compact=compact)))
                continue
            if with_output:
                def hook(module, args, output, _site=site):
                    bias = _bias(module)
                    y = output - bias if bias is not None else output
                    lead = shapes.get(_site.index)
                    fn(_site, _unflatten(args[0], lead), _unflatten(y, lead))
            else:
                def hook(module, args, output, _site=site):
                    fn(_site, _unflatten(args[0], shapes.get(_site.index)))
            handles.append(site.module.register_forward_hook(hook))
        yield sites
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def edit_activations(model: nn.Module, fn: EditFn, *, sites: Sequence[FFNSite] | None = None,
                     need_gate: bool = False, compact: bool = False) -> Iterator[list[FFNSite]]:
    """Replace ``a`` by ``fn(site, a, gate)`` on every forward (``None`` keeps ``a``).

    ``gate`` is ``act(W_gate x)`` for gated FFNs when ``need_gate`` (captured by a forward
    hook on the activation module), and ``a`` itself for plain FFNs, whose activation
    vector *is* the gate. All hooks are removed on exit, also after an exception. With
    ``compact``, an MoE layer's ``a`` and ``gate`` come as :class:`~sparsing_utils.moe.ExpertRows`
    and ``fn`` returns one (new values, or a boolean one: the entries kept) or None.
    """
    sites = list(sites) if sites is not None else find_ffn_sites(model)
    if need_gate:
        missing = [s.name for s in sites if s.gated and s.act_module is None and s.moe is None]
        if missing:
            raise ValueError(
                f"a gate-ranked rule needs the activation module act(W_gate x), not found next to "
                f"{missing[0]} (and {len(missing) - 1} more); use a rule that scores by |a| instead"
            )
    gates: dict[int, torch.Tensor] = {}
    handles: list = []
    shapes: dict[int, torch.Size] = {}
    try:
        _track_token_shapes(sites, shapes, handles)
        for site in sites:
            if site.moe is not None:
                def moe_edit(a, gate, _site=site):
                    return fn(_site, a, gate)
                handles.append(_entered(site.moe.visiting(edit=moe_edit, need_gate=need_gate, compact=compact)))
                continue
            if need_gate and site.gated:
                def act_hook(module, args, output, _site=site):
                    gates[_site.index] = output
                handles.append(site.act_module.register_forward_hook(act_hook))

            def pre_hook(module, args, _site=site):
                lead = shapes.get(_site.index)
                a = _unflatten(args[0], lead)
                gate = (_unflatten(gates.pop(_site.index, None), lead) if _site.gated else a) if need_gate else None
                new = fn(_site, a, gate)
                if new is None:
                    return None
                return (new.reshape(args[0].shape),) + tuple(args[1:])
            handles.append(site.module.register_forward_pre_hook(pre_hook))
        yield sites
    finally:
        for handle in handles:
            handle.remove()
        gates.clear()
        shapes.clear()


class _entered:
    """A context manager entered now, with the ``remove()`` of a hook handle (exits it)."""

    def __init__(self, cm):
        self._cm = cm
        cm.__enter__()

    def remove(self) -> None:
        self._cm.__exit__(None, None, None)


def count_hooks(model: nn.Module) -> int:
    """Number of forward (pre-)hooks on all modules of ``model``, plus MoE blocks whose forward is
    replaced (0 for a clean model)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + ("forward" in m.__dict__)
               for m in model.modules())
