"""PPL against activation ratio for one rule family: the Pareto curves of Fig. 3 (Luo et al. 2024).

Every point is one sparse pass of a :class:`~sparsing_utils.probe.SparsityProbe` (the dense
pass is shared), so the rule families are compared on the very same tokens.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from .probe import SparsityProbe
from .rules import CETTRule, FATRule, ReLURule, SparsityRule, TopKRule

__all__ = ["SWEEP_RULES", "pareto_sweep"]

# rule family -> how one sweep value becomes a rule on a probe (``kw``: extra rule arguments).
SWEEP_RULES: dict[str, Callable[[SparsityProbe, float, dict], SparsityRule]] = {
    "cett": lambda probe, v, kw: CETTRule(probe.thresholds_for(v)[0]),  # v = CETT target, exact thresholds
    "topk": lambda probe, v, kw: TopKRule(v, **kw),  # v = kept ratio; kw: score, scope
    "fat": lambda probe, v, kw: FATRule(v),  # v = eps on |act(W_gate x)|
    "relu": lambda probe, v, kw: ReLURule(),  # one point: a_i != 0
}


def pareto_sweep(probe: SparsityProbe, rule: str, values: Sequence[float] | None = None, **rule_kw):
    """PPL against activation ratio for one rule family (the Fig. 3 comparison).

    rule: ``"cett"`` (values = CETT targets, exact thresholds), ``"topk"`` (values = kept
    ratios; ``scope="global"`` for the official variant), ``"fat"`` (values = eps),
    ``"relu"`` (one point, no values). Returns a pandas DataFrame with columns rule, value,
    activation_ratio, ppl, ppl_ratio.
    """
    import pandas as pd

    if rule not in SWEEP_RULES:
        raise ValueError(f"unknown rule {rule!r}: use {', '.join(repr(r) for r in SWEEP_RULES)}")
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
                     "ppl_ratio": s.ppl / probe.dense.ppl})
    return pd.DataFrame(rows)
