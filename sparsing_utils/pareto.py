"""PPL against activation ratio for one rule family: the Pareto curves of Fig. 3 (Luo et al. 2024).

Every point is one sparse pass of a :class:`~sparsing_utils.probe.SparsityProbe` (the dense
pass is shared), so the rule families are compared on the very same tokens.

* :func:`pareto_from_search` - the CETT curve for free: every CETT target the PPL-p% search
  evaluated was already one exact-threshold sparse pass (a report's ``search_points``).
* :func:`pareto_sweep` - one sparse pass per value of a rule family; with ``activation_ratios``
  the values are placed so that the points land near those ratios (e.g. the span of the
  search's points), so that a few passes cover the range where the curves are compared.
  On MoE models, ``"experts"`` is Fig. 2's curve: the number of experts each token is routed
  to (the routers' top-k), every neuron of those experts kept; the frames then carry both
  activation ratios (``activation_ratio`` over all expert neurons, ``activation_ratio_ran``
  over the neurons of the experts that ran).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .moe import moe_layers
from .probe import SparsityProbe
from .rules import (
    CETTRule,
    FATRule,
    ReLURule,
    RoutedExpertsRule,
    SparsityRule,
    TopKRule,
)

__all__ = ["PLACE_RULES", "SWEEP_RULES", "experts_for", "fat_eps_for", "pareto_from_search", "pareto_sweep"]

COLUMNS = ["rule", "value", "activation_ratio", "ppl", "ppl_ratio"]
MOE_COLUMNS = [*COLUMNS, "activation_ratio_ran"]  # MoE models: also the ratio over the experts that ran

# rule family -> how one sweep value becomes a rule on a probe (``kw``: extra rule arguments).
SWEEP_RULES: dict[str, Callable[[SparsityProbe, float, dict], SparsityRule]] = {
    "cett": lambda probe, v, kw: CETTRule(probe.thresholds_for(v)[0]),  # v = CETT target, exact thresholds
    "topk": lambda probe, v, kw: TopKRule(v, **kw),  # v = kept ratio; kw: score, scope
    "fat": lambda probe, v, kw: FATRule(v),  # v = eps on |act(W_gate x)|
    "relu": lambda probe, v, kw: ReLURule(),  # one point: a_i != 0
    "experts": lambda probe, v, kw: RoutedExpertsRule(int(v)),  # v = routed experts per token (MoE, Fig. 2)
}


def experts_for(probe: SparsityProbe, activation_ratios: Sequence[float]) -> list[int]:
    """The numbers of routed experts ``k`` whose all-expert activation ratio is nearest each of
    ``activation_ratios``: with every neuron of the k experts that ran kept, a layer's ratio is
    ``(k d_expert + d_shared) / (E d_expert + d_shared)`` (dense layers: 1); averaged over layers.
    Distinct values, ascending."""
    layers = moe_layers(probe.sites)
    if not layers:
        raise ValueError(f"{probe.name} has no MoE layer: the number of routed experts applies to MoE models")
    most = min(m.num_experts for m in layers)
    ratio = {k: sum((k * m.d_expert + m.d_shared) / m.d_ff for m in layers) / len(layers) for k in range(1, most + 1)}
    dense = len(probe.sites) - len(layers)  # dense FFN layers of the model count 1
    ratio = {k: (r * len(layers) + dense) / len(probe.sites) for k, r in ratio.items()}
    out = set()
    for r in activation_ratios:
        if not 0 < r <= 1:
            raise ValueError(f"activation ratios must be in (0, 1], got {r!r}")
        out.add(min(ratio, key=lambda k: abs(ratio[k] - r)))
    return sorted(out)


def fat_eps_for(probe: SparsityProbe, activation_ratios: Sequence[float], *, tokens: int = 1024) -> list[float]:
    """The FAT-eps values at which the dense model's activation ratio (the fraction of gate
    scores ``|act(W_gate x)_i| > eps``, averaged over layers) is each of ``activation_ratios``,
    read from the gate scores of about ``tokens`` tokens spread over every block
    (:meth:`~sparsing_utils.probe.SparsityProbe.gate_histogram`: the same tokens and the same
    eps for any split of the blocks over processes; one dense forward without the LM head;
    resolution 1/256 decade in eps). A guide for placing sweep points: the sparse pass then
    measures the ratio the sparsified model actually has (upstream truncation moves it a little).
    """
    hist = probe.gate_histogram(tokens)
    counts, zeros = hist.counts.double().cpu(), hist.zeros.double().cpu()  # [L, bins], [L]
    total = (counts.sum(dim=1) + zeros).clamp_min(1).unsqueeze(1)  # [L, 1]
    at_most = (zeros.unsqueeze(1) + counts.cumsum(dim=1)) / total  # [L, bins] fraction <= each bin's upper edge
    above = 1.0 - at_most.mean(dim=0)  # [bins] mean activation ratio at each edge, non-increasing
    width = (hist.LOG_MAX - hist.LOG_MIN) / hist.BINS
    edges = 10 ** (hist.LOG_MIN + (torch.arange(hist.BINS, dtype=torch.float64) + 1) * width)  # [bins]
    nonzero = float(1.0 - (zeros.unsqueeze(1) / total).mean())  # the ratio at eps = 0
    out = []
    for r in activation_ratios:
        if not 0 < r <= 1:
            raise ValueError(f"activation ratios must be in (0, 1], got {r!r}")
        if r >= nonzero:
            out.append(0.0)
            continue
        b = int(torch.searchsorted(-above.contiguous(), torch.tensor([-r], dtype=torch.float64)).clamp_max(hist.BINS - 1))
        out.append(float(edges[b]))
    return out


# rule family -> sweep values whose points land near the given activation ratios.
PLACE_RULES: dict[str, Callable[[SparsityProbe, Sequence[float], dict], list[float]]] = {
    "topk": lambda probe, ratios, kw: [float(r) for r in ratios],  # k / d_ff is the activation ratio itself
    "fat": lambda probe, ratios, kw: fat_eps_for(probe, ratios),
    "experts": lambda probe, ratios, kw: experts_for(probe, ratios),
}


def pareto_sweep(probe: SparsityProbe, rule: str, values: Sequence[float] | None = None, *,
                 activation_ratios: Sequence[float] | None = None, **rule_kw):
    """PPL against activation ratio for one rule family (the Fig. 3 comparison).

    rule: ``"cett"`` (values = CETT targets, exact thresholds), ``"topk"`` (values = kept
    ratios; ``scope="global"`` for the official variant), ``"fat"`` (values = eps),
    ``"relu"`` (one point, no values), ``"experts"`` (MoE models, Fig. 2: values = experts each
    token is routed to). Instead of ``values``, ``activation_ratios`` places the points
    (``"topk"``, ``"fat"``, ``"experts"``: :data:`PLACE_RULES`). Returns a pandas DataFrame with
    columns rule, value, activation_ratio, ppl, ppl_ratio (and activation_ratio_ran for MoE models).
    """
    import pandas as pd

    if rule not in SWEEP_RULES:
        raise ValueError(f"unknown rule {rule!r}: use {', '.join(repr(r) for r in SWEEP_RULES)}")
    if activation_ratios is not None:
        if values is not None:
            raise ValueError("give either values or activation_ratios, not both")
        if rule not in PLACE_RULES:
            raise ValueError(f"points of {rule!r} cannot be placed by activation ratio: pass values"
                             + (" (or take the search's points: pareto_from_search)" if rule == "cett" else ""))
        if len(activation_ratios) == 0:
            raise ValueError(f"pareto_sweep({rule!r}) needs a list of activation ratios")
        values = PLACE_RULES[rule](probe, list(activation_ratios), rule_kw)
    if rule == "relu":
        values = [0.0]
    if values is None or len(values) == 0:
        raise ValueError(f"pareto_sweep({rule!r}) needs a list of values")
    probe.prepare()
    rows = []
    for v in values:
        r = SWEEP_RULES[rule](probe, float(v), rule_kw)
        s = probe.sparse_pass(r, per_token=False)
        rows.append({"rule": r.name, "value": float(v), "activation_ratio": s.activation_ratio, "ppl": s.ppl,
                     "ppl_ratio": s.ppl / probe.dense.ppl, "activation_ratio_ran": s.activation_ratio_ran})
    return pd.DataFrame(rows, columns=MOE_COLUMNS if moe_layers(probe.sites) else COLUMNS)


def pareto_from_search(source):
    """The CETT curve of the Pareto comparison from the points a PPL-p% search already
    evaluated (no new pass): each is the sparse pass at exact thresholds for one CETT target.

    ``source``: a :class:`~sparsing_utils.results.SparsityReport` (its ``search_points``; also
    one loaded from JSON) or an :class:`~sparsing_utils.search.EvaluationTable` (for several
    probes: their mean PPL and activation ratio). Returns the frame of :func:`pareto_sweep`
    (rule ``"cett"``, value = CETT target), sorted by the target.
    """
    import pandas as pd

    points = source.rows() if hasattr(source, "rows") else getattr(source, "search_points", None)
    if points is None:
        raise TypeError(f"expected a SparsityReport or an EvaluationTable, got {type(source).__name__}")
    if not points:
        raise ValueError("no evaluated points: run the PPL-p% search first (measure_probe / search_ppl_p)")
    rows = [{"rule": "cett", "value": float(pt["c"]), "activation_ratio": float(pt["activation_ratio"]),
             "ppl": float(pt["ppl_sparse"]), "ppl_ratio": float(pt["ppl_ratio"]),
             "activation_ratio_ran": pt.get("activation_ratio_ran")} for pt in points]
    moe = all(pt.get("activation_ratio_ran") is not None for pt in points)
    return pd.DataFrame(rows, columns=MOE_COLUMNS if moe else COLUMNS).sort_values("value", ignore_index=True)
