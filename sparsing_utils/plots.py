"""Figures of the Sparsing Law paper (Luo et al. 2024, arXiv:2411.02335), one function per figure.

Every function draws on matplotlib axes (created when not given), returns the figure,
and never changes global style; :func:`save_figure` writes a figure to an output folder. The laws'
and the training runs' figures are here; the metric's (CETT curves, Pareto curves, per-layer
profiles, benchmark costs) live in :mod:`sparsing_utils.metric_plots` and are re-exported.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

from .metric_plots import (
    _axes,
    plot_activation_heatmap,
    plot_cett_curves,
    plot_layer_profile,
    plot_moe_pareto,
    plot_neuron_contributions,
    plot_pareto,
    plot_score_drop,
)

__all__ = [
    "plot_activation_heatmap",
    "plot_activation_vs_data",
    "plot_bottleneck",
    "plot_cett_curves",
    "plot_derivative_vs_ratio",
    "plot_drop_k",
    "plot_forecast",
    "plot_forecast_errors",
    "plot_layer_profile",
    "plot_limit_loss",
    "plot_limit_vs_params",
    "plot_limit_vs_scale",
    "plot_loss_curves",
    "plot_moe_pareto",
    "plot_mse_profile",
    "plot_mse_profiles",
    "plot_neuron_contributions",
    "plot_neuron_frequency",
    "plot_pareto",
    "plot_repetition",
    "plot_run_activation",
    "plot_score_drop",
    "plot_seed_band",
    "plot_token_ratio_pairs",
    "plot_width_depth_loss",
    "save_figure",
]


# ---------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------
def save_figure(fig, out_dir: str | Path, name: str, dpi: int = 110) -> Path:
    """Save ``fig`` as ``<out_dir>/<name>.png`` (folder created); return the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / (name if name.endswith(".png") else f"{name}.png")
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


_UNITS = {"k": 1e-6, "m": 1e-3, "b": 1.0}


def _scale_value(scale: str) -> float:
    """``"0.1B"`` -> 0.1, ``"1.9M"`` -> 0.0019 (billions of parameters)."""
    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMbB])\s*$", str(scale))
    if not m:
        raise ValueError(f"cannot read a parameter scale from {scale!r}; expected e.g. '0.1B' or '1.9M'")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


def _palette(scales: Sequence[str]) -> dict[str, tuple]:
    uniq = sorted(set(scales), key=_scale_value)
    return dict(zip(uniq, sns.color_palette("viridis", len(uniq))))


# ---------------------------------------------------------------------------
# Laws (Figs. 4, 5, 7, 8, 12)
# ---------------------------------------------------------------------------
def plot_activation_vs_data(series, fits: Mapping, published: Mapping | None = None, axes=None):
    """Fig. 4: activation ratio against training tokens, ReLU and SiLU panels, all scales.

    ``series``: :class:`~sparsing_utils.series.ActivationSeries` list; ``fits``: their
    :class:`~sparsing_utils.fitting.LawFit` by series name (solid curves); ``published``:
    optional Table 2 coefficients ``{(activation, scale): params}`` (dashed grey curves).
    """
    from .laws import get_law

    acts = [a for a in ("relu", "silu") if any(s.activation == a for s in series)]
    fig, axes = _axes(axes, len(acts), (6 * len(acts), 4.2))
    colors = _palette([s.scale for s in series])
    for ax, act in zip(axes, acts):
        for s in (s for s in series if s.activation == act):
            col = colors[s.scale]
            ax.scatter(s.D, s.A, s=12, color=col, alpha=0.75, label=f"{s.scale}")
            grid = np.geomspace(s.D.min(), s.D.max(), 300)
            if s.name in fits:
                ax.plot(grid, fits[s.name].predict(grid), color=col, lw=1.8)
            if published and (act, s.scale) in published:
                law = get_law(s.law)
                ax.plot(grid, law.func(grid, **published[(act, s.scale)]), color="0.45", lw=1, ls="--")
        ax.set_xlabel("training tokens D (billions)")
        ax.set_ylabel("PPL-1% activation ratio")
        ax.set_title(f"{act.upper()} ({'Eq. 4' if act == 'relu' else 'Eq. 5'})")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        handles += [plt.Line2D([], [], color="k", lw=1.8)]
        labels += ["this fit"]
        if published:
            handles += [plt.Line2D([], [], color="0.45", lw=1, ls="--")]
            labels += ["Table 2 (paper)"]
        ax.legend(handles, labels, fontsize=8, ncol=2)
    fig.suptitle("Activation ratio vs training data (cf. Luo et al. 2024, Fig. 4)")
    fig.tight_layout()
    return fig


