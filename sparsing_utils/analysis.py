"""Analyses built on the fits (Luo et al. 2024, arXiv:2411.02335, section 2): the tables of
notebook 02, forecasts, and the derived laws of Figs. 5, 8 and 12.

- Table 2 side by side (:func:`compare_with_published`), and why rows differ: the MSE profile
  where the published ``A0`` falls outside our interval (:func:`limit_disagreements`) and the
  refit without the first ``k`` checkpoints (:func:`drop_first_refits`, :func:`closest_drop_k`);
- the model comparison of section 2 (:func:`compare_laws`);
- forecasting the rest of a run from its first checkpoints (:func:`forecast`, :func:`forecast_table`);
- Fig. 8: the slope against the data-to-parameter ratio (:func:`derivative_vs_data_ratio`);
- Fig. 5: the width-depth bottleneck (:func:`fit_bottleneck`); Fig. 12: the limit loss
  (:func:`fit_limit_loss`).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import lmfit
import numpy as np

from .fitting import LawFit, evaluate_params, fit_law, mse_profile, profile_interval
from .laws import (
    Law,
    bottleneck_law,
    get_law,
    non_embedding_params,
    published_coefficients,
)
from .prefit import affine_lstsq, sum_squares
from .series import (
    TOKENS_PER_UNIT,
    ActivationSeries,
    check_enough_points,
    validate_series,
)

__all__ = [
    "BottleneckFit",
    "closest_drop_k",
    "compare_laws",
    "compare_with_published",
    "derivative_at_ratios",
    "derivative_table",
    "derivative_vs_data_ratio",
    "drop_first_refits",
    "fit_bottleneck",
    "fit_limit_loss",
    "forecast",
    "forecast_table",
    "limit_disagreements",
    "series_overview",
]


def series_overview(series: Sequence[ActivationSeries]):
    """One row per series: number of checkpoints, token range (billions), first and last ratio."""
    import pandas as pd

    return pd.DataFrame(
        [
            {
                "series": s.name,
                "activation": s.activation,
                "scale": s.scale,
                "law": f"{s.law} ({get_law(s.law).reference})",
                "n_points": len(s),
                "D_min": float(s.D.min()),
                "D_max": float(s.D.max()),
                "A_first": float(s.A[0]),
                "A_last": float(s.A[-1]),
            }
            for s in series
        ]
    )


# ---------------------------------------------------------------------------
# Table 2 and where it differs
# ---------------------------------------------------------------------------
def compare_with_published(series: Sequence[ActivationSeries], fits: Mapping[str, LawFit], data_dir=None):
    """Our coefficients beside Table 2 of the paper, each MSE next to the published one's MSE.

    ``A0_pub_in_ci`` says whether the published ``A0`` lies in our bootstrap interval.
    """
    import pandas as pd

    pub = published_coefficients(data_dir)
    rows = []
    for s in series:
        f = fits[s.name]
        p = pub.get((s.activation, s.scale))
        row = {"activation": s.activation, "scale": s.scale, "n_points": len(s)}
        for k in ("alpha", "b", "c", "A0"):
            row[k] = f.params.get(k, np.nan)
        lo, hi = f.limit_ci or (np.nan, np.nan)
        row.update({"A0_lo": lo, "A0_hi": hi, "mse": f.mse})
        if p is not None:
            ev = evaluate_params(s.D, s.A, f.law, p)
            row["mse_published"] = ev["mse"]
            row["mse_ratio"] = f.mse / ev["mse"]
            for k in ("alpha", "b", "c", "A0"):
                row[f"{k}_pub"] = p.get(k, np.nan)
            row["A0_pub_in_ci"] = bool(lo <= p["A0"] <= hi) if np.isfinite(lo) else None
        row["at_bound"] = ", ".join(f.at_bound)
        rows.append(row)
    return pd.DataFrame(rows)


def limit_disagreements(
    series: Sequence[ActivationSeries],
    fits: Mapping[str, LawFit],
    table=None,
    *,
    n: int = 31,
    data_dir=None,
):
    """Where the published ``A0`` falls outside our bootstrap interval, show why.

    For each such series: the MSE profile in ``A0`` (:func:`mse_profile`, spanning both
    values), the MSE with ``A0`` held at the published value and every other coefficient
    refitted, and the likelihood-ratio interval of the profile. Returns
    ``(summary DataFrame, {series name: profile DataFrame})``.
    """
    import pandas as pd

    table = compare_with_published(series, fits, data_dir) if table is None else table
    by_name = {s.name: s for s in series}
    rows, profiles = [], {}
    for r in table.itertuples(index=False):
        name = f"{r.scale} {r.activation}"
        if r.A0_pub_in_ci is None or bool(r.A0_pub_in_ci):
            continue
        s, f = by_name[name], fits[name]
        prof = mse_profile(s.D, s.A, f.law, fit=f, include=[r.A0_pub], n=n)
        at_pub = fit_law(s.D, s.A, f.law, n_bootstrap=0, hold={"A0": float(r.A0_pub)})
        lr = profile_interval(prof, len(s))
        profiles[name] = prof
        rows.append(
            {
                "series": name,
                "A0": f.params["A0"],
                "A0_lo": r.A0_lo,
                "A0_hi": r.A0_hi,
                "A0_pub": r.A0_pub,
                "profile_lo": lr[0],
                "profile_hi": lr[1],
                "mse_fit": f.mse,
                "mse_refit_at_A0_pub": at_pub.mse,
                "mse_published": r.mse_published,
                "mse_increase_at_A0_pub": at_pub.mse / f.mse - 1.0,
                "at_bound": ", ".join(f.at_bound),
            }
        )
    return pd.DataFrame(rows), profiles


def drop_first_refits(series: Sequence[ActivationSeries], drops: Sequence[int] = range(11), data_dir=None):
    """Table 2, explained: refit every series without its first ``k`` checkpoints, for each ``k``
    in ``drops``, and measure how far each refit lies from the published coefficients.

    One row per (series, ``k``): the refit's coefficients beside Table 2's (``<name>_pub``), its
    MSE and the MSE of the published coefficients on the same points (``mse_published``);
    ``max_rel_dev``, the largest of ``|refit - published| / |published|`` over the published
    coefficients, and ``worst``, the coefficient where it is reached; ``curve_gap``, the largest
    ``|A_refit(D) - A_published(D)|`` over all checkpoints of the series; ``at_bound``.
    A ``k`` that leaves too few points for the law raises before any fit.
    """
    import pandas as pd

    pub = published_coefficients(data_dir)
    drops = [int(k) for k in drops]
    if not drops or min(drops) < 0:
        raise ValueError(f"drops must be non-negative checkpoint counts, got {drops}")
    for s in series:
        check_enough_points(len(s) - max(drops), s.law)
    rows = []
    for s in series:
        p = pub[(s.activation, s.scale)]
        law = get_law(s.law)
        published_curve = law.func(s.D, **p)
        for k in drops:
            f = fit_law(s.D[k:], s.A[k:], law, n_bootstrap=0)
            dev = {n: abs(f.params[n] - v) / abs(v) for n, v in p.items()}
            worst = max(dev, key=dev.get)
            rows.append(
                {
                    "series": s.name,
                    "activation": s.activation,
                    "scale": s.scale,
                    "k": k,
                    "n_points": len(s) - k,
                    "D_first": float(s.D[k]),
                    **{n: f.params[n] for n in p},
                    **{f"{n}_pub": v for n, v in p.items()},
                    "max_rel_dev": dev[worst],
                    "worst": worst,
                    "mse": f.mse,
                    "mse_published": evaluate_params(s.D[k:], s.A[k:], law, p)["mse"],
                    "curve_gap": float(np.max(np.abs(f.predict(s.D) - published_curve))),
                    "at_bound": ", ".join(f.at_bound),
                }
            )
    return pd.DataFrame(rows)


def closest_drop_k(refits, rtol: float = 0.01):
    """Per series, the ``k`` of :func:`drop_first_refits` whose refit is closest to Table 2
    (smallest ``max_rel_dev``), and whether it **matches**: every published coefficient
    reproduced within ``rtol`` relative (1% by default: Table 2 prints three significant
    figures, whose rounding is at most 0.5%).

    One row per series: the row of the closest ``k``, plus ``matches``, ``matching_k`` (every
    ``k`` that matches, comma-separated) and ``max_rel_dev_all`` (the deviation of the fit on
    all checkpoints, ``k = 0``, when it was refitted).
    """
    import pandas as pd

    rows = []
    for _, g in refits.groupby("series", sort=False):
        best = g.loc[g["max_rel_dev"].idxmin()].to_dict()
        best["matches"] = bool(best["max_rel_dev"] <= rtol)
        best["matching_k"] = ", ".join(str(k) for k in g.loc[g["max_rel_dev"] <= rtol, "k"])
        all_points = g[g["k"] == 0]
        best["max_rel_dev_all"] = float(all_points["max_rel_dev"].iloc[0]) if len(all_points) else np.nan
        rows.append(best)
    return pd.DataFrame(rows).reset_index(drop=True)


# ---------------------------------------------------------------------------
# model comparison (section 2)
# ---------------------------------------------------------------------------
def compare_laws(
    series: Sequence[ActivationSeries],
    laws: Sequence[str] = ("power", "log", "sigmoid"),
    fits: Mapping[str, LawFit] | None = None,
):
    """Model comparison (section 2): every law on every series by MSE, MAE, AIC and BIC.

    ``"power"`` means the paper's law for the series (Eq. 4 for ReLU, Eq. 5 for SiLU);
    pass ``fits`` to reuse power-law fits already made. ``n_free`` is the number of
    identifiable coefficients (4 for Eq. 4, 3 for Eq. 5 and for the two alternatives).
    """
    import pandas as pd

    rows = []
    for s in series:
        for lw in laws:
            real = s.law if lw == "power" else lw
            f = fits[s.name] if (fits and lw == "power" and s.name in fits) else fit_law(s.D, s.A, real, n_bootstrap=0)
            rows.append(
                {
                    "series": s.name,
                    "activation": s.activation,
                    "scale": s.scale,
                    "law": "power" if lw == "power" else lw,
                    "equation": f.spec.reference,
                    "n_free": f.n_free,
                    "mse": f.mse,
                    "mae": f.mae,
                    "aic": f.aic,
                    "bic": f.bic,
                    "at_bound": ", ".join(f.at_bound),
                }
            )
    df = pd.DataFrame(rows)
    df["best_aic"] = df.groupby("series")["aic"].transform("min") == df["aic"]
    return df


# ---------------------------------------------------------------------------
# forecasting
# ---------------------------------------------------------------------------
def forecast(
    D,
    A,
    law: str | Law = "relu",
    train_fraction: float = 0.5,
    *,
    n_bootstrap: int = 0,
    seed: int = 0,
    full_fit: LawFit | None = None,
) -> dict:
    """Fit on the first ``train_fraction`` of the checkpoints and predict the rest.

    Returns the split, the errors on the held-out checkpoints (RMSE, MAE, max |error|,
    mean |relative error|, error at the last checkpoint) and the limit from the partial
    fit next to the one from all checkpoints (``full_fit`` reuses a fit already made).
    The partial fit itself is under ``"fit"``.
    """
    spec = get_law(law)
    D, A = validate_series(D, A, ratio=spec.ratio)
    check_enough_points(len(D), spec)
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    n = len(D)
    n_train = max(spec.n_free + 1, math.ceil(train_fraction * n))
    if n_train >= n:
        raise ValueError(
            f"train_fraction {train_fraction} leaves no checkpoint to predict "
            f"({n} points, at least {spec.n_free + 1} needed to fit); lower it or give more checkpoints"
        )
    part = fit_law(D[:n_train], A[:n_train], spec, n_bootstrap=n_bootstrap, seed=seed)
    full = full_fit or fit_law(D, A, spec, n_bootstrap=0)
    pred = part.predict(D[n_train:])
    err = pred - A[n_train:]
    return {
        "law": spec.name,
        "train_fraction": train_fraction,
        "n_train": n_train,
        "n_test": n - n_train,
        "D_train_max": float(D[n_train - 1]),
        "D_max": float(D[-1]),
        "rmse": float(np.sqrt(np.mean(err**2))),
        "mae": float(np.mean(np.abs(err))),
        "max_abs_error": float(np.max(np.abs(err))),
        "mean_rel_error": float(np.mean(np.abs(err) / np.abs(A[n_train:]))),
        "last_error": float(err[-1]),
        "limit_partial": part.limit,
        "limit_full": full.limit,
        "limit_partial_ci": part.limit_ci,
        "at_bound": ", ".join(part.at_bound),
        "fit": part,
    }


def forecast_table(
    series: Sequence[ActivationSeries],
    fractions: Sequence[float] = (0.25, 0.5, 0.75),
    law: str | None = None,
):
    """:func:`forecast` for every series and training fraction, as a DataFrame."""
    import pandas as pd

    rows = []
    for s in series:
        full = fit_law(s.D, s.A, law or s.law, n_bootstrap=0)
        for fr in fractions:
            r = forecast(s.D, s.A, law or s.law, fr, full_fit=full)
            r.pop("fit")
            r.pop("limit_partial_ci")
            rows.append({"series": s.name, "activation": s.activation, "scale": s.scale, **r})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------
# derived quantities: Fig. 8, Fig. 12, Fig. 5
# ---------------------------------------------------------------------------
def derivative_vs_data_ratio(fit: LawFit, n_params: float, D=None, num: int = 200):
    """Fig. 8: the slope of the activation-data curve against the data-to-parameter ratio ``D/N``.

    ``N`` is the non-embedding parameter count (Table 3, :func:`~sparsing_utils.laws.non_embedding_params`);
    ``D/N`` is tokens per parameter. Columns: ``D`` (billions of tokens), ``data_ratio`` (``D/N``),
    ``dA_dD`` (per billion tokens) and ``dA_dratio`` = ``dA/d(D/N)`` = ``dA_dD * N / 1e9``, the
    slope of the curve drawn against ``D/N`` (what Fig. 8 compares across scales).
    ``D`` defaults to the fitted checkpoint range.
    """
    import pandas as pd

    if not n_params > 0:
        raise ValueError(f"n_params must be a positive parameter count, got {n_params}")
    if D is None:
        if fit.D is None:
            raise ValueError("the fit carries no data range; pass D (billions of tokens)")
        D = np.geomspace(fit.D.min(), fit.D.max(), num)
    D = np.asarray(D, dtype=float)
    dA_dD = fit.derivative(D)
    return pd.DataFrame(
        {
            "D": D,
            "data_ratio": D * TOKENS_PER_UNIT / n_params,
            "dA_dD": dA_dD,
            "dA_dratio": dA_dD * n_params / TOKENS_PER_UNIT,
        }
    )


def derivative_table(series: Sequence[ActivationSeries], fits: Mapping[str, LawFit], n_params=None, num: int = 200):
    """Fig. 8 for many series: :func:`derivative_vs_data_ratio` stacked, with series columns.

    ``n_params`` maps scale to non-embedding parameters (default: Table 3 of the paper).
    """
    import pandas as pd

    N = n_params or non_embedding_params()
    frames = []
    for s in series:
        if s.scale not in N:
            raise ValueError(f"no parameter count for scale {s.scale}; pass n_params={{'{s.scale}': N}}")
        df = derivative_vs_data_ratio(fits[s.name], N[s.scale], num=num)
        frames.append(df.assign(series=s.name, activation=s.activation, scale=s.scale, n_params=N[s.scale]))
    return pd.concat(frames, ignore_index=True)


def derivative_at_ratios(table, ratios: Sequence[float] = (10, 30, 100, 200), column: str = "dA_dratio"):
    """Read Fig. 8 at fixed data-to-parameter ratios: rows series, columns ``D/N``.

    ``table`` comes from :func:`derivative_table`; values are interpolated in ``log(D/N)``;
    ratios outside a series' checkpoint range are left empty (no extrapolation).
    """
    import pandas as pd

    rows = []
    for name, g in table.groupby("series", sort=False):
        x = np.log(g["data_ratio"].to_numpy(float))
        y = g[column].to_numpy(float)
        row = {"series": name}
        for r in ratios:
            lr = math.log(r)
            row[f"D/N={r:g}"] = float(np.interp(lr, x, y)) if x.min() <= lr <= x.max() else np.nan
        rows.append(row)
    return pd.DataFrame(rows).set_index("series")


def fit_limit_loss(D, L, *, n_bootstrap: int = 200, seed: int = 0, bootstrap: str = "residual") -> LawFit:
    """Fig. 12: fit ``L(D) = L0 + k*D**(-beta)`` to a training-loss curve; ``L0`` is the limit loss."""
    return fit_law(D, L, "loss", n_bootstrap=n_bootstrap, seed=seed, bootstrap=bootstrap, ratio=False)


@dataclass
class BottleneckFit:
    """Fig. 5: ``y = plateau + slope*(min(x, x_b) - x_b)``; ``x_b`` is the bottleneck."""

    slope: float
    x_b: float
    plateau: float
    stderr: dict[str, float | None]
    mse: float
    at_bound: list[str]
    x: np.ndarray = field(repr=False)
    y: np.ndarray = field(repr=False)

    def predict(self, x) -> np.ndarray:
        return bottleneck_law(x, self.slope, self.x_b, self.plateau)

    @property
    def params(self) -> dict[str, float]:
        return {"slope": self.slope, "x_b": self.x_b, "plateau": self.plateau}


def fit_bottleneck(x, y) -> BottleneckFit:
    """Fig. 5: fit "linear up to a bottleneck, flat beyond" to (width-depth ratio, limit A0).

    A scan over the bottleneck position with exact least squares for slope and plateau,
    then a Levenberg-Marquardt polish. ``at_bound`` holds ``x_b`` when the bottleneck
    sits at the end of the data (no plateau, or no rise, was seen).
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D lists of one length, got shapes {x.shape} and {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("x and y contain NaN or inf; drop those models")
    if len(np.unique(x)) < 4:
        raise ValueError(f"the bottleneck fit needs at least 4 distinct x values, got {len(np.unique(x))}")
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    grid = np.linspace(x.min(), x.max(), 400)
    g = np.minimum(x[None, :], grid[:, None]) - grid[:, None]
    u, v = affine_lstsq(g, y)
    sse = sum_squares(u[:, None] + v[:, None] * g, y)
    i = int(np.argmin(sse))
    params = lmfit.Parameters()
    params.add("slope", value=float(v[i]) if np.isfinite(v[i]) else 0.0)
    params.add("x_b", value=float(grid[i]), min=float(x.min()), max=float(x.max()))
    params.add("plateau", value=float(u[i]) if np.isfinite(u[i]) else float(y.mean()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = lmfit.minimize(lambda p: bottleneck_law(x, p["slope"].value, p["x_b"].value, p["plateau"].value) - y, params)
    vals = {k: float(res.params[k].value) for k in ("slope", "x_b", "plateau")}
    if np.sum(res.residual**2) > sse[i]:  # keep the scan's optimum if the polish did not help
        vals = {"slope": float(v[i]), "x_b": float(grid[i]), "plateau": float(u[i])}
    pred = bottleneck_law(x, **vals)
    span = x.max() - x.min()
    at_bound = ["x_b"] if min(abs(vals["x_b"] - x.min()), abs(vals["x_b"] - x.max())) <= 1e-3 * span else []
    stderr = {k: (None if res.params[k].stderr is None or at_bound and k == "x_b" else float(res.params[k].stderr)) for k in vals}
    return BottleneckFit(
        vals["slope"], vals["x_b"], vals["plateau"], stderr, float(np.mean((pred - y) ** 2)), at_bound, x, y
    )
