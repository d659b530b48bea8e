"""Figures of the metric itself: one token's neuron contributions (the idea of Fig. 1), CETT
curves, per-layer profiles, Pareto curves (Fig. 3; Fig. 2 on MoE models), activation maps, and what
sparsity costs on benchmarks (Tables 1, 4, 5). Re-exported by :mod:`sparsing_utils.plots`, whose
conventions they follow: each function draws on matplotlib axes (created when not given) and returns
the figure.
"""
from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullFormatter

__all__ = [
    "plot_activation_heatmap",
    "plot_cett_curves",
    "plot_layer_profile",
    "plot_moe_pareto",
    "plot_neuron_contributions",
    "plot_pareto",
    "plot_score_drop",
]


def _axes(axes, n: int, figsize):
    """``n`` axes in a row: the given ones, or a new figure's."""
    if axes is None:
        fig, axes = plt.subplots(1, n, figsize=figsize, squeeze=False)
        return fig, list(axes[0])
    axes = list(np.atleast_1d(axes))
    return axes[0].figure, axes


# ---------------------------------------------------------------------------
# The metric (Fig. 1 idea, CETT curves, Fig. 3 Pareto, activation maps)
# ---------------------------------------------------------------------------
def plot_neuron_contributions(norms, eps: float, cett: float | None = None, title: str = "", ax=None):
    """One token's neuron output norms ``|a_i| * ||W_down[:, i]||``, largest first, with the
    truncated tail (norms <= eps) shaded: the idea of the paper's Fig. 1."""
    values = np.sort(np.asarray(norms, dtype=float))[::-1]
    kept = int((values > eps).sum())
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.2))
    x = np.arange(1, len(values) + 1)
    ax.fill_between(x[:kept], values[:kept], color="tab:blue", alpha=0.8, step="mid", label=f"activated ({kept})")
    ax.fill_between(x[kept:], values[kept:], color="tab:red", alpha=0.5, step="mid",
                    label=f"truncated tail ({len(values) - kept})")
    ax.axhline(eps, color="k", lw=0.8, ls="--", label=f"threshold eps = {eps:.3g}")
    ax.set_yscale("log")
    ax.set_xlabel("neurons, sorted by output norm")
    ax.set_ylabel("||n_i||")
    extra = f" (CETT of this token = {cett:.3f})" if cett is not None else ""
    ax.set_title((title + extra).strip())
    ax.legend(fontsize=8)
    return ax.figure