def plot_limit_vs_scale(table, axes=None):
    """Fig. 7: limit activation ratio ``A0`` against parameter scale, with bootstrap intervals.

    ``table``: :func:`~sparsing_utils.analysis.compare_with_published` output (columns
    ``activation, scale, A0, A0_lo, A0_hi`` and optionally ``A0_pub``).
    """
    acts = [a for a in ("relu", "silu") if (table["activation"] == a).any()]
    fig, axes = _axes(axes, len(acts), (5 * len(acts), 3.8))
    for ax, act in zip(axes, acts):
        t = table[table["activation"] == act]
        x = np.array([_scale_value(s) for s in t["scale"]])
        y = t["A0"].to_numpy(float)
        err = np.vstack([y - t["A0_lo"].to_numpy(float), t["A0_hi"].to_numpy(float) - y])
        ax.errorbar(x, y, yerr=np.clip(err, 0, None), fmt="o-", capsize=4, label="this fit (bootstrap CI)")
        if "at_bound" in t:
            for xi, yi, flag in zip(x, y, t["at_bound"]):
                if "A0" in str(flag):
                    ax.annotate("A0 at bound", (xi, yi), textcoords="offset points", xytext=(6, 4), fontsize=7)
        if "A0_pub" in t:
            ax.plot(x, t["A0_pub"], "s", mfc="none", color="C3", label="Table 2 (paper)")
        ax.set_xlabel("parameter scale (billions)")
        ax.set_ylabel("limit activation ratio A0")
        ax.set_title(act.upper())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Limit activation ratio vs scale (cf. Luo et al. 2024, Fig. 7)")
    fig.tight_layout()
    return fig


