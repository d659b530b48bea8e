"""How each Mixture-of-Experts family stores its experts (issue 10): one row per layout.

:data:`EXPERT_KINDS` are the expert layouts a block may hold - fused 3-D weights (gpt-oss's
transposed, interleaved and biased variant included), an ``nn.ModuleList`` of expert MLPs, DBRX's
stacked 2-D weights, JetMoE's parallel experts - and :data:`MLP_LAYOUTS` the gated MLPs of shared and
module-list experts. Each row answers the same questions (is this block's expert container of my
kind, how many experts, how wide, and for expert ``e`` on its rows: ``a`` = the input of the output
projection, the gate score, and the output from ``a``), so :class:`~sparsing_utils.moe.MoELayer`
runs every family through one expert loop. :data:`GATE_SCORES` holds the gate scores of experts
without an ``act_fn`` (gpt-oss's clamped SwiGLU).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EXPERT_KINDS", "GATE_SCORES", "MLP_LAYOUTS"]

# -- gated MLPs (module-list experts, shared experts) ---------------------------------------------

@dataclass(frozen=True, eq=False)
class _GatedMLP:
    """One gated MLP ``y = W_down (act(W_gate x) * (W_up x))`` whatever its module names."""

    down: nn.Linear
    gate_up: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # x [n, d] -> (W_gate x, W_up x)
    act: nn.Module

    def activations(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, act(W_gate x))`` on ``x [n, d]``: ``[n, width]`` each, as the model's own MLP computes them."""
        pre, up = self.gate_up(x)
        g = self.act(pre)
        return g * up, g


def _separate(gate: str, up: str, down: str, act: Sequence[str]):
    def parts(mlp: nn.Module) -> _GatedMLP | None:
        mods = [getattr(mlp, n, None) for n in (gate, up, down)]
        a = next((getattr(mlp, n) for n in act if isinstance(getattr(mlp, n, None), nn.Module)), None)
        if a is None or not all(isinstance(m, nn.Linear) for m in mods):
            return None
        return _GatedMLP(mods[2], lambda x: (mods[0](x), mods[1](x)), a)
    return parts


def _fused_in(gate_up: str, down: str, act: str):
    def parts(mlp: nn.Module) -> _GatedMLP | None:
        gu, dn, a = (getattr(mlp, n, None) for n in (gate_up, down, act))
        if not (isinstance(gu, nn.Linear) and isinstance(dn, nn.Linear) and isinstance(a, nn.Module)
                and gu.out_features == 2 * dn.in_features):
            return None
        return _GatedMLP(dn, lambda x: gu(x).chunk(2, dim=-1), a)
    return parts


# The gated-MLP layouts: (what an error names, reader). Gate and up as two maps (Llama-like, DeepSeek's
# remote experts, InternLM2's w1/w3/w2), or one map whose output halves are gate and up (Granite-MoE-shared's
# shared_mlp: input_linear -> chunk(2) -> activation(first) * second -> output_linear).
MLP_LAYOUTS = (
    ("gate_proj/up_proj/down_proj with act_fn or act", _separate("gate_proj", "up_proj", "down_proj", ("act_fn", "act"))),
    ("w1/w3/w2 with act_fn or act", _separate("w1", "w3", "w2", ("act_fn", "act"))),
    ("input_linear (gate and up halves)/output_linear with activation", _fused_in("input_linear", "output_linear",
                                                                                  "activation")),
)


def _gated_mlp(mlp: nn.Module) -> _GatedMLP | None:
    """The parts of a gated MLP in one of :data:`MLP_LAYOUTS`, or None."""
    return next((p for _, read in MLP_LAYOUTS if (p := read(mlp)) is not None), None)


def _mlp_layouts() -> str:
    return " or ".join(name for name, _ in MLP_LAYOUTS)


# -- the expert layouts ----------------------------------------------------------------------------

def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """``x W^T (+ b)``, or ``x W (+ b)`` for weights stored transposed, as transformers' eager loops write it."""
    out = x @ w if transposed else F.linear(x, w)
    return out if b is None else out + b