def plot_cett_curves(curve, layers: Sequence[int], results: Sequence = (), guide=None, ax=None, title: str = ""):
    """Mean CETT against the threshold eps for a few layers (log x axis).

    ``curve``: a :class:`~sparsing_utils.cett.CETTCurve`, drawn solid; give the exact one
    (:meth:`~sparsing_utils.probe.SparsityProbe.exact_curve`: all tokens). ``guide``: optionally
    the probe's estimated curve (``probe.curve``: sketch of ``W_down``, first tokens), drawn
    dotted for comparison. ``results``: PPL-p% results (:class:`~sparsing_utils.results.PPLPResult`),
    one circle per layer at its threshold and its exact CETT there (``layer_cett``).
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 4))
    colors = sns.color_palette("viridis", len(layers))
    for color, layer in zip(colors, layers):
        e, c = np.asarray(curve.eps[layer], dtype=float), np.asarray(curve.cett[layer], dtype=float)
        ok = (e > 0) & np.isfinite(c)
        ax.plot(e[ok], c[ok], marker=".", color=color, label=f"layer {layer}")
        if guide is not None:
            ge, gc = np.asarray(guide.eps[layer], dtype=float), np.asarray(guide.cett[layer], dtype=float)
            ax.plot(ge[ge > 0], gc[ge > 0], ls=":", lw=1.2, color=color, alpha=0.8)
        for r in results:
            ax.plot([float(r.thresholds[layer])], [float(r.layer_cett[layer])], "o", mfc="none", color=color, ms=8)
    handles, labels = ax.get_legend_handles_labels()
    if guide is not None:
        handles.append(plt.Line2D([], [], color="0.4", ls=":"))
        labels.append("estimate guiding the search")
    if len(results):
        handles.append(plt.Line2D([], [], color="0.4", ls="", marker="o", mfc="none"))
        labels.append("PPL-" + "/".join(f"{r.p:g}" for r in results) + "% thresholds")
    ax.set_xscale("log")
    ax.set_yscale("log")  # the PPL-p% targets (c of a few percent) sit low on a linear axis
    ax.set_ylim(bottom=1e-3)
    ax.set_xlabel("threshold eps on ||n_i||")
    ax.set_ylabel("mean CETT")
    ax.set_title(title or "CETT grows with the threshold")
    ax.grid(alpha=0.3, which="both")
    ax.legend(handles, labels, fontsize=8)
    return ax.figure


def plot_layer_profile(results: Sequence, axes=None):
    """Per-layer view of PPL-p% results: activation ratio, mean CETT and threshold against the
    layer index, one line per ``p`` (:class:`~sparsing_utils.results.PPLPResult` list)."""
    fig, axes = _axes(axes, 3, (13, 3.6))
    colors = sns.color_palette("viridis", max(1, len(results)))
    panels = (("layer_activation_ratio", "activation ratio", "linear"), ("layer_cett", "mean CETT", "linear"),
              ("thresholds", "threshold eps on ||n_i||", "log"))
    for ax, (key, label, scale) in zip(axes, panels):
        for color, r in zip(colors, results):
            y = np.asarray(getattr(r, key), dtype=float)
            ax.plot(np.arange(len(y)), y, marker=".", color=color, label=f"PPL-{r.p:g}%")
            if key == "layer_activation_ratio":
                ax.axhline(r.activation_ratio, color=color, lw=0.8, ls="--")
            if key == "layer_cett":
                ax.axhline(r.cett, color=color, lw=0.8, ls="--")
        ax.set_yscale(scale)
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_title("activation ratio per layer (dashed: model mean)")
    axes[1].set_title("CETT per layer (dashed: the target c)")
    axes[2].set_title("per-layer threshold")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_pareto(frame, points=None, ax=None):
    """PPL ratio against activation ratio, one line per rule (the paper's Fig. 3; on an MoE model
    the ``"experts"`` rows are Fig. 2's curve of the number of routed experts).

    frame: rows with columns rule, activation_ratio, ppl_ratio; points: optional rows with
    p, activation_ratio, ppl_ratio (the PPL-p% results) to annotate.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 4.2))
    labels = {"cett": "PPL-p% / CETT (ours)", "topk": "Top-k (per token)",
              "topk_global_official": "Top-k (global, official)", "fat": "FAT-eps", "relu": "ReLU zeros",
              "experts": "routed experts top-k (MoE, Fig. 2)"}
    for rule, group in frame.groupby("rule", sort=False):
        g = group.sort_values("activation_ratio")
        ax.plot(g["activation_ratio"], g["ppl_ratio"], marker="o", ms=3, label=labels.get(rule, rule))
    if points is not None:
        for _, r in points.iterrows():
            ax.annotate(f"PPL-{r['p']:g}%", (r["activation_ratio"], r["ppl_ratio"]), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
            ax.plot([r["activation_ratio"]], [r["ppl_ratio"]], "k*", ms=8)
    ax.set_xlabel("activation ratio")
    ax.set_ylabel("PPL sparse / PPL dense")
    ax.set_yscale("log")
    _log_ratio_axis(ax.yaxis)
    ax.grid(alpha=0.3, which="both")
    ax.set_title("Pareto curves: lower-left is better")
    ax.legend(fontsize=8)
    return ax.figure


def _log_ratio_axis(axis) -> None:
    """A log axis of PPL ratios written 1.10, not 1.1 x 10^0."""
    for set_formatter in (axis.set_major_formatter, axis.set_minor_formatter):
        set_formatter(FormatStrFormatter("%.2f"))


def _log_ticks(axis, ticks: Sequence[float], fmt: str) -> None:
    """A log axis labelled at ``ticks`` only (no crowded minor labels over a wide range)."""
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FormatStrFormatter(fmt))
    axis.set_minor_formatter(NullFormatter())


def plot_moe_pareto(frame, axes=None):
    """The paper's Fig. 2 on trained models: PPL against activation for dense and MoE runs side by side.

    frame: :func:`sparsing_utils.runs.pareto_frame` rows (run, rule, value, activation_ratio, ppl,
    ppl_ratio, active_neurons, top_k). Left, the paper's axes: PPL over the model's own dense PPL
    against the activation ratio over all FFN neurons of a layer (an MoE's: over all of its experts).
    Right: absolute PPL against activated FFN neurons per token and layer, where models of different
    total width meet at equal FFN compute. Solid: CETT targets (the PPL-p% rule, inside the experts
    that ran); dashed: the number of experts each token is routed to, every neuron of those experts
    kept (labelled k; a star marks the top-k the model was trained with).
    """
    fig, (left, right) = _axes(axes, 2, (12.5, 4.6))
    names = list(dict.fromkeys(frame["run"]))
    colors = dict(zip(names, sns.color_palette("tab10", len(names))))
    for (run, rule), g in frame.groupby(["run", "rule"], sort=False):
        g = g.sort_values("activation_ratio")
        kw = {"color": colors[run], "ls": "-" if rule == "cett" else "--", "marker": "o" if rule == "cett" else "s",
              "ms": 3.5, "label": f"{run}: " + ("CETT thresholds" if rule == "cett" else "routed experts k")}
        left.plot(g["activation_ratio"], g["ppl_ratio"], **kw)
        right.plot(g["active_neurons"], g["ppl"], **kw)
        if rule != "experts":
            continue
        for r in g[(g["value"] <= 3) | (g["value"] == g["value"].max())].itertuples():  # the rest crowd
            right.annotate(f"k={r.value:g}", (r.active_neurons, r.ppl), fontsize=7, color=colors[run],
                           xytext=(4, 2), textcoords="offset points")
        trained = g[g["value"] == g["top_k"]]
        left.plot(trained["activation_ratio"], trained["ppl_ratio"], "*", color=colors[run], ms=12)
        right.plot(trained["active_neurons"], trained["ppl"], "*", color=colors[run], ms=12)
    left.set_xlabel("activation ratio (over all FFN neurons of a layer; MoE: all experts)")
    left.set_ylabel("PPL / the model's dense PPL")
    left.set_title("the paper's axes (Fig. 2)")
    right.set_xlabel("activated FFN neurons per token and layer")
    right.set_ylabel("PPL (held-out)")
    right.set_title("at equal FFN compute")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    _log_ticks(left.yaxis, [1, 1.5, 2, 3, 5, 10, 20, 50], "%g")
    _log_ticks(right.yaxis, [10, 15, 20, 30, 50, 100, 200, 300, 500], "%g")
    if (frame["rule"] == "experts").any():
        left.plot([], [], "*", color="0.4", ms=10, label="the top-k each MoE was trained with")
    left.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_activation_heatmap(matrix, max_tokens: int = 256, ax=None, title: str = ""):
    """Activation ratio of every (layer, token) pair: a ``[layers, tokens]`` heat map."""
    m = np.asarray(matrix, dtype=float)[:, :max_tokens]
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 3.6))
    sns.heatmap(m, ax=ax, cmap="magma", cbar_kws={"label": "activation ratio"}, xticklabels=32, yticklabels=5)
    ax.set_xlabel("token position")
    ax.set_ylabel("layer")
    ax.set_title(title or "activation ratio per layer and token")
    return ax.figure