def plot_derivative_vs_ratio(frame, y: str = "dA_dratio", axes=None):
    """Fig. 8: the slope of the activation-data curve against the data-to-parameter ratio ``D/N``.

    ``frame`` has columns ``activation, scale, data_ratio`` and ``y`` (one block per series, from
    :func:`~sparsing_utils.analysis.derivative_table`): ``dA_dratio`` (slope against ``D/N``,
    default) or ``dA_dD`` (per billion tokens); an optional ``source`` column (e.g. ours beside the
    paper's) sets the line style. ReLU curves fall (slope < 0), SiLU curves rise
    (slope > 0); both axes are logarithmic, so magnitudes are drawn.
    """
    acts = [a for a in ("relu", "silu") if (frame["activation"] == a).any()]
    fig, axes = _axes(axes, len(acts), (5.5 * len(acts), 4))
    colors = _palette(list(frame["scale"]))
    if "source" not in frame:
        frame = frame.assign(source="")
    styles = dict(zip(dict.fromkeys(frame["source"]), ("-", "--", ":", "-.")))
    for ax, act in zip(axes, acts):
        t = frame[frame["activation"] == act]
        for (scale, src), g in t.groupby(["scale", "source"], sort=False):
            label = f"{scale} ({src})" if src else scale
            ax.plot(g["data_ratio"], np.abs(g[y]), styles[src], color=colors[scale], label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("data-to-parameter ratio D/N (tokens per non-embedding parameter)")
        sign = "-" if act == "relu" else ""
        ax.set_ylabel(f"{sign}dA/d(D/N)" if y == "dA_dratio" else f"{sign}dA/dD (per billion tokens)")
        ax.set_title(act.upper())
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("Convergence speed (cf. Luo et al. 2024, Fig. 8)")
    fig.tight_layout()
    return fig


def plot_mse_profile(profile, fit=None, published: float | None = None, title: str = "", ax=None):
    """Fit error against a fixed limit ``A0`` (all other coefficients refitted).

    Marks the free fit's ``A0`` and its bootstrap interval, and a published value.
    """
    col = next(c for c in profile.columns if c != "mse")
    fig, (ax,) = _axes(ax, 1, (5, 3.6))
    ax.plot(profile[col], profile["mse"], "o-", ms=3)
    if fit is not None:
        ax.axvline(fit.params[col], color="C0", ls=":", label=f"fit {col} = {fit.params[col]:.4g}")
        if fit.limit_ci:
            ax.axvspan(*fit.limit_ci, color="C0", alpha=0.12, label="bootstrap CI")
    if published is not None:
        ax.axvline(published, color="C3", ls="--", label=f"paper {col} = {published:.4g}")
    ax.set_xlabel(f"{col} (held fixed)")
    ax.set_ylabel("MSE of the refitted law")
    ax.set_yscale("log")
    ax.set_title(title or f"MSE profile in {col}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_mse_profiles(profiles: Mapping, fits: Mapping, published: Mapping[str, float] | None = None, ncols: int = 3):
    """:func:`plot_mse_profile` for several series in one figure (``{series name: profile}``)."""
    names = list(profiles)
    if not names:
        fig, ax = plt.subplots(figsize=(4, 1))
        ax.axis("off")
        ax.text(0.5, 0.5, "no disagreement to profile", ha="center", va="center")
        return fig
    ncols = min(ncols, len(names))
    nrows = int(np.ceil(len(names) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows), squeeze=False)
    for ax, name in zip(axes.ravel(), names):
        plot_mse_profile(profiles[name], fits.get(name), (published or {}).get(name), title=name, ax=ax)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    fig.suptitle("Fit error against a fixed limit A0 (other coefficients refitted)")
    fig.tight_layout()
    return fig


def plot_forecast(series, forecasts: Sequence[Mapping], ax=None):
    """Forecast from the first checkpoints: data, and each partial fit extrapolated.

    ``forecasts``: results of :func:`~sparsing_utils.analysis.forecast` (with their ``fit``).
    """
    fig, (ax,) = _axes(ax, 1, (5.5, 3.8))
    ax.scatter(series.D, series.A, s=10, color="0.3", label="checkpoints")
    grid = np.geomspace(series.D.min(), series.D.max(), 300)
    for i, fc in enumerate(forecasts):
        col = f"C{i}"
        ax.plot(grid, fc["fit"].predict(grid), color=col, label=f"fit on first {fc['train_fraction']:.0%}")
        ax.axvline(fc["D_train_max"], color=col, ls=":", lw=1)
    ax.set_xlabel("training tokens D (billions)")
    ax.set_ylabel("activation ratio")
    ax.set_title(f"Forecast, {series.name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_forecast_errors(table, axes=None):
    """Forecasts for every run (the table of :func:`~sparsing_utils.analysis.forecast_table`):
    left, the RMSE on the held-out checkpoints; right, how far the partial fit's limit lies from
    the full fit's, both against the share of checkpoints fitted. One line per run (colour: scale;
    solid ReLU, dashed SiLU); crosses mark partial fits with a coefficient on a bound."""
    fig, axes = _axes(axes, 2, (11, 4))
    colors = _palette(list(table["scale"]))
    styles = {"relu": "-", "silu": "--"}
    gap = (table["limit_partial"] - table["limit_full"]).abs()
    for name, g in table.groupby("series", sort=False):
        act, scale = g["activation"].iloc[0], g["scale"].iloc[0]
        x = g["train_fraction"].to_numpy(float)
        flagged = g["at_bound"].fillna("").astype(str).str.len().to_numpy() > 0
        for ax, y in zip(axes, (g["rmse"].to_numpy(float), gap[g.index].to_numpy(float))):
            ax.plot(x, y, styles.get(act, ":"), marker="o", ms=4, color=colors[scale], label=name)
            if flagged.any():
                ax.plot(x[flagged], y[flagged], "x", ms=9, mew=2, color="k", ls="none")
    axes[0].set_ylabel("RMSE on the held-out checkpoints")
    axes[1].set_ylabel("|A0 (first checkpoints) - A0 (all)|")
    axes[0].set_yscale("log")
    axes[1].set_yscale("symlog", linthresh=1e-3)  # a gap of exactly 0 (both limits on the bound) stays visible
    for ax in axes:
        ax.set_xlabel("share of checkpoints fitted")
        ax.set_xticks(sorted(table["train_fraction"].unique()))
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7, ncol=2)
    axes[1].set_title("x: a coefficient of the partial fit on a bound", fontsize=8)
    fig.suptitle("Forecasting a run from its first checkpoints")
    fig.tight_layout()
    return fig


def plot_drop_k(refits, rtol: float = 0.01, axes=None):
    """Table 2, explained: for each run, how far the refit without the first ``k`` checkpoints
    lies from the published coefficients (largest relative deviation, log scale) against ``k``
    (:func:`~sparsing_utils.analysis.drop_first_refits`). Below the dotted line at ``rtol``
    every published coefficient is reproduced; a star marks each run's closest ``k``."""
    acts = [a for a in ("relu", "silu") if (refits["activation"] == a).any()]
    fig, axes = _axes(axes, len(acts), (5.5 * len(acts), 4))
    colors = _palette(list(refits["scale"]))
    for ax, act in zip(axes, acts):
        t = refits[refits["activation"] == act]
        for scale, g in t.groupby("scale", sort=False):
            ax.plot(g["k"], g["max_rel_dev"], "o-", ms=3, color=colors[scale], label=scale)
            best = g.loc[g["max_rel_dev"].idxmin()]
            ax.plot([best["k"]], [best["max_rel_dev"]], "*", ms=13, color=colors[scale], mec="k")
        ax.axhline(rtol, color="k", ls=":", lw=1, label=f"{rtol:.0%} (match)")
        ax.set_yscale("log")
        ax.set_xticks(sorted(t["k"].unique()))
        ax.set_xlabel("first checkpoints dropped before refitting, k")
        ax.set_ylabel("max |refit - Table 2| / |Table 2|")
        ax.set_title(f"{act.upper()} ({'Eq. 4' if act == 'relu' else 'Eq. 5'})")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("Which refit reproduces Table 2? (star: closest k)")
    fig.tight_layout()
    return fig


def plot_bottleneck(fit, ax=None, xlabel: str = "width-depth ratio (hidden size / layers)", yerr=None,
                    ylabel: str = "limit activation ratio A0", xscale: str = "linear", title: str = ""):
    """Fig. 5: limit activation ratio against width-depth ratio with the bottleneck fit.

    ``yerr``: error bars of the points (one value each, or ``[2, n]`` lower/upper), e.g. the spread
    between seeds; ``xscale="log"`` spreads ratios that span orders of magnitude."""
    fig, (ax,) = _axes(ax, 1, (5, 3.6))
    if yerr is None:
        ax.scatter(fit.x, fit.y, color="C0", zorder=3, label="models")
    else:
        ax.errorbar(fit.x, fit.y, yerr=yerr, fmt="o", color="C0", capsize=4, zorder=3, label="models")
    grid = np.geomspace(fit.x.min(), fit.x.max(), 300) if xscale == "log" else np.linspace(fit.x.min(), fit.x.max(), 300)
    ax.plot(grid, fit.predict(grid), color="C1", label="linear, then flat")
    ax.axvline(fit.x_b, color="C3", ls="--", label=f"bottleneck {fit.x_b:.3g}" + (" (at bound)" if fit.at_bound else ""))
    ax.set_xscale(xscale)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title or "cf. Luo et al. 2024, Fig. 5")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_limit_loss(fits: Mapping, ax=None):
    """Fig. 12: limit training loss ``L0`` per model, with bootstrap intervals.

    ``fits``: ``{label: LawFit}`` from :func:`~sparsing_utils.analysis.fit_limit_loss`.
    """
    fig, (ax,) = _axes(ax, 1, (max(4.0, 0.8 * len(fits) + 2), 3.6))
    labels = list(fits)
    y = np.array([fits[k].params["L0"] for k in labels])
    lo = np.array([(fits[k].limit_ci or (y[i], y[i]))[0] for i, k in enumerate(labels)])
    hi = np.array([(fits[k].limit_ci or (y[i], y[i]))[1] for i, k in enumerate(labels)])
    x = np.arange(len(labels))
    ax.errorbar(x, y, yerr=np.clip(np.vstack([y - lo, hi - y]), 0, None), fmt="o", capsize=4)
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylabel("limit loss L0")
    ax.set_title("Limit of the training loss (cf. Luo et al. 2024, Fig. 12)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------
# Our training runs (Figs. 5-11 on data/runs; tables from sparsing_utils.runs)
# ---------------------------------------------------------------------------
_ACT_STYLE = {"relu": "-", "silu": "--"}


def plot_loss_curves(curves, checkpoints=None, ax=None):
    """Fig. 11 analog: training loss against tokens for every run (colour: size; solid ReLU,
    dashed SiLU); dots: the held-out loss at the checkpoints.

    ``curves``: :func:`~sparsing_utils.runs.loss_curve_frame`; ``checkpoints``:
    :func:`~sparsing_utils.runs.checkpoint_frame` of the same runs (optional)."""
    fig, (ax,) = _axes(ax, 1, (7, 4.2))
    colors = _palette(list(curves["scale"]))
    for run, g in curves.groupby("run", sort=False):
        act, scale = g["activation"].iloc[0], g["scale"].iloc[0]
        ax.plot(g["tokens"], g["loss"], _ACT_STYLE.get(act, ":"), color=colors[scale], lw=1.2,
                label=f"{act.upper()} {scale} (training)")
        if checkpoints is not None:
            c = checkpoints[checkpoints["run"] == run]
            ax.plot(c["tokens"], c["heldout_loss"], "o" if act == "relu" else "s", ms=3, mfc="none",
                    color=colors[scale])
    if checkpoints is not None:
        ax.plot([], [], "o", mfc="none", color="0.4", label="held-out loss at checkpoints")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title("Loss of ReLU and SiLU runs (cf. Luo et al. 2024, Fig. 11)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def plot_run_activation(frame, fits: Mapping[str, Mapping] | None = None, axes=None):
    """Activation ratio against training tokens of our runs, one panel per activation function
    (the analog of Fig. 4). Points: checkpoints (filled before the decay stage, open in it); lines:
    fitted laws, ``fits = {label: {run name: LawFit}}``, one line style per label, each drawn over
    the checkpoints it was fitted to.

    ``frame``: :func:`~sparsing_utils.runs.checkpoint_frame`."""
    acts = [a for a in ("relu", "silu") if (frame["activation"] == a).any()]
    fig, axes = _axes(axes, len(acts), (6 * len(acts), 4.2))
    colors = _palette(list(frame["scale"]))
    styles = dict(zip(fits or {}, ("-", "--", ":", "-.")))
    for ax, act in zip(axes, acts):
        t = frame[frame["activation"] == act]
        for run, g in t.groupby("run", sort=False):
            col = colors[g["scale"].iloc[0]]
            decay = g["stage"] == "decay"
            ax.plot(g["D"][~decay], g["activation_ratio"][~decay], "o", ms=3.5, color=col, label=run)
            ax.plot(g["D"][decay], g["activation_ratio"][decay], "o", ms=4, mfc="none", color=col)
            for label, by_run in (fits or {}).items():
                if run in by_run and by_run[run].D is not None:
                    f = by_run[run]
                    grid = np.geomspace(f.D.min(), f.D.max(), 200)
                    ax.plot(grid, f.predict(grid), styles[label], color=col, lw=1.3)
        ax.set_xscale("log")
        ax.set_xlabel("training tokens D (billions)")
        ax.set_ylabel("PPL-1% activation ratio")
        ax.set_title(f"{act.upper()} ({'Eq. 4' if act == 'relu' else 'Eq. 5'} fitted)")
        ax.grid(alpha=0.3, which="both")
        handles, labels = ax.get_legend_handles_labels()
        for label, style in styles.items():
            handles.append(plt.Line2D([], [], color="k", ls=style))
            labels.append(label)
        handles.append(plt.Line2D([], [], marker="o", mfc="none", color="k", ls="none"))
        labels.append("decay stage (not fitted)")
        ax.legend(handles, labels, fontsize=7)
    fig.suptitle("Activation ratio through training, our runs (cf. Luo et al. 2024, Fig. 4)")
    fig.tight_layout()
    return fig


def plot_seed_band(frame, band, ax=None):
    """The noise floor: the activation-ratio curve of every seed of one config and the band between
    their lowest and highest value at each checkpoint.

    ``frame``: :func:`~sparsing_utils.runs.checkpoint_frame` of the seeds; ``band``:
    :func:`~sparsing_utils.runs.seed_band` of the same runs."""
    fig, (ax,) = _axes(ax, 1, (6, 4))
    ax.fill_between(band["tokens"], band["min"], band["max"], color="0.8", label="min-max over seeds")
    for i, (seed, g) in enumerate(frame.groupby("seed")):
        ax.plot(g["tokens"], g["activation_ratio"], "o-", ms=3, lw=1, color=f"C{i}", label=f"seed {seed}")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("PPL-1% activation ratio")
    ax.set_title(f"Seeds of {frame['run'].iloc[0].rsplit('-seed', 1)[0]}: the noise floor")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_repetition(frame, axes=None):
    """Repetition: activation ratio and held-out loss against tokens for runs on different shares
    of the corpus; a dotted line marks where each run starts its second epoch.

    ``frame``: :func:`~sparsing_utils.runs.checkpoint_frame` of the runs compared."""
    fig, axes = _axes(axes, 2, (11, 4))
    for i, (run, g) in enumerate(frame.groupby("run", sort=False)):
        col = f"C{i}"
        share = g["train_fraction"].iloc[0]
        label = f"{run} ({share:.0%} of the corpus, {g['epochs'].iloc[-1]:.1f} epochs)"
        for ax, y in zip(axes, ("activation_ratio", "heldout_loss")):
            ax.plot(g["tokens"], g[y], "o-", ms=3, color=col, label=label)
            second = g[g["epochs"] >= 1.0]
            if len(second):
                ax.axvline(second["tokens"].iloc[0], color=col, ls=":", lw=1)
    axes[0].set_ylabel("PPL-1% activation ratio")
    axes[1].set_ylabel("held-out loss")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("training tokens (dotted: first checkpoint past one epoch)")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle("Many epochs over a small corpus against one pass over the full corpus")
    fig.tight_layout()
    return fig


def plot_width_depth_loss(table, y: str = "loss", yerr=None, fits: Mapping | None = None, ax=None,
                          ylabel: str = "held-out loss"):
    """Fig. 6: a loss against the width-depth ratio (log x), with error bars ``yerr`` (e.g. the
    seed spread); ``fits``: ``{run: LawFit}`` of the limit loss (:func:`~sparsing_utils.runs.fit_loss_limits`),
    drawn as ``L0`` with its bootstrap interval beside each point.

    ``table``: columns ``run, width_depth_ratio`` and ``y``."""
    fig, (ax,) = _axes(ax, 1, (5.5, 3.8))
    x = table["width_depth_ratio"].to_numpy(float)
    ax.errorbar(x, table[y], yerr=yerr, fmt="o-", capsize=4, color="C0", label=ylabel)
    if fits:
        L0 = np.array([fits[r].params["L0"] for r in table["run"]])
        ci = np.array([fits[r].limit_ci or (np.nan, np.nan) for r in table["run"]], dtype=float)
        err = np.clip(np.vstack([L0 - ci[:, 0], ci[:, 1] - L0]), 0, None)
        ax.errorbar(x * 1.05, L0, yerr=np.nan_to_num(err), fmt="s", mfc="none", capsize=3, color="C3",
                    label="limit loss L0 (bootstrap CI)")
    ax.set_xscale("log")
    ax.set_xlabel("width-depth ratio (hidden size / layers)")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title("cf. Luo et al. 2024, Fig. 6")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_limit_vs_params(frame, axes=None):
    """Fig. 7 across scales: a limit (or final) activation ratio against non-embedding parameters
    (log x), one panel per activation, one marker per ``source`` (e.g. our runs beside the paper's).

    ``frame``: columns ``activation, source, n_params, value`` and optionally ``lo, hi`` (interval)."""
    acts = [a for a in ("relu", "silu") if (frame["activation"] == a).any()]
    fig, axes = _axes(axes, len(acts), (5.5 * len(acts), 4))
    sources = list(dict.fromkeys(frame["source"]))
    markers = dict(zip(sources, "osD^v<>"))
    for ax, act in zip(axes, acts):
        t = frame[frame["activation"] == act]
        for i, src in enumerate(sources):
            g = t[t["source"] == src].sort_values("n_params")
            if g.empty:
                continue
            v = g["value"].to_numpy(float)
            err = None
            if "lo" in g and g["lo"].notna().any():
                err = np.nan_to_num(np.clip(np.vstack([v - g["lo"].to_numpy(float), g["hi"].to_numpy(float) - v]), 0, None))
            ax.errorbar(g["n_params"], v, yerr=err, fmt=markers[src] + "-", lw=0.8, ms=5, capsize=3, color=f"C{i}",
                        mfc="none" if i % 2 else None, label=src)
        ax.set_xscale("log")
        ax.set_xlabel("non-embedding parameters N")
        ax.set_ylabel("activation ratio")
        ax.set_title(act.upper())
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("Limit activation ratio vs scale (cf. Luo et al. 2024, Fig. 7)")
    fig.tight_layout()
    return fig


def plot_neuron_frequency(frame, bins: int = 40, axes=None):
    """Fig. 9: the distribution of per-neuron activation frequency, one line per model size, one
    panel per (activation, domain); the dotted line is the dead-neuron bound (0.1% of tokens).

    ``frame``: :func:`~sparsing_utils.runs.neuron_frequency_frame`."""
    acts = [a for a in ("relu", "silu") if (frame["activation"] == a).any()]
    domains = sorted(frame["domain"].unique())
    if axes is None:
        fig, axes = plt.subplots(len(acts), len(domains), figsize=(5 * len(domains), 3.4 * len(acts)), squeeze=False)
    else:
        axes = np.atleast_2d(axes)
        fig = axes.flat[0].figure
    colors = _palette(list(frame["scale"]))
    edges = np.linspace(0, 1, bins + 1)
    for row, act in zip(axes, acts):
        for ax, dom in zip(row, domains):
            t = frame[(frame["activation"] == act) & (frame["domain"] == dom)]
            for scale, g in t.groupby("scale", sort=False):
                ax.hist(g["frequency"], bins=edges, density=True, histtype="step", lw=1.5, color=colors[scale],
                        label=f"{scale} ({len(g)} neurons)")
            ax.axvline(1e-3, color="k", ls=":", lw=1)
            ax.set_xlabel("activation frequency of a neuron (share of tokens)")
            ax.set_ylabel("density")
            ax.set_title(f"{act.upper()}, {dom}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("Per-neuron activation frequency across sizes (cf. Luo et al. 2024, Fig. 9)")
    fig.tight_layout()
    return fig


def plot_token_ratio_pairs(pairs: Sequence[Mapping], ncols: int = 2):
    """Fig. 10: per-token activation ratios of one model against another on the same tokens, with
    y = x and the Pearson correlation; ``pairs`` from :func:`~sparsing_utils.runs.token_ratio_pair`."""
    ncols = min(ncols, len(pairs))
    nrows = int(np.ceil(len(pairs) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 4.2 * nrows), squeeze=False)
    for ax, p in zip(axes.ravel(), pairs):
        ax.scatter(p["x"], p["y"], s=3, alpha=0.35, color="C0", rasterized=True)
        hi = float(max(np.max(p["x"]), np.max(p["y"]))) * 1.02
        ax.plot([0, hi], [0, hi], "k--", lw=1, label="y = x")
        ax.set_xlim(0, hi)
        ax.set_ylim(0, hi)
        ax.set_aspect("equal")
        ax.set_xlabel(f"{p['a']}: activation ratio per token")
        ax.set_ylabel(f"{p['b']}: activation ratio per token")
        ax.set_title(f"{p['domain']}: r = {p['r']:.2f} ({p['n']} tokens, by {p['by']})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    for ax in axes.ravel()[len(pairs):]:
        ax.axis("off")
    fig.suptitle("Per-token activation ratios across sizes (cf. Luo et al. 2024, Fig. 10)")
    fig.tight_layout()
    return fig