def _gpt_oss_gate(experts: nn.Module, gate: torch.Tensor) -> torch.Tensor:
    """gpt-oss's gate score ``g sigmoid(alpha g)``, ``g = min(W_gate x + b, limit)`` (``GptOssExperts._apply_gate``
    without its ``(up + 1)`` factor): what the gate-ranked rules (Top-k, FAT) rank by."""
    g = gate.clamp(min=None, max=experts.limit)
    return g * torch.sigmoid(g * experts.alpha)


# Fused experts without act_fn: their gate score act(W_gate x), by class name.
GATE_SCORES = {"GptOssExperts": _gpt_oss_gate}


class _Fused:
    """transformers >= 5 ``@use_experts_implementation`` classes: ``gate_up_proj [E, 2 d_e, d]`` (gate rows
    first) and ``down_proj [E, d, d_e]``, or stored transposed (``[E, d, 2 d_e]``, ``[E, d_e, d]``), gate and
    up columns interleaved (``is_concatenated=False``: gate ``0::2``, up ``1::2``), with biases
    (``gate_up_proj_bias [E, 2 d_e]``, ``down_proj_bias [E, d]``); ``a = _apply_gate(gate_up)`` (default
    ``act_fn(gate) * up``; gpt-oss's clamped SwiGLU); run by an eager loop or by grouped_mm / batched_mm."""

    name = "fused 3-D expert weights"
    router_sees_batch = False  # transformers' blocks route the flattened tokens [tokens, d]

    @staticmethod
    def matches(experts: nn.Module) -> bool:
        return isinstance(getattr(experts, "down_proj", None), torch.Tensor)

    @staticmethod
    def problem(experts: nn.Module) -> str | None:
        gu, down = getattr(experts, "gate_up_proj", None), experts.down_proj
        t = bool(getattr(experts, "is_transposed", False))
        want = "gate_up_proj [E, d, 2*d_expert] and down_proj [E, d_expert, d]" if t else \
            "gate_up_proj [E, 2*d_expert, d] and down_proj [E, d, d_expert]"
        if not isinstance(gu, torch.Tensor) or gu.dim() != 3 or down.dim() != 3:
            return f"expected {want} (3-D)"
        flags = {"has_gate": True, "has_post_expert_norm": False}
        odd = [f"{k}={getattr(experts, k)}" for k, want_k in flags.items() if getattr(experts, k, want_k) != want_k]
        if odd:
            return "unsupported fused-expert layout " + ", ".join(odd) + " (non-gated experts, a norm after each expert)"
        e, d, de = _Fused._shape(experts)
        if gu.shape != ((e, d, 2 * de) if t else (e, 2 * de, d)):
            return f"gate_up_proj {tuple(gu.shape)} does not match down_proj {tuple(down.shape)}: expected {want}"
        if getattr(experts, "has_bias", False):
            bad = [n for n, shape in (("gate_up_proj_bias", (e, 2 * de)), ("down_proj_bias", (e, d)))
                   if not isinstance(getattr(experts, n, None), torch.Tensor) or getattr(experts, n).shape != shape]
            if bad:
                return f"has_bias=True but no {bad[0]} of shape " + str((e, 2 * de) if bad[0] == "gate_up_proj_bias" else (e, d))
        if not hasattr(experts, "act_fn") and type(experts).__name__ not in GATE_SCORES:
            return "no act_fn (and no gate score for it in moe.GATE_SCORES)"
        return None

    @staticmethod
    def _shape(experts: nn.Module) -> tuple[int, int, int]:  # (E, d_model, d_expert)
        e, p, q = experts.down_proj.shape
        return (e, q, p) if getattr(experts, "is_transposed", False) else (e, p, q)

    @staticmethod
    def sizes(experts: nn.Module) -> tuple[int, int, int]:  # (E, d_expert, d_model)
        e, d, de = _Fused._shape(experts)
        return e, de, d

    @staticmethod
    def _bias(experts: nn.Module, name: str, e: int) -> torch.Tensor | None:
        return getattr(experts, name)[e] if getattr(experts, "has_bias", False) else None

    @staticmethod
    def activations(experts: nn.Module, e: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, act(W_gate x))`` of expert ``e`` on its tokens ``x [n, d]``: ``[n, d_e]`` each."""
        t = bool(getattr(experts, "is_transposed", False))
        gate_up = _linear(x, experts.gate_up_proj[e], _Fused._bias(experts, "gate_up_proj_bias", e), t)  # [n, 2 d_e]
        interleaved = not getattr(experts, "is_concatenated", True)
        gate, up = (gate_up[..., ::2], gate_up[..., 1::2]) if interleaved else gate_up.chunk(2, dim=-1)
        score = GATE_SCORES.get(type(experts).__name__)
        g = score(experts, gate) if score is not None else experts.act_fn(gate)
        apply = getattr(experts, "_apply_gate", None)
        return (apply(gate_up) if apply is not None else experts.act_fn(gate) * up), g

    @staticmethod
    def down(experts: nn.Module, e: int, a: torch.Tensor) -> torch.Tensor:  # [n, d_e] -> [n, d], bias included
        return _linear(a, experts.down_proj[e], _Fused._bias(experts, "down_proj_bias", e),
                       bool(getattr(experts, "is_transposed", False)))

    @staticmethod
    def down_bias(experts: nn.Module) -> torch.Tensor | None:  # [E, d]
        return experts.down_proj_bias if getattr(experts, "has_bias", False) else None

    @staticmethod
    def down_t(experts: nn.Module) -> torch.Tensor:  # [E * d_e, d]
        e, d, de = _Fused._shape(experts)
        if getattr(experts, "is_transposed", False):
            return experts.down_proj.reshape(e * de, d)
        return experts.down_proj.transpose(1, 2).reshape(e * de, d)


class _ModuleList:
    """An ``nn.ModuleList`` of gated expert MLPs (:data:`MLP_LAYOUTS`): DeepSeek-V2/V3's remote code
    (``modeling_deepseek.py``), transformers 4.x."""

    name = "module list of expert MLPs"
    router_sees_batch = True  # DeepSeek's remote MoEGate unpacks [batch, seq, d]

    @staticmethod
    def matches(experts: nn.Module) -> bool:
        return isinstance(experts, nn.ModuleList)

    @staticmethod
    def problem(experts: nn.Module) -> str | None:
        if len(experts) == 0:
            return "empty expert list"
        bad = [i for i, mlp in enumerate(experts) if _gated_mlp(mlp) is None]
        if bad:
            return f"expert {bad[0]} is not a gated MLP: searched " + _mlp_layouts()
        if len({_gated_mlp(m).down.weight.shape for m in experts}) != 1:
            return "experts of different widths"
        if len({_gated_mlp(m).down.bias is None for m in experts}) != 1:
            return "some experts' output projections have a bias, some not"
        return None

    @staticmethod
    def sizes(experts: nn.Module) -> tuple[int, int, int]:
        d, de = _gated_mlp(experts[0]).down.weight.shape
        return len(experts), de, d

    @staticmethod
    def activations(experts: nn.Module, e: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _gated_mlp(experts[e]).activations(x)

    @staticmethod
    def down(experts: nn.Module, e: int, a: torch.Tensor) -> torch.Tensor:
        return _gated_mlp(experts[e]).down(a)

    @staticmethod
    def down_bias(experts: nn.Module) -> torch.Tensor | None:  # [E, d]
        biases = [_gated_mlp(m).down.bias for m in experts]
        return None if biases[0] is None else torch.stack(biases)

    @staticmethod
    def down_t(experts: nn.Module) -> torch.Tensor:
        return torch.cat([_gated_mlp(m).down.weight.t() for m in experts])


class _FlatGLU:
    """DBRX's ``DbrxExperts``: the experts' weights stacked in 2-D parameters of ``experts.mlp``, ``w1`` (gate)
    and ``v1`` (up) ``[E d_e, d]`` and ``w2 [E d_e, d]`` (the output projection, stored transposed), with
    ``activation_fn``; ``a = act(x w1_e^T) * (x v1_e^T)``, output ``a w2_e`` (``DbrxExpertGLU.forward``)."""

    name = "stacked 2-D expert weights (DBRX)"
    router_sees_batch = False

    @staticmethod
    def matches(experts: nn.Module) -> bool:
        return isinstance(getattr(getattr(experts, "mlp", None), "w2", None), torch.Tensor)

    @staticmethod
    def problem(experts: nn.Module) -> str | None:
        mlp = experts.mlp
        parts = [getattr(mlp, n, None) for n in ("w1", "v1", "w2")]
        if not all(isinstance(p, torch.Tensor) and p.dim() == 2 for p in parts) or len({p.shape for p in parts}) != 1:
            return "expected experts.mlp.w1, v1, w2 of one shape [E*d_expert, d]"
        e = getattr(experts, "num_experts", None)
        if not isinstance(e, int) or e < 1 or parts[0].shape[0] % e:
            return f"experts.num_experts={e!r} does not divide the {parts[0].shape[0]} rows of experts.mlp.w1"
        if not isinstance(getattr(mlp, "activation_fn", None), nn.Module):
            return "no experts.mlp.activation_fn"
        return None

    @staticmethod
    def sizes(experts: nn.Module) -> tuple[int, int, int]:
        rows, d = experts.mlp.w1.shape
        return experts.num_experts, rows // experts.num_experts, d

    @staticmethod
    def _w(experts: nn.Module, name: str, e: int) -> torch.Tensor:  # [d_e, d]
        _, de, d = _FlatGLU.sizes(experts)
        return getattr(experts.mlp, name).view(-1, de, d)[e]

    @staticmethod
    def activations(experts: nn.Module, e: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate = x.matmul(_FlatGLU._w(experts, "w1", e).T)
        up = x.matmul(_FlatGLU._w(experts, "v1", e).T)
        g = experts.mlp.activation_fn(gate)
        return g * up, g

    @staticmethod
    def down(experts: nn.Module, e: int, a: torch.Tensor) -> torch.Tensor:
        return a.matmul(_FlatGLU._w(experts, "w2", e))

    @staticmethod
    def down_bias(experts: nn.Module) -> None:
        return None

    @staticmethod
    def down_t(experts: nn.Module) -> torch.Tensor:  # [E * d_e, d]: w2 as stored
        return experts.mlp.w2


class _Parallel:
    """JetMoE's ``JetMoeMoE``: the block itself holds the experts, ``input_linear.weight [E, 2 d_e, d]`` (gate rows
    first) and ``output_linear.weight [E, d, d_e]`` (``JetMoeParallelExperts``), ``activation``, and a bias ``[d]``
    added to the block's output whatever the routing (``JetMoeMoE.forward``)."""

    name = "parallel experts in the block (JetMoE)"
    router_sees_batch = False

    @staticmethod
    def matches(experts: nn.Module) -> bool:
        w = getattr(getattr(experts, "output_linear", None), "weight", None)
        return isinstance(w, torch.Tensor) and w.dim() == 3

    @staticmethod
    def problem(experts: nn.Module) -> str | None:
        gu = getattr(getattr(experts, "input_linear", None), "weight", None)
        e, d, de = experts.output_linear.weight.shape
        if not isinstance(gu, torch.Tensor) or gu.shape != (e, 2 * de, d):
            return f"expected input_linear.weight [E, 2*d_expert, d] = {(e, 2 * de, d)} next to output_linear.weight"
        if not isinstance(getattr(experts, "activation", None), nn.Module):
            return "no activation"
        return None

    @staticmethod
    def sizes(experts: nn.Module) -> tuple[int, int, int]:
        e, d, de = experts.output_linear.weight.shape
        return e, de, d

    @staticmethod
    def activations(experts: nn.Module, e: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = F.linear(x, experts.input_linear.weight[e]).chunk(2, dim=-1)
        g = experts.activation(gate)
        return g * up, g

    @staticmethod
    def down(experts: nn.Module, e: int, a: torch.Tensor) -> torch.Tensor:
        return F.linear(a, experts.output_linear.weight[e])

    @staticmethod
    def down_bias(experts: nn.Module) -> None:
        return None

    @staticmethod
    def down_t(experts: nn.Module) -> torch.Tensor:
        e, d, de = experts.output_linear.weight.shape
        return experts.output_linear.weight.transpose(1, 2).reshape(e * de, d)

    @staticmethod
    def block_bias(experts: nn.Module) -> torch.Tensor | None:  # [d]
        b = getattr(experts, "bias", None)
        return b if isinstance(b, torch.Tensor) else None


def _no_block_bias(experts: nn.Module) -> None:
    return None


for _kind in (_Fused, _ModuleList, _FlatGLU):
    _kind.block_bias = staticmethod(_no_block_bias)  # a bias on the block's output: JetMoE only

EXPERT_KINDS = (_Fused, _ModuleList, _FlatGLU, _Parallel)