# ---------------------------------------------------------------------------
# What sparsity costs on benchmarks (Tables 1, 4, 5)
# ---------------------------------------------------------------------------
def plot_score_drop(ours, paper=None, axes=None):
    """Score drop against activation ratio (left) and the mean drop per task group against p (right).

    ours: :func:`sparsing_utils.evaluation.scores_frame` rows (setting, p, task, group, drop,
    activation_ratio); paper: :func:`sparsing_utils.evaluation.paper_drops` rows (scale, activation,
    p, group, drop), drawn thin (SiLU solid, ReLU dashed) beside our group means - different models,
    so the drops, not the scores, are compared.
    """
    fig, (left, right) = _axes(axes, 2, (12, 4.4))
    colors = dict(zip(sorted(ours["task"].unique()), sns.color_palette("tab10", ours["task"].nunique())))
    for task, g in ours.groupby("task"):
        g = g.sort_values("p")
        left.plot(g["activation_ratio"], g["drop"], marker="o", ms=4, color=colors[task], label=task)
    for _, r in ours[ours["p"] > 0].drop_duplicates("p").iterrows():
        left.annotate(r["setting"], (ours.loc[ours["p"] == r["p"], "activation_ratio"].mean(), 0.97), fontsize=8,
                      xycoords=("data", "axes fraction"), ha="center", va="top", color="0.35")
    left.axhline(0, color="0.6", lw=0.8)
    left.set_xlabel("activation ratio during evaluation (dense = 1)")
    left.set_ylabel("score - dense score (points)")
    left.set_title("what sparsity costs, per task (ours)")
    left.legend(fontsize=7, ncol=2)
    group_colors = {"commonsense": "tab:blue", "reading": "tab:red"}
    ps = sorted(set(ours["p"]) | (set(paper["p"]) if paper is not None else set()))
    pos = {p: i for i, p in enumerate(ps)}
    if paper is not None:
        keys = ["scale", "activation", "p", "group"]
        means = paper.groupby(keys, as_index=False)["drop"].mean()
        for (scale, act, group), g in means.groupby(["scale", "activation", "group"]):
            g = g.sort_values("p")
            right.plot(g["p"].map(pos), g["drop"], color=group_colors.get(group, "0.5"), alpha=0.35, lw=1,
                       ls="-" if act == "silu" else "--")
    mine = ours.groupby(["p", "group"], as_index=False)["drop"].mean()
    for group, g in mine.groupby("group"):
        g = g.sort_values("p")
        right.plot(g["p"].map(pos), g["drop"], color=group_colors.get(group, "k"), lw=2.5, marker="o",
                   label=f"{group} (ours)")
    if paper is not None:
        right.plot([], [], color="0.4", alpha=0.6, lw=1, label="paper, SiLU 0.1-1.2B")
        right.plot([], [], color="0.4", alpha=0.6, lw=1, ls="--", label="paper, ReLU 0.1-1.2B")
    right.set_xticks(range(len(ps)), ["dense" if p == 0 else f"PPL-{p:g}%" for p in ps])
    right.axhline(0, color="0.6", lw=0.8)
    right.set_ylabel("mean drop over the group's tasks (points)")
    right.set_title("commonsense vs reading: ours beside the paper (Table 1 shape)")
    right.legend(fontsize=7)
    fig.tight_layout()
    return fig
