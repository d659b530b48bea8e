"""Mixture-of-Experts FFNs as one virtual FFN per layer (Luo et al. 2024, Sec. 3.1 and Fig. 2).

Every expert's neurons are FFN neurons. For a token routed to expert ``e`` with routing weight
``w_e`` the MoE output is ``y = sum_e w_e W_down_e a_e (+ g W_down_s a_s)``, with ``a_e`` the input
of expert ``e``'s output projection and, for a shared expert, ``a_s`` and its gate ``g`` (Qwen2-MoE's
``sigmoid(shared_expert_gate x)``; 1 for DeepSeek's shared experts). Neuron ``i`` of expert ``e``
adds ``n_i = w_e a_i W_down_e[:, i]`` (PAPER.md Sec. 1 with the routing weight folded in), so one
layer presents the *virtual activation vector*

    v = [w_1 a_1, ..., w_E a_E, g a_s]   [batch, seq, E * d_expert + d_shared]

(zeros for the experts that did not run on the token) and the concatenated output projection
``[W_down_1 ... W_down_E W_down_s]``. ``y = W_cat v`` exactly, so CETT (Eq. 2), the per-layer
thresholds of one CETT target and every rule of :mod:`sparsing_utils.rules` apply unchanged; the
CETT of a token is over the experts that ran for it. Activation ratios are counted both over all
expert neurons of the layer (``d_ff`` = the width of ``v``) and over the neurons of the experts that
ran (:meth:`MoELayer.ran_neurons`).

Inside the hooks ``v`` is held without its zeros, as :class:`~sparsing_utils.expert_rows.ExpertRows`: each expert's columns on
the tokens routed to it (``[n_e, d_expert]``), the shared columns on every token; the sparse pass
edits each expert's ``a`` in place inside the expert loop and memory mode stores these rows, so
nothing of width ``E * d_expert`` is built unless a caller asks for the full vector.

Where the library's own expert code hides ``a`` (fused 3-D weights run by grouped_mm/batched_mm
kernels), the MoE block's ``forward`` is replaced, only inside the context managers of
:mod:`sparsing_utils.ffn`, by :meth:`MoELayer.forward`: the model's own router, then the experts
computed as transformers' eager loop computes them (bitwise the same output as the eager path
when no neuron is edited; within float rounding of the grouped kernels). The expert layouts (fused
3-D weights, gpt-oss's transposed / interleaved / biased variant included; a module list; DBRX's
stacked 2-D weights; JetMoE's parallel experts) differ only in the rows of
:data:`~sparsing_utils.experts.EXPERT_KINDS`.
A shared MLP the decoder layer runs next to the block on its input (Granite-MoE-shared's
``shared_mlp``) is the layer's shared part, as a shared expert inside the block is. Output biases
(gpt-oss's ``w_e b_e``, JetMoE's block bias) belong to no neuron: kept in the output, left out of
the ``y`` shown to readers (CETT's denominator), as :func:`~sparsing_utils.ffn.read_activations`
does with a dense FFN's down bias.
"""
from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .cett import pad_rows
from .expert_rows import ExpertRows
from .experts import EXPERT_KINDS, _gated_mlp, _GatedMLP, _mlp_layouts, _Parallel

__all__ = ["EXPERT_KINDS", "ExpertRows", "MoELayer", "find_moe", "moe_layers", "routed_top_k"]

# Where a decoder layer keeps its MoE block, and where the block keeps its parts.
MOE_BLOCK_NAMES = ("mlp", "block_sparse_moe", "moe", "feed_forward", "ffn")
ROUTER_NAMES = ("gate", "router")
SHARED_NAMES = ("shared_expert", "shared_experts")
SHARED_GATE_NAMES = ("shared_expert_gate",)
# A shared MLP the decoder layer runs next to the MoE block on the block's input, adding its output to the
# block's (Granite-MoE-shared's ``moe(x) + shared_mlp(x)``): the shared part of the layer's virtual FFN.
OUTER_SHARED_NAMES = ("shared_mlp",)
# MoE blocks whose forward returns ``(output, routing weights)`` rather than the output alone (gpt-oss).
RETURNS_ROUTING = frozenset({"GptOssMLP"})


