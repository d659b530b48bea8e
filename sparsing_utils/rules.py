"""Sparsification rules: which neurons of ``a`` are activated on each token.

* :class:`CETTRule` - the paper's rule: activated when ``|a_i| * ||W_down[:, i]|| > eps_l``,
  one threshold per layer, chosen by CETT (Luo et al. 2024, Sec. 3.1, PAPER.md Sec. 1).
* :class:`TopKRule` - Top-k baseline (Fig. 3): the ``k = ratio * d_ff`` neurons with the
  largest score per token; ``scope="global"`` is the official code's variant that ranks the
  whole batch at once. A neuron whose score is zero (a ReLU zero) is never activated, even
  among the top k, as in the official code (which masks ``|gate| < 1e-18``).
* :class:`FATRule` - FAT-eps baseline (Fig. 3): activated when ``|act(W_gate x)_i| > eps``.
* :class:`ReLURule` - straightforward ReLU sparsity: activated when ``a_i != 0``.
* :class:`DenseRule` - keeps everything (a control: identical to the unhooked model).
* :class:`RoutedExpertsRule` - MoE models (Fig. 2): every token goes to ``k`` experts (the
  routers' top-k), all their neurons kept.

A rule maps ``(site, a, gate, col_norms)`` to a boolean mask shaped like ``a``
(``True`` = activated); :func:`apply_rule` zeroes the rest inside a context manager. In an MoE
layer a neuron of an expert that did not run on the token is never activated, whatever the rule.
A rule that decides each neuron from its own ``a_i``, gate and column norm alone (``elementwise``)
is applied to an MoE layer expert by expert, on the tokens routed to each
(:class:`~sparsing_utils.moe.ExpertRows`); the others (Top-k ranks a token's neurons together)
see the full-width vector.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .cett import activation_limits, compare_limits, host_to_device
from .ffn import FFNSite, edit_activations, find_ffn_sites
from .moe import ExpertRows, routed_top_k

__all__ = ["CETTRule", "DenseRule", "FATRule", "ReLURule", "RoutedExpertsRule", "SparsityRule", "TopKRule",
           "apply_rule"]

# Scores below this are zeros (ReLU): never activated by Top-k. The official code's cut on |gate|.
ZERO_SCORE = 1e-18


class SparsityRule:
    """Base class. ``need_gate``: the rule scores neurons by ``act(W_gate x)``; ``routed_experts``:
    MoE routers send each token to this many experts while the rule applies (None: unchanged);
    ``keeps_zeros``: the rule may activate a neuron whose ``a_i`` is exactly 0 (False: never, so in
    an MoE layer the experts that did not run, zeros in ``a``, need no mask of their own)."""

    name = "rule"
    need_gate = False
    routed_experts: int | None = None
    keeps_zeros = True
    elementwise = False  # keep() decides each neuron from its own a_i, gate_i, col_norms_i alone

    def keep(self, site: FFNSite, a: torch.Tensor, gate: torch.Tensor | None,
             col_norms: torch.Tensor) -> torch.Tensor:  # [..., d_ff] bool
        raise NotImplementedError

    def keep_columns(self, site: FFNSite, a: torch.Tensor, gate: torch.Tensor | None, col_norms: torch.Tensor,
                     cols: slice) -> torch.Tensor:  # a [rows, width] = the columns cols of a -> [rows, width] bool
        """:meth:`keep` of the neurons ``cols`` only (``elementwise`` rules): one expert's block of an MoE layer."""
        return self.keep(site, a, gate, col_norms[cols])

    def sparsify(self, site: FFNSite, a: torch.Tensor, gate: torch.Tensor | None,
                 col_norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a * keep, keep)``: ``a`` with the neurons not activated set to zero (``a_i * 0``, so
        a dropped negative entry is ``-0.0``), and the mask of :meth:`keep`."""
        keep = self.keep(site, a, gate, col_norms)  # [..., d_ff] bool
        return a * keep, keep

    def bind(self, sites: Sequence[FFNSite], col_norms: dict[int, torch.Tensor],
             host_col_norms: dict[int, torch.Tensor] | None = None) -> None:
        """Called by :func:`apply_rule` before the forward: put on the device what :meth:`keep`
        needs for every layer, so that no hook copies from the host (each such copy makes the
        host wait for the device). ``host_col_norms``: the same norms on the host, when the caller
        has them. Nothing to do by default."""

    def describe(self) -> dict:
        return {"rule": self.name}


@dataclass
class CETTRule(SparsityRule):
    """Activated iff the neuron output norm ``|a_i| * ||W_down[:, i]||`` exceeds ``eps_l``."""

    thresholds: Sequence[float] | torch.Tensor
    name: str = field(default="cett", init=False)
    keeps_zeros = False  # |0| * ||W_down[:, i]|| = 0 <= eps for every eps >= 0
    elementwise = True

    def __post_init__(self):
        t = torch.as_tensor(self.thresholds, dtype=torch.float32).reshape(-1)
        if not torch.isfinite(t).all() or (t < 0).any():
            raise ValueError("CETT thresholds must be finite and >= 0 (one per layer)")
        self.thresholds = t
        self._limits: dict[int, torch.Tensor] = {}

    def bind(self, sites, col_norms, host_col_norms=None):
        """Every layer's limits on ``|a|``, on the device of its ``W_down``: one copy of all
        thresholds per device, before the forward. With ``host_col_norms`` the limits are computed
        on the host, in float32 and made comparable in the dtype of ``W_down``
        (:func:`~sparsing_utils.cett.compare_limits`: the same decisions, no float32 copy of ``a``),
        and copied in one transfer per device."""
        need = 1 + max((s.index for s in sites), default=-1)
        if len(self.thresholds) < need:
            raise ValueError(f"the CETT rule has {len(self.thresholds)} thresholds, the model {need} FFN layers: "
                             "give one threshold per layer")
        if host_col_norms is not None:
            self._bind_on_host(sites, col_norms, host_col_norms)
            return
        on_device: dict[torch.device, torch.Tensor] = {}
        for site in sites:
            cn = col_norms[site.index]
            limits = self._limits.get(site.index)
            if limits is not None and limits.device == cn.device:
                continue
            if cn.device not in on_device:
                on_device[cn.device] = host_to_device(self.thresholds, cn.device)
            eps = on_device[cn.device][site.index : site.index + 1]
            self._limits[site.index] = activation_limits(cn, eps)[0]  # [d_ff], as keep() computes it

    def _bind_on_host(self, sites, col_norms, host_col_norms):
        dtypes = [site.weight_t().dtype for site in sites]
        dtypes = [d if d in (torch.bfloat16, torch.float16) else torch.float32 for d in dtypes]
        if len(set(dtypes)) == 1 and len({host_col_norms[s.index].numel() for s in sites}) == 1:  # one set of ops
            index = torch.tensor([s.index for s in sites])
            cn = torch.stack([host_col_norms[s.index] for s in sites])  # [layers, d_ff]
            limits = list(compare_limits(activation_limits(cn, self.thresholds[index].unsqueeze(1)), dtypes[0])[:, 0])
        else:
            limits = [compare_limits(activation_limits(host_col_norms[s.index], self.thresholds[s.index:s.index + 1]),
                                     d)[0] for s, d in zip(sites, dtypes)]  # [d_ff] each, on the host
        by_device: dict[torch.device, list] = {}
        for site, lim, dtype in zip(sites, limits, dtypes):
            by_device.setdefault(col_norms[site.index].device, []).append((site.index, lim.float(), dtype))
        for device, items in by_device.items():
            flat = host_to_device(torch.cat([lim for _, lim, _ in items]), device)  # float32 holds them exactly
            start = 0
            for index, lim, dtype in items:
                self._limits[index] = flat[start:start + lim.numel()].to(dtype)
                start += lim.numel()

    def _limits_of(self, site, col_norms, device) -> torch.Tensor:  # [d_ff]
        # |a_i| * ||W_down[:, i]|| > eps_l, as |a_i| > eps_l / ||W_down[:, i]|| (cett.activation_limits)
        limits = self._limits.get(site.index)
        if limits is None or limits.device != device:
            limits = activation_limits(col_norms, self.thresholds[site.index : site.index + 1])[0].to(device)
            self._limits[site.index] = limits
        return limits

    def _for(self, site, col_norms, a) -> torch.Tensor:  # [d_ff], in a's dtype when made comparable in it
        limits = self._limits_of(site, col_norms, a.device)
        if limits.dtype != torch.float32 and limits.dtype != a.dtype:  # bound for another dtype: exact float32
            limits = activation_limits(col_norms, self.thresholds[site.index:site.index + 1])[0].to(a.device)
            self._limits[site.index] = limits
        return limits

    def keep(self, site, a, gate, col_norms):
        return a.abs() > self._for(site, col_norms, a)  # [..., d_ff]

    def keep_columns(self, site, a, gate, col_norms, cols):
        return a.abs() > self._for(site, col_norms, a)[cols]  # [rows, width]

    def sparsify(self, site, a, gate, col_norms):
        # the product is written over |a| (no longer needed once compared): one full-size temporary
        # fewer than keep() then a * keep, with the same values (benchmarks/bench_rule_edit.py)
        mag = a.abs()  # [..., d_ff]
        keep = mag > self._for(site, col_norms, a)
        return torch.mul(a, keep, out=mag), keep

    def describe(self):
        return {"rule": self.name, "thresholds": self.thresholds.tolist()}


@dataclass
class TopKRule(SparsityRule):
    """Keep the ``round(ratio * d_ff)`` neurons with the largest score on each token.

    score: ``"gate"`` ranks by ``|act(W_gate x)|`` as the paper's baseline does (plain FFNs:
    ``|a|``); ``"magnitude"`` by ``|a|``; ``"norm"`` by ``|a_i| * ||W_down[:, i]||``.
    scope: ``"token"`` (the common per-token definition: k per token) or ``"global"``
    (the official code's variant: one ranking over every token of the batch and layer).
    Neurons scoring below :data:`ZERO_SCORE` (exact zeros of a ReLU model) are not activated
    even when they rank among the top k, so a token of a ReLU model with fewer than k nonzero
    gates keeps only those.
    """

    ratio: float
    score: str = "gate"
    scope: str = "token"
    name: str = field(default="topk", init=False)

    def __post_init__(self):
        if not 0 < self.ratio <= 1:
            raise ValueError(f"Top-k ratio must be in (0, 1], got {self.ratio}")
        if self.score not in ("gate", "magnitude", "norm"):
            raise ValueError(f"unknown Top-k score {self.score!r}: use 'gate', 'magnitude' or 'norm'")
        if self.scope not in ("token", "global"):
            raise ValueError(f"unknown Top-k scope {self.scope!r}: use 'token' or 'global' (official)")
        self.need_gate = self.score == "gate"
        if self.scope == "global":
            self.name = "topk_global_official"

    def keep(self, site, a, gate, col_norms):
        if self.score == "gate":
            s = gate.float().abs()
        elif self.score == "norm":
            s = a.float().abs() * col_norms
        else:
            s = a.float().abs()
        d_ff = s.shape[-1]
        if self.scope == "token":
            k = max(1, min(d_ff, round(self.ratio * d_ff)))
            idx = s.topk(k, dim=-1).indices
            top = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True)
        else:
            flat = s.reshape(-1)
            k = max(1, min(flat.numel(), round(self.ratio * flat.numel())))
            top = torch.zeros_like(flat, dtype=torch.bool).scatter_(0, flat.topk(k).indices, True).view_as(s)
        return top & (s >= ZERO_SCORE)  # [..., d_ff]

    def describe(self):
        return {"rule": self.name, "ratio": self.ratio, "score": self.score, "scope": self.scope}


@dataclass
class FATRule(SparsityRule):
    """FAT-eps: activated iff ``|act(W_gate x)_i| > eps`` (one ``eps`` for all layers)."""

    eps: float
    name: str = field(default="fat", init=False)
    need_gate: bool = field(default=True, init=False)
    elementwise = True

    def __post_init__(self):
        if not (self.eps >= 0 and torch.isfinite(torch.tensor(self.eps))):
            raise ValueError(f"FAT eps must be finite and >= 0, got {self.eps}")

    def keep(self, site, a, gate, col_norms):
        return gate.float().abs() > self.eps

    def describe(self):
        return {"rule": self.name, "eps": self.eps}


@dataclass
class ReLURule(SparsityRule):
    """Straightforward ReLU sparsity: a neuron is activated iff ``a_i != 0``."""

    name: str = field(default="relu", init=False)
    keeps_zeros = False
    elementwise = True

    def keep(self, site, a, gate, col_norms):
        return a != 0


@dataclass
class DenseRule(SparsityRule):
    """Keeps every neuron (the model is unchanged; used as a control)."""

    name: str = field(default="dense", init=False)
    elementwise = True

    def keep(self, site, a, gate, col_norms):
        return torch.ones_like(a, dtype=torch.bool)


@dataclass
class RoutedExpertsRule(SparsityRule):
    """MoE models: route every token to ``k`` experts and keep all their neurons (Fig. 2's curve of
    the number of activated experts). Dense FFN layers of the model keep every neuron."""

    k: int
    name: str = field(default="experts", init=False)
    elementwise = True

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"the number of routed experts must be an integer >= 1, got {self.k!r}")
        self.routed_experts = self.k

    def keep(self, site, a, gate, col_norms):
        return torch.ones_like(a, dtype=torch.bool)

    def describe(self):
        return {"rule": self.name, "k": self.k}


Recorder = Callable[[FFNSite, torch.Tensor], None]  # (site, keep [batch, seq, d_ff] bool)
Counter = Callable[[FFNSite, torch.Tensor], None]  # (site, activated neurons per token [batch, seq] float32)


@contextlib.contextmanager
def apply_rule(model: nn.Module, rule: SparsityRule, *, sites: Sequence[FFNSite] | None = None,
               record: Recorder | None = None, count: Counter | None = None,
               check_finite: bool = True, col_norms: Sequence[torch.Tensor] | None = None,
               host_col_norms: Sequence[torch.Tensor] | None = None) -> Iterator[list[FFNSite]]:
    """Run ``model`` with the non-activated entries of ``a`` set to zero.

    ``record(site, keep)`` (optional) sees every layer's boolean mask ``[batch, seq, d_ff]``, for
    activation statistics; ``count(site, n)`` only the number of activated neurons of each token
    ``[batch, seq]`` (float32), which an MoE layer adds up expert by expert without building the
    full-width mask. ``check_finite`` raises on NaN/inf activations (one device synchronisation
    per layer; callers that check the loss instead turn it off). ``col_norms``: each layer's
    ``||W_down[:, i]||`` (:meth:`FFNSite.column_norms`, by site index), computed here when not
    given; ``host_col_norms`` the same on the host, if the caller keeps them (the rule's limits are then
    computed there). The rule puts what it needs on the device before the forward (:meth:`SparsityRule.bind`).
    Hooks are removed on exit, also after an exception.
    """
    sites = list(sites) if sites is not None else find_ffn_sites(model)
    # on the device of W_down; a caller that applies many rules passes them (computed once)
    norms = {s.index: s.column_norms() if col_norms is None else col_norms[s.index] for s in sites}
    rule.bind(sites, norms, None if host_col_norms is None else {s.index: host_col_norms[s.index] for s in sites})

    def non_finite(site: FFNSite):
        return FloatingPointError(
            f"non-finite FFN activations at {site.name}: the model produces NaN/inf on this "
            "input; check the dtype (try float32) and the input ids"
        )

    def edit(site: FFNSite, a, gate):
        if site.moe is not None:
            return edit_experts(site, a, gate)
        if check_finite and not torch.isfinite(a).all():
            raise non_finite(site)
        new, keep = rule.sparsify(site, a, gate, norms[site.index])  # [batch, seq, d_ff] each
        if record is not None:
            record(site, keep)
        if count is not None:
            count(site, keep.sum(dim=-1, dtype=torch.float32))
        return new

    def edit_experts(site: FFNSite, v: ExpertRows, gate: ExpertRows | None) -> ExpertRows:
        """An MoE layer: the mask of the neurons kept, expert by expert on the tokens routed to each
        (only the experts that ran, and shared ones, are there: no other neuron can be kept)."""
        if check_finite and not bool(v.all_finite()):
            raise non_finite(site)
        cn = norms[site.index]
        if rule.elementwise:
            keep = v.map(lambda cols, x, g: rule.keep_columns(site, x, g, cn, cols), gate)  # per expert
        else:  # the rule ranks a token's neurons together: on the full width, experts that ran only
            full = rule.keep(site, v.full(), None if gate is None else gate.full(), cn)  # [batch, seq, d_ff]
            keep = v.gather(full & site.moe.ran_mask().to(full.device))
        if record is not None:
            record(site, keep.full())
        if count is not None:
            count(site, keep.row_sums())
        return keep

    routing = (routed_top_k(model, rule.routed_experts, sites=sites) if rule.routed_experts is not None
               else contextlib.nullcontext())
    with routing, edit_activations(model, edit, sites=sites, need_gate=rule.need_gate, compact=True):
        yield sites