# -- one layer's MoE ------------------------------------------------------------------------------

def _route(out, router_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [tokens, k], index [tokens, k])`` from a router's output: transformers >= 5 routers
    return ``(logits, weights, index)``, DeepSeek's remote ``MoEGate`` ``(index, weights[, aux])``.
    Routers called on ``[batch, seq, d]`` (the remote ``MoEGate``) may answer ``[batch, seq, k]``."""
    parts = out if isinstance(out, tuple) else (out,)
    at = next((i for i, t in enumerate(parts)
               if isinstance(t, torch.Tensor) and t.dim() >= 2 and not t.is_floating_point()), None)
    # The weights: the [tokens, k] float tensor nearest the index (before it, then after it), so that logits
    # [tokens, E] are never taken for them when k = E.
    near = [] if at is None else [*parts[at - 1::-1][:at], *parts[at + 1:]]
    weights = None if at is None else next(
        (t for t in near if isinstance(t, torch.Tensor) and t.is_floating_point() and t.shape == parts[at].shape), None)
    index = None if at is None else parts[at]
    if weights is None:
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in parts]
        raise ValueError(f"the router {router_name} returned {shapes}: expected the chosen experts' indices and "
                         "routing weights, both [tokens, k] (transformers >= 5 routers, DeepSeek's MoEGate); a router "
                         "that returns only logits (transformers 4.x) cannot be read")
    return weights.reshape(-1, weights.shape[-1]), index.reshape(-1, index.shape[-1])  # [tokens, k]


def _jetmoe_routing(router: nn.Module, out: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """JetMoE's ``JetMoeTopKGating`` returns the (token, slot) pairs sorted by expert, their gates, the count per
    expert and the logits; back to ``(weights, index) [tokens, k]``."""
    pairs, _, gates, counts, logits = out
    experts = torch.repeat_interleave(torch.arange(len(counts), device=pairs.device),
                                      torch.tensor(counts, device=pairs.device))  # [T k]: the expert of each pair
    index = torch.empty_like(pairs).index_put_((pairs,), experts)
    weights = torch.empty_like(gates).index_put_((pairs,), gates)
    return weights.view(logits.shape[0], -1), index.view(logits.shape[0], -1)


# Routers whose output is not (logits, weights, index) nor (index, weights, ...): class name -> reader.
ROUTER_READERS = {"JetMoeTopKGating": _jetmoe_routing}


# Visitors of one forward. Full-width ones see v as [batch, seq, d_ff] tensors: edit(v, gate) -> v' or None
# before the output, read(v, y) after it. Compact ones see ExpertRows instead: edit(v, gate) -> ExpertRows of
# new values, a boolean ExpertRows (the entries kept: the others become 0), or None; read(v, y).
EditVisitor = Callable[..., "torch.Tensor | ExpertRows | None"]
ReadVisitor = Callable[..., None]


@dataclass(eq=False)
class _Visits:
    """What runs a block while it is visited, shared by every MoELayer describing it (each
    find_ffn_sites call makes new ones): the visitors, the block's own forward, the last routing."""

    edits: list = field(default_factory=list)  # (edit, need_gate, compact)
    reads: list = field(default_factory=list)  # (read, compact)
    saved_forward: object = None
    saved_outer_forward: object = None  # of the decoder layer's shared MLP (Granite-MoE-shared), if any
    ran: torch.Tensor | None = None  # [batch, seq, E] bool: the experts that ran on each token, last forward
    outer: tuple | None = None  # (block input, shared MLP output) for the layer's call of its outer shared MLP


_VISITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # MoE block -> _Visits, while visited
_ROUTED_K: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # MoE block -> k, inside routed_top_k


@dataclass(eq=False)
class MoELayer:
    """One decoder layer's MoE block seen as a virtual FFN of ``d_ff = E * d_expert + d_shared`` neurons."""

    name: str  # qualified name of the block
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    kind: type
    shared: _GatedMLP | None  # the shared expert(s), or None
    shared_gate: nn.Module | None  # Qwen2-MoE: sigmoid(shared_expert_gate x) scales the shared expert
    num_experts: int
    d_expert: int
    d_shared: int
    d_model: int
    # The shared MLP when the decoder layer runs it next to the block (Granite-MoE-shared's shared_mlp), else None.
    shared_outside: nn.Module | None = None
    # From the router's output to (weights, index) where _route cannot read it: the block's own step when its
    # router returns logits only (DBRX), or a reader of ROUTER_READERS (JetMoE).
    routing: Callable | None = None

    @property
    def ran(self) -> torch.Tensor | None:
        """``[batch, seq, E]`` bool: the experts that ran on each token in the last visited forward."""
        visits = _VISITS.get(self.block)
        return None if visits is None else visits.ran

    @property
    def d_ff(self) -> int:
        return self.num_experts * self.d_expert + self.d_shared

    def weight_t(self) -> torch.Tensor:
        """The concatenated output projections transposed, ``[d_ff, d_model]``: ``y = v @ weight_t()``."""
        parts = [self.kind.down_t(self.experts)]
        if self.shared is not None:
            parts.append(self.shared.down.weight.t().to(parts[0]))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def ran_neurons(self) -> torch.Tensor:
        """Neurons of the experts that ran on each token of the last forward (+ shared): ``[batch, seq]``."""
        return self.ran.sum(dim=-1, dtype=torch.float32) * self.d_expert + self.d_shared

    def ran_mask(self) -> torch.Tensor:
        """``[batch, seq, d_ff]`` bool: the neuron belongs to an expert that ran on the token (or is shared)."""
        mask = self.ran.repeat_interleave(self.d_expert, dim=-1)
        if self.d_shared:
            mask = torch.cat([mask, mask.new_ones(*mask.shape[:-1], self.d_shared)], dim=-1)
        return mask

    @property
    def top_k_owner(self) -> nn.Module:
        """Where the number of routed experts is set: the router, or the block (DBRX's ``DbrxFFN.top_k``)."""
        return self.router if hasattr(self.router, "top_k") or not hasattr(self.block, "top_k") else self.block

    @property
    def top_k(self) -> int:
        return int(self.top_k_owner.top_k)

    # -- the replacement forward --------------------------------------------------------------
    @contextlib.contextmanager
    def visiting(self, *, edit: EditVisitor | None = None, read: ReadVisitor | None = None,
                 need_gate: bool = False, compact: bool = False) -> Iterator[None]:
        """Route the block's forward through :meth:`forward` with these visitors (nestable; ``need_gate``:
        ``edit`` also gets the gate scores ``act(W_gate x)``, zeros for experts that did not run;
        ``compact``: the visitors see :class:`ExpertRows` instead of full-width tensors); the block's
        own forward is restored on exit, also after an exception."""
        visits = _VISITS.get(self.block)
        first = visits is None
        if first:
            visits = _VISITS[self.block] = _Visits(saved_forward=self.block.__dict__.get("forward"))
            self.block.forward = self.forward
            if self.shared_outside is not None:
                visits.saved_outer_forward = self.shared_outside.__dict__.get("forward")
                self.shared_outside.forward = self._outer_forward
        edit_entry, read_entry = (edit, need_gate, compact), (read, compact)
        if edit is not None:
            visits.edits.append(edit_entry)
        if read is not None:
            visits.reads.append(read_entry)
        try:
            yield
        finally:
            if edit is not None:
                visits.edits.remove(edit_entry)
            if read is not None:
                visits.reads.remove(read_entry)
            if first:
                del _VISITS[self.block]
                for module, saved in ((self.block, visits.saved_forward),
                                      (self.shared_outside, visits.saved_outer_forward)):
                    if module is None:
                        continue
                    if saved is None:
                        del module.forward
                    else:
                        module.forward = saved

    def _outer_forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The decoder layer's call of its shared MLP (Granite-MoE-shared): the output :meth:`forward` computed,
        and masked, as the shared part of ``v`` on the same input."""
        visits = _VISITS[self.block]
        done, visits.outer = visits.outer, None
        if done is None or done[0] is not hidden_states:
            raise RuntimeError(f"the shared MLP next to {self.name} was called on another input than the MoE block's "
                               "(or before it): it is measured as the shared part of the block's virtual FFN, which "
                               "needs both on the same hidden states")
        return done[1]

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The block's output on ``hidden_states [batch, seq, d]``, with ``v`` shown to the visitors.

        Each expert runs on its tokens only (transformers' eager loop); ``v`` is held as
        :class:`ExpertRows` and an edit reaches each expert's ``a`` there. Full-width visitors get
        ``v`` with zeros for the experts that did not run; what they write there is ignored (those
        experts are not computed)."""
        if self.block.training and any(getattr(m, n, 0) for m in (self.block, self.router)
                                       for n in ("jitter_noise", "input_jitter_noise", "moe_jitter_eps")):
            raise ValueError(f"{self.name} is in training mode with router jitter: call model.eval() first")
        lead = tuple(hidden_states.shape[:-1])
        h = hidden_states.reshape(-1, hidden_states.shape[-1])  # [T, d]
        routed = self.router(hidden_states if self.kind.router_sees_batch else h)  # as the block's own forward
        if self.routing is not None:  # DBRX: the router's logits -> (weights, index) by the block's own rule
            routed = self.routing(routed)
        weights, index = _route(routed, self.name)  # [T, k], the model's own routing
        want = _ROUTED_K.get(self.block)
        if want is not None and index.shape[-1] != want:
            raise ValueError(f"the router of {self.name} ({type(self.router).__name__}) chose {index.shape[-1]} experts "
                             f"per token with top_k set to {want}: its routing does not follow top_k, so the number "
                             "of routed experts cannot be changed on this model")
        n, e_all, de = h.shape[0], self.num_experts, self.d_expert
        visits = _VISITS[self.block]
        need_gate = any(wants for _, wants, _ in visits.edits)
        # The eager loop of transformers' experts, each on its tokens in transformers' order (by slot among
        # the k, then token), grouped by one stable sort: one device synchronisation per layer. An index of
        # E (a dropped slot) sorts last and runs nothing.
        with torch.no_grad():
            slots = index.t().reshape(-1)  # [k T]: slot 0 of every token, then slot 1, ...
            order = slots.argsort(stable=True)  # [k T] grouped by expert
            bounds = torch.searchsorted(slots[order], torch.arange(e_all + 1, device=slots.device, dtype=slots.dtype)).tolist()
        no_rows, no_values = index.new_empty(0), h.new_empty(0, de)
        rows, values, gates = [no_rows] * e_all, [no_values] * e_all, [no_values] * e_all
        runs = []  # (e, tok [n_e], w [n_e, 1], a [n_e, d_e])
        for e in range(e_all):
            if bounds[e] == bounds[e + 1]:
                continue
            chosen = order[bounds[e]:bounds[e + 1]]  # [n_e] places in slots
            pos, tok = chosen // n, chosen % n  # [n_e] slot among the k, token
            m = tok.shape[0]
            a, g = (t[:m] for t in self.kind.activations(self.experts, e, h[pad_rows(tok)]))  # [n_e, d_e]
            # (on CUDA the expert runs on n_e rows padded by cett.pad_rows: fewer distinct GEMM shapes)
            w = weights[tok, pos, None]  # [n_e, 1]
            rows[e], values[e] = tok, (a * w).to(h.dtype)  # v's rows of expert e, routing weight folded in
            if need_gate:
                gates[e] = g.to(h.dtype)
            runs.append((e, tok, w, a))
        ran = torch.zeros(n, e_all + 1, dtype=torch.bool, device=index.device).scatter_(1, index, True)  # [T, E+1]
        visits.ran = ran[:, :e_all].reshape(*lead, e_all)  # [batch, seq, E]
        v_s = g_s = sg = None
        if self.shared is not None:
            a_s, g_s = self.shared.activations(h)  # [T, d_s]
            sg = F.sigmoid(self.shared_gate(h)) if self.shared_gate is not None else None  # [T, 1]
            v_s = a_s * sg if sg is not None else a_s
        v = ExpertRows(n, de, rows, values, v_s, lead)
        gate = ExpertRows(n, de, rows, gates, g_s, lead) if need_gate else None
        # The edits: v' = cur with the entries outside `keep` zeroed (a mask not yet applied).
        cur, keep, changed = v, None, False

        def current() -> ExpertRows:
            return cur if keep is None else cur.map(lambda _, x, k: x * k, keep)

        for edit, _, compact in visits.edits:
            if keep is not None:  # the next edit sees the masked v; the a of the experts is then v' / w
                cur, keep, changed = current(), None, True
            if compact:
                out = edit(cur, gate)
            else:
                out = edit(cur.full(), None if gate is None else gate.full())
                out = None if out is None else cur.gather(out)
            if out is None:
                continue
            if out.dtype == torch.bool:
                keep = out
            else:
                cur, changed = out, True
        final = current() if changed else cur
        y = torch.zeros_like(h)
        for e, tok, w, a in runs:
            if changed:  # entries left as they were keep their a bitwise; edited ones are v' / w
                old, new = v.values[e], final.values[e]
                a = torch.where(new == old, a, torch.where(w != 0, new / w, 0).to(a.dtype))
            elif keep is not None:  # a mask only: the neurons kept keep their a
                a = a * keep.values[e]
            out_e = self.kind.down(self.experts, e, pad_rows(a))[:a.shape[0]] * w  # (W_down_e a + b_e) w_e, output
            # bias included (gpt-oss); rows padded on CUDA as above
            y.index_add_(0, tok, out_e.to(y.dtype))
        y = y.view(*lead, -1)
        block_bias = self.kind.block_bias(self.experts)  # [d]: JetMoE's bias on the block's output
        if block_bias is not None:
            y = y + block_bias
        total = y  # the layer's FFN output: the block's, plus a shared MLP the decoder layer runs next to it
        if self.shared is not None:
            if changed:
                old, new = v.shared, final.shared
                a_s = torch.where(new == old, a_s, (torch.where(sg != 0, new / sg, 0) if sg is not None else new)
                                  .to(a_s.dtype))
            elif keep is not None:
                a_s = a_s * keep.shared
            shared_out = self.shared.down(a_s)
            shared_out = (sg * shared_out if sg is not None else shared_out).view(*lead, -1)
            if self.shared_outside is None:
                y = total = y + shared_out
            else:  # handed to the decoder layer's own call of the shared MLP, which adds it to y
                visits.outer = (hidden_states, shared_out)
                total = y + shared_out
        if visits.reads:
            final = current()
            total = total - self._bias_output(runs, sg, h).view(*lead, -1)  # W_cat v, as for dense FFNs
            for read, compact in visits.reads:
                read(final if compact else final.full(), total)
        return (y, weights) if type(self.block).__name__ in RETURNS_ROUTING else y

    def _bias_output(self, runs: list, sg: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
        """``sum_e w_e b_e (+ g b_s)`` on each token ``[T, d]``: the output projections' biases as they reach the
        layer's output. Like a dense FFN's down bias (``ffn.read_activations`` subtracts it), a constant that is
        no neuron's output: left out of the output ``y`` whose norm is CETT's denominator (Eq. 2), kept in the model."""
        out = torch.zeros_like(h)  # [T, d]
        bias = self.kind.down_bias(self.experts)  # [E, d] or None
        if bias is not None:
            for e, tok, w, _ in runs:
                out.index_add_(0, tok, (bias[e] * w).to(out.dtype))
        s_bias = self.shared.down.bias if self.shared is not None else None
        if s_bias is not None:
            out = out + (sg * s_bias if sg is not None else s_bias)
        block_bias = self.kind.block_bias(self.experts)
        return out if block_bias is None else out + block_bias


def _first_child(block: nn.Module, names: Sequence[str]) -> nn.Module | None:
    return next((getattr(block, n) for n in names if isinstance(getattr(block, n, None), nn.Module)), None)


def find_moe(layer: nn.Module, prefix: str) -> MoELayer | None:
    """The MoE block of one decoder layer, or None when the layer's FFN is dense.

    A block is an MoE block when it holds ``experts``; everything else it needs must then be
    there, or a ``ValueError`` names what was searched."""
    for name in MOE_BLOCK_NAMES:
        block = getattr(layer, name, None)
        if isinstance(block, nn.Module) and isinstance(getattr(block, "experts", None), nn.Module):
            experts = block.experts
            break
        if isinstance(block, nn.Module) and _Parallel.matches(block):  # JetMoE: the block holds the experts
            experts = block
            break
    else:
        return None
    qual = f"{prefix}.{name}"
    where = f"the MoE block {qual} ({type(block).__name__})"
    kind = next((k for k in EXPERT_KINDS if k.matches(experts)), None)
    if kind is None:
        raise ValueError(f"{where}: its experts ({type(experts).__name__}) are neither " + " nor ".join(
            k.name for k in EXPERT_KINDS) + " (searched experts.down_proj as a 3-D tensor, an nn.ModuleList, and "
            "experts.mlp.w2 as a 2-D tensor)")
    problem = kind.problem(experts)
    if problem:
        raise ValueError(f"{where}, {kind.name}: {problem}")
    router = _first_child(block, ROUTER_NAMES)
    if router is None:
        raise ValueError(f"{where} has experts but no router: searched " + ", ".join(ROUTER_NAMES))
    shared_mlp, outside = _first_child(block, SHARED_NAMES), _first_child(layer, OUTER_SHARED_NAMES)
    if shared_mlp is not None and outside is not None:
        raise ValueError(f"{where} has a shared expert and the decoder layer another shared MLP "
                         f"({type(outside).__name__}): one shared part per layer is supported")
    shared_mlp = shared_mlp if shared_mlp is not None else outside
    shared = _gated_mlp(shared_mlp) if shared_mlp is not None else None
    if shared_mlp is not None and shared is None:
        raise ValueError(f"{where}: the shared expert {type(shared_mlp).__name__} is not a gated MLP (searched "
                         + _mlp_layouts() + ")")
    reader = ROUTER_READERS.get(type(router).__name__)
    routing = functools.partial(reader, router) if reader is not None else getattr(block, "route_tokens_to_experts", None)
    e, de, d = kind.sizes(experts)
    return MoELayer(qual, block, router, experts, kind, shared, _first_child(block, SHARED_GATE_NAMES),
                    e, de, 0 if shared is None else shared.down.in_features, d,
                    shared_outside=outside, routing=routing if callable(routing) else None)


def moe_layers(sites: Sequence) -> list[MoELayer]:
    """The MoE layers among FFN sites (empty for a dense model)."""
    return [s.moe for s in sites if getattr(s, "moe", None) is not None]


@contextlib.contextmanager
def routed_top_k(model: nn.Module, k: int, *, sites: Sequence | None = None) -> Iterator[list[MoELayer]]:
    """Route every token to ``k`` experts (the routers' ``top_k``; Fig. 2's number of activated experts),
    restored on exit. Routing weights follow the router's own rule (e.g. renormalised over the k)."""
    from .ffn import find_ffn_sites

    layers = moe_layers(find_ffn_sites(model) if sites is None else sites)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoE layer: the number of routed experts applies to MoE models")
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"the number of routed experts must be an integer, got {k!r}")
    for m in layers:
        if not hasattr(m.top_k_owner, "top_k"):
            raise ValueError(f"the router of {m.name} ({type(m.router).__name__}) has no top_k attribute to set")
        groups, chosen = getattr(m.router, "n_group", getattr(m.router, "num_group", None)), getattr(m.router, "topk_group", None)
        most = m.num_experts if not (groups and chosen) else chosen * (m.num_experts // groups)
        if not 1 <= k <= most:
            raise ValueError(f"routed experts k={k} out of range for {m.name}: 1..{most}"
                             + (f" (its router picks from {chosen} of {groups} expert groups)" if most < m.num_experts else ""))
    saved = [(m, getattr(m.router, "top_k", None), getattr(m.block, "top_k", None),
              getattr(m.block, "num_experts_per_tok", None)) for m in layers]
    try:
        for m in layers:
            _ROUTED_K[m.block] = k  # checked by MoELayer.forward: routers that ignore top_k are refused
            if hasattr(m.router, "top_k"):
                m.router.top_k = k
            for attr in ("top_k", "num_experts_per_tok"):
                if isinstance(getattr(m.block, attr, None), int):
                    setattr(m.block, attr, k)
        yield layers
    finally:
        for m, router_k, block_k, block_n in saved:
            _ROUTED_K.pop(m.block, None)
            if router_k is not None:
                m.router.top_k = router_k
            if block_k is not None:
                m.block.top_k = block_k
            if block_n is not None:
                m.block.num_experts_per_tok = block_n
