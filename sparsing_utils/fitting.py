"""Fitting the activation-data laws (Luo et al. 2024, arXiv:2411.02335, section 2) with lmfit.

One automatic procedure fits every law to every series; nothing is tuned per model, and what
differs between laws is their entry in :data:`sparsing_utils.laws.LAWS`:

1. **validation** of the series (:mod:`sparsing_utils.series`: finite, ``D > 0`` in billions of
   tokens, strictly increasing, more points than free parameters), with errors that say how to fix it;
2. a **linearised pre-fit** (:mod:`sparsing_utils.prefit`): each law is linear in two of its
   coefficients once the others are fixed, so a grid over the nonlinear ones with exact least
   squares for the linear ones maps the whole error surface; its local minima are the **starts**;
3. **Levenberg-Marquardt** polish of every start (``lmfit``, bounded coordinates of the law's
   table; ``c`` is fitted as ``log c``), keep the lowest error;
4. a **bound check**: a coordinate close to a bound is pinned there and refitted; if that is no
   worse the fit is reported with the parameter *at the bound* (``at_bound``);
5. goodness of fit (MSE, MAE, AIC, BIC), standard errors from the LM covariance, and a
   seeded **bootstrap** (residual, moving-block residual, or pairs) for every
   coefficient and for the limit ``A0``.

How well the data pin the limit down: :func:`mse_profile` (fit error against a fixed ``A0``)
and :func:`profile_interval`. Tables over many series, forecasts and the derived laws of
Figs. 5, 8 and 12 are in :mod:`sparsing_utils.analysis`.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import lmfit
import numpy as np

from .jsonio import atomic_write_json
from .laws import LAWS, PAPER, Law, get_law
from .prefit import prefit_starts
from .series import (
    ActivationSeries,
    check_enough_points,
    load_series_file,
    validate_series,
)

__all__ = [
    "BOOTSTRAP_METHODS",
    "LawFit",
    "evaluate_params",
    "fit_all",
    "fit_law",
    "fit_series_file",
    "mse_profile",
    "profile_interval",
    "save_fits",
]

BOOTSTRAP_METHODS = ("residual", "block", "pairs")


# ---------------------------------------------------------------------------
# a law's coordinates on one series (the table in laws.Law.coords)
# ---------------------------------------------------------------------------
class _Transform(NamedTuple):
    """How a coordinate's value maps to its coefficient (``d0`` = min of the series' D)."""

    coefficient: Callable[[float, float], float]
    value: Callable[[float, float], float | None]  # inverse; None where no value gives the coefficient
    bounds: Callable[[float, float, float], tuple[float, float]]  # the coefficient's range for a box
    slope: Callable[[float], float]  # d coefficient / d value (delta-method standard errors)


_TRANSFORMS = {
    "identity": _Transform(lambda v, d0: v, lambda p, d0: p, lambda lo, hi, d0: (lo, hi), lambda v: 1.0),
    "exp": _Transform(lambda v, d0: math.exp(v), lambda p, d0: math.log(p) if p > 0 else None,
                      lambda lo, hi, d0: (math.exp(lo), math.exp(hi)), math.exp),
    "exp_shift": _Transform(lambda v, d0: math.exp(v) - d0, lambda p, d0: math.log(p + d0) if p + d0 > 0 else None,
                            lambda lo, hi, d0: (-d0, math.exp(hi) - d0), math.exp),
}


@dataclass(frozen=True)
class _Coord:
    name: str
    coefficient: str
    lo: float
    hi: float
    transform: _Transform


def _coords(law: Law, D: np.ndarray) -> list[_Coord]:
    return [_Coord(c.name, c.coefficient, *map(float, c.box(D)), _TRANSFORMS[c.transform]) for c in law.coords]


def _public_from_internal(law: Law, D: np.ndarray, v: Mapping[str, float]) -> dict[str, float]:
    out = dict(law.fixed)
    d0 = float(D.min())
    for c in _coords(law, D):
        out[c.coefficient] = float(c.transform.coefficient(v[c.name], d0))
    return {n: out[n] for n in law.param_names}


def _internal_value(c: _Coord, coefficient: float, D: np.ndarray) -> float:
    val = c.transform.value(coefficient, float(D.min()))
    return float(np.clip(c.lo if val is None else val, c.lo, c.hi))


# ---------------------------------------------------------------------------
# the procedure: pre-fit starts, Levenberg-Marquardt polish, bound check
# ---------------------------------------------------------------------------
@dataclass
class _Core:
    internal: dict
    public: dict
    sse: float
    result: lmfit.minimizer.MinimizerResult | None
    pinned: list


def _residual_fn(law: Law, D, y):
    func = law.func

    def residual(params):
        pub = _public_from_internal(law, D, params.valuesdict())
        with np.errstate(all="ignore"):
            r = func(D, **pub) - y
        return np.where(np.isfinite(r), r, 1e3)

    return residual


def _lm(law: Law, D, y, start: Mapping[str, float], hold: Mapping[str, float], max_nfev: int):
    """One Levenberg-Marquardt polish from ``start`` (internal names) with ``hold`` fixed.

    Values within 1e-7 of the width of their box are set onto the bound (the bounded LM
    transform only approaches a bound asymptotically).
    """
    specs = _coords(law, D)
    params = lmfit.Parameters()
    for ip in specs:
        val = hold.get(ip.name, start[ip.name])
        params.add(ip.name, value=float(val), min=ip.lo, max=ip.hi, vary=ip.name not in hold)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = lmfit.minimize(_residual_fn(law, D, y), params, method="leastsq", max_nfev=max_nfev)
    internal = {}
    for ip in specs:
        v = float(res.params[ip.name].value)
        if np.isfinite(ip.lo) and np.isfinite(ip.hi):
            tol = 1e-7 * (ip.hi - ip.lo)
            v = ip.lo if v - ip.lo <= tol else ip.hi if ip.hi - v <= tol else v
        internal[ip.name] = v
    with np.errstate(all="ignore"):
        r = law.func(D, **_public_from_internal(law, D, internal)) - y
    sse = float(np.sum(r**2)) if np.all(np.isfinite(r)) else np.inf
    return internal, sse, res


def _fit_core(
    law: Law,
    D,
    y,
    *,
    hold: Mapping[str, float] | None = None,
    extra_starts: Iterable[Mapping[str, float]] = (),
    grid: int = 48,
    n_starts: int = 6,
    bound_check: bool = True,
    max_nfev: int = 4000,
) -> _Core:
    hold = dict(hold or {})
    starts = list(extra_starts) + prefit_starts(law, D, y, hold, grid, n_starts)
    best: _Core | None = None
    for st in starts:
        st = {**st, **hold}
        internal, sse, res = _lm(law, D, y, st, hold, max_nfev)
        if best is None or sse < best.sse:
            best = _Core(internal, {}, sse, res, [])
    if best is None:
        raise RuntimeError(f"{law.name}: the pre-fit found no admissible starting point")
    if bound_check:
        best = _pin_bounds(law, D, y, best, hold, max_nfev)
    best.public = _public_from_internal(law, D, best.internal)
    return best


def _pin_bounds(law: Law, D, y, best: _Core, hold: dict, max_nfev: int) -> _Core:
    """Pin parameters that sit near a bound to it; keep the pin if the fit is no worse."""
    for _ in range(3):
        changed = False
        for ip in _coords(law, D):
            if ip.name in hold or ip.name in best.pinned or not (np.isfinite(ip.lo) and np.isfinite(ip.hi)):
                continue
            v = best.internal[ip.name]
            tol = 0.02 * (ip.hi - ip.lo)
            for bound in (ip.lo, ip.hi):
                if abs(v - bound) <= tol:
                    new_hold = {**hold, **{p: best.internal[p] for p in best.pinned}, ip.name: bound}
                    internal, sse, res = _lm(law, D, y, {**best.internal, ip.name: bound}, new_hold, max_nfev)
                    if sse <= best.sse * (1 + 1e-9) + 1e-300:
                        best = _Core(internal, {}, sse, res, best.pinned + [ip.name])
                        changed = True
                    break
        if not changed:
            break
    return best


# ---------------------------------------------------------------------------
# result object
# ---------------------------------------------------------------------------
def _stats(resid: np.ndarray, n_free: int) -> dict[str, float]:
    n = len(resid)
    sse = float(np.sum(resid**2))
    mse = sse / n
    with np.errstate(divide="ignore"):
        ll = n * math.log(mse) if mse > 0 else -np.inf
    return {
        "sse": sse,
        "mse": mse,
        "rmse": math.sqrt(mse),
        "mae": float(np.mean(np.abs(resid))),
        "aic": ll + 2 * n_free,
        "bic": ll + n_free * math.log(n),
    }


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return [_jsonable(v) for v in x.tolist()]
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    return x


@dataclass
class LawFit:
    """A fitted law: coefficients, their errors, goodness of fit, limit and its interval.

    ``params`` uses the paper's names (``alpha, b, c, A0`` for Eq. 4; ``alpha, c, A0``
    for Eq. 5). ``at_bound`` lists coefficients the least-squares optimum pushed onto a
    bound of the search box (``bounds``): such a fit is degenerate in that direction and
    its ``A0`` should be read together with :func:`mse_profile`.
    """

    law: str
    params: dict[str, float]
    stderr: dict[str, float | None]
    fixed: dict[str, float]
    at_bound: list[str]
    bounds: dict[str, tuple[float, float]]
    n_points: int
    n_free: int
    sse: float
    mse: float
    rmse: float
    mae: float
    aic: float
    bic: float
    limit: float | None
    limit_ci: tuple[float, float] | None = None
    ci_level: float = 0.95
    bootstrap_ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    bootstrap: dict = field(default_factory=dict)
    success: bool = True
    message: str = ""
    D: np.ndarray | None = field(default=None, repr=False)
    y: np.ndarray | None = field(default=None, repr=False)
    bootstrap_samples: np.ndarray | None = field(default=None, repr=False)

    # -- the law ------------------------------------------------------------
    @property
    def spec(self) -> Law:
        return get_law(self.law)

    @property
    def limit_name(self) -> str | None:
        return self.spec.limit_name

    def predict(self, D) -> np.ndarray:
        """Evaluate the fitted law at ``D`` (billions of tokens)."""
        return self.spec.func(np.asarray(D, dtype=float), **self.params)

    def derivative(self, D) -> np.ndarray:
        """``dA/dD`` of the fitted law (per billion tokens)."""
        return self.spec.derivative(np.asarray(D, dtype=float), **self.params)

    # -- output ---------------------------------------------------------------
    def to_dict(self, include_data: bool = False) -> dict:
        from . import __version__

        spec = self.spec
        d = {
            "law": self.law,
            "equation": spec.reference,
            "formula": spec.formula,
            "units": {"D": "billions of tokens"},
            **{n: self.params[n] for n in spec.param_names},
            "params": dict(self.params),
            "stderr": dict(self.stderr),
            "fixed": dict(self.fixed),
            "at_bound": list(self.at_bound),
            "bounds": {k: list(v) for k, v in self.bounds.items()},
            "n_points": self.n_points,
            "n_free": self.n_free,
            "mse": self.mse,
            "mae": self.mae,
            "rmse": self.rmse,
            "sse": self.sse,
            "aic": self.aic,
            "bic": self.bic,
            "limit_name": spec.limit_name,
            "limit": self.limit,
            "limit_ci": list(self.limit_ci) if self.limit_ci else None,
            "ci_level": self.ci_level,
            "bootstrap": dict(self.bootstrap),
            "bootstrap_ci": {k: list(v) for k, v in self.bootstrap_ci.items()},
            "success": self.success,
            "message": self.message,
            "reference": PAPER,
            "package_version": __version__,
        }
        # the interval of the limit activation ratio (A0 of Eqs. 4/5; L0 for the loss law);
        # null where the law has no finite limit or no bootstrap was run
        d[f"{spec.limit_name or 'A0'}_ci"] = d["limit_ci"]
        if include_data and self.D is not None:
            d["data"] = {"D": self.D.tolist(), "y": self.y.tolist()}
        return _jsonable(d)

    @classmethod
    def from_dict(cls, d: Mapping) -> LawFit:
        data = d.get("data") or {}
        return cls(
            law=d["law"],
            params={k: float(v) for k, v in d["params"].items()},
            stderr={k: (None if v is None else float(v)) for k, v in d["stderr"].items()},
            fixed=dict(d.get("fixed", {})),
            at_bound=list(d.get("at_bound", [])),
            bounds={
                k: (-np.inf if v[0] is None else v[0], np.inf if v[1] is None else v[1])
                for k, v in d.get("bounds", {}).items()
            },
            n_points=int(d["n_points"]),
            n_free=int(d["n_free"]),
            sse=d["sse"],
            mse=d["mse"],
            rmse=d["rmse"],
            mae=d["mae"],
            aic=d["aic"],
            bic=d["bic"],
            limit=d.get("limit"),
            limit_ci=tuple(d["limit_ci"]) if d.get("limit_ci") else None,
            ci_level=d.get("ci_level", 0.95),
            bootstrap_ci={k: tuple(v) for k, v in d.get("bootstrap_ci", {}).items()},
            bootstrap=dict(d.get("bootstrap", {})),
            success=d.get("success", True),
            message=d.get("message", ""),
            D=np.asarray(data["D"]) if data else None,
            y=np.asarray(data["y"]) if data else None,
        )

    def save(self, path: str | os.PathLike, include_data: bool = False) -> Path:
        """Write :meth:`to_dict` as JSON, atomically."""
        return atomic_write_json(path, self.to_dict(include_data))

    @classmethod
    def load(cls, path: str | os.PathLike) -> LawFit:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def summary(self) -> str:
        """A printable table of the fit."""
        spec = self.spec
        pct = f"{100 * self.ci_level:g}%"
        lines = [
            f"law {self.law} ({spec.reference}, {spec.title}): {spec.formula}   [D in billions of tokens]",
            f"{self.n_points} points, {self.n_free} free parameters",
            f"{'param':<7}{'value':>13}{'stderr':>12}   {pct + ' bootstrap CI':<28}note",
        ]
        for n in spec.param_names:
            se = self.stderr.get(n)
            ci = self.bootstrap_ci.get(n)
            note = "held fixed (not identifiable)" if n in self.fixed else ("AT BOUND" if n in self.at_bound else "")
            ci_s = f"[{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "-"
            se_s = f"{se:.3g}" if se is not None and np.isfinite(se) else "-"
            lines.append(f"{n:<7}{self.params[n]:>13.5g}{se_s:>12}   {ci_s:<28}{note}")
        lines.append(
            f"MSE {self.mse:.4g}   MAE {self.mae:.4g}   AIC {self.aic:.2f}   BIC {self.bic:.2f}"
        )
        if spec.limit_name:
            ci = (
                f", {pct} CI [{self.limit_ci[0]:.4g}, {self.limit_ci[1]:.4g}] "
                f"({self.bootstrap.get('method')} bootstrap, {self.bootstrap.get('n_ok')} resamples, "
                f"seed {self.bootstrap.get('seed')})"
                if self.limit_ci
                else " (no bootstrap)"
            )
            lines.append(f"limit {spec.limit_name} = {self.limit:.5g}{ci}")
        elif self.limit is not None:
            ci = f", {pct} CI [{self.limit_ci[0]:.4g}, {self.limit_ci[1]:.4g}]" if self.limit_ci else ""
            lines.append(f"limit at D -> infinity: {self.limit:.5g}{ci}")
        else:
            lines.append("limit at D -> infinity: none (the law grows without bound)")
        lines.append(
            "at bound: "
            + (
                ", ".join(self.at_bound)
                + "  (the least-squares optimum is degenerate in this direction; see mse_profile)"
                if self.at_bound
                else "none"
            )
        )
        return "\n".join(lines)

    def __str__(self) -> str:  # pragma: no cover - convenience
        return self.summary()


# ---------------------------------------------------------------------------
# the procedure
# ---------------------------------------------------------------------------
def _bootstrap(law: Law, D, y, core: _Core, n_boot: int, seed: int, method: str, level: float):
    if method not in BOOTSTRAP_METHODS:
        raise ValueError(f"bootstrap method {method!r} unknown; choose one of {BOOTSTRAP_METHODS}")
    rng = np.random.default_rng(seed)
    n, p = len(y), law.n_free
    fitted = law.func(D, **core.public)
    resid = y - fitted
    r = (resid - resid.mean()) * math.sqrt(n / max(n - p, 1))
    block = max(2, round(n ** (1 / 3)))
    names = list(law.param_names)
    samples, failed = [], 0
    for _ in range(n_boot):
        Db = D
        if method == "residual":
            yb = fitted + r[rng.integers(0, n, n)]
        elif method == "block":
            starts = rng.integers(0, n - block + 1, math.ceil(n / block))
            yb = fitted + r[(starts[:, None] + np.arange(block)).ravel()[:n]]
        else:  # pairs
            idx = np.sort(rng.integers(0, n, n))
            Db, yb = D[idx], y[idx]
            if len(np.unique(Db)) <= p:
                failed += 1
                continue
        try:
            c = _fit_core(law, Db, yb, extra_starts=[core.internal], grid=24, n_starts=1, bound_check=False, max_nfev=1500)
        except Exception:  # a resample that cannot be fitted is counted, not fatal
            failed += 1
            continue
        lim = law.limit(c.public) if law.limit_name is None else c.public[law.limit_name]
        samples.append([c.public[k] for k in names] + [lim])
    samples = np.asarray(samples, dtype=float).reshape(-1, len(names) + 1)
    q = [(1 - level) / 2, (1 + level) / 2]
    cis = {}
    if len(samples) >= 2:
        for j, k in enumerate(names):
            if k in law.fixed:
                continue
            col = samples[:, j]
            col = col[np.isfinite(col)]
            if len(col) >= 2:
                cis[k] = tuple(float(v) for v in np.quantile(col, q))
        col = samples[:, -1]
        col = col[np.isfinite(col)]
        lim_ci = tuple(float(v) for v in np.quantile(col, q)) if len(col) >= 2 else None
    else:
        lim_ci = None
    info = {"method": method, "n": n_boot, "n_ok": len(samples), "n_failed": failed, "seed": seed}
    if method == "block":
        info["block_length"] = block
    return cis, lim_ci, info, samples


def fit_law(
    D,
    A,
    law: str | Law = "relu",
    *,
    n_bootstrap: int = 200,
    seed: int = 0,
    bootstrap: str = "residual",
    level: float = 0.95,
    n_starts: int = 6,
    hold: Mapping[str, float] | None = None,
    ratio: bool | None = None,
) -> LawFit:
    """Fit one law to one series with the automatic procedure (module docstring).

    Parameters
    ----------
    D, A : increasing training tokens **in billions** and the activation ratio there.
    law : ``"relu"`` (Eq. 4), ``"silu"`` (Eq. 5), ``"log"``, ``"sigmoid"`` or ``"loss"``.
    n_bootstrap : resamples for the intervals (0 skips the bootstrap).
    bootstrap : ``"residual"`` (default), ``"block"`` (moving-block residuals, for
        autocorrelated checkpoints) or ``"pairs"``.
    hold : coefficients to hold fixed, e.g. ``{"A0": 0.07}`` (used by :func:`mse_profile`).
    ratio : check that ``A`` lies in [0, 1] (default: yes, except for the loss law).
    """
    spec = get_law(law)
    hold = dict(hold or {})
    unknown = set(hold) - set(spec.free_names)
    if unknown:
        raise ValueError(f"cannot hold {sorted(unknown)}: law {spec.name} fits {spec.free_names}"
                         + (f" (and holds {dict(spec.fixed)} already)" if spec.fixed else ""))
    n_free = spec.n_free - len(hold)
    D, A = validate_series(D, A, ratio=spec.ratio if ratio is None else ratio)
    check_enough_points(len(D), spec, len(hold))
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0 (0 skips the bootstrap), got {n_bootstrap}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    ips = _coords(spec, D)
    hold_int = {}
    for name, val in hold.items():
        ip = next(i for i in ips if i.coefficient == name)
        lo, hi = ip.transform.bounds(ip.lo, ip.hi, float(D.min()))
        if not lo <= val <= hi:
            raise ValueError(f"{name} = {val} is outside its admissible range [{lo:g}, {hi:g}] for law {spec.name}")
        hold_int[ip.name] = _internal_value(ip, val, D)
    core = _fit_core(spec, D, A, hold=hold_int, n_starts=n_starts)
    res = core.result
    stats = _stats(A - spec.func(D, **core.public), n_free)
    stderr = {n: None for n in spec.param_names}
    for ip in ips:  # LM covariance, carried to the paper's parametrisation by the delta method
        if ip.name in hold_int or ip.name in core.pinned or res is None:
            continue
        se = res.params[ip.name].stderr
        if se is None or not np.isfinite(se):
            continue
        stderr[ip.coefficient] = float(ip.transform.slope(core.internal[ip.name]) * se)
    bounds = {ip.coefficient: tuple(map(float, ip.transform.bounds(ip.lo, ip.hi, float(D.min())))) for ip in ips}
    at_bound = [next(i.coefficient for i in ips if i.name == nm) for nm in core.pinned]
    limit = spec.limit(core.public)
    fit = LawFit(
        law=spec.name,
        params=core.public,
        stderr=stderr,
        fixed={**spec.fixed, **hold},
        at_bound=at_bound,
        bounds=bounds,
        n_points=len(D),
        n_free=n_free,
        limit=None if limit is None or not np.isfinite(limit) else float(limit),
        ci_level=level,
        success=bool(res.success) if res is not None else False,
        message=(res.message if res is not None else "") or "",
        D=D,
        y=A,
        **stats,
    )
    if n_bootstrap and not hold:
        cis, lim_ci, info, samples = _bootstrap(spec, D, A, core, n_bootstrap, seed, bootstrap, level)
        fit.bootstrap_ci, fit.limit_ci, fit.bootstrap, fit.bootstrap_samples = cis, lim_ci, info, samples
        if fit.limit is None:
            fit.limit_ci = None  # no finite limit (the logarithmic law grows without bound)
    return fit


def fit_all(
    series: Sequence[ActivationSeries],
    law: str | None = None,
    *,
    n_bootstrap: int = 200,
    seed: int = 0,
    bootstrap: str = "residual",
    level: float = 0.95,
) -> dict[str, LawFit]:
    """Fit every series with the same procedure; ``law=None`` uses the paper's law per activation."""
    return {
        s.name: fit_law(s.D, s.A, law or s.law, n_bootstrap=n_bootstrap, seed=seed, bootstrap=bootstrap, level=level)
        for s in series
    }


def fit_series_file(
    path: str | os.PathLike,
    law: str = "relu",
    out: str | os.PathLike | None = None,
    n_bootstrap: int = 200,
    seed: int = 0,
    bootstrap: str = "residual",
) -> LawFit:
    """``sparsing fit``: fit a series JSON (raw token counts) and optionally write ``fit.json``.

    Every check (law, options, the series and its length) runs before the fit."""
    spec = get_law(law)
    if not spec.ratio:
        usable = ", ".join(n for n, lw in LAWS.items() if lw.ratio)
        raise ValueError(f"a series file holds activation ratios, which law {spec.name} does not model; use {usable}")
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0 (0 skips the bootstrap), got {n_bootstrap}")
    D, A = load_series_file(path)
    try:
        check_enough_points(len(D), spec)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    fit = fit_law(D, A, law, n_bootstrap=n_bootstrap, seed=seed, bootstrap=bootstrap)
    if out is not None:
        fit.save(out)
    return fit


def evaluate_params(D, A, law: str | Law, params: Mapping[str, float]) -> dict[str, float]:
    """Goodness of fit of given coefficients (e.g. the paper's Table 2) on a series."""
    spec = get_law(law)
    D = np.asarray(D, dtype=float)
    A = np.asarray(A, dtype=float)
    full = {**spec.fixed, **{k: float(v) for k, v in params.items() if k in spec.param_names}}
    missing = [n for n in spec.param_names if n not in full or not np.isfinite(full[n])]
    if missing:
        raise ValueError(f"coefficients for law {spec.name} lack {missing}")
    return _stats(A - spec.func(D, **full), spec.n_free)


# ---------------------------------------------------------------------------
# how well is the limit pinned down
# ---------------------------------------------------------------------------
def mse_profile(
    D,
    A,
    law: str | Law = "relu",
    values: Sequence[float] | None = None,
    *,
    include: Iterable[float] = (),
    n: int = 41,
    fit: LawFit | None = None,
):
    """Fit error against a fixed limit (``A0``, or ``L0`` for the loss law).

    For every value the other coefficients are refitted with the same procedure.
    Returns a DataFrame with the fixed value, ``mse`` and the refitted coefficients.
    Without ``values`` the grid spans the free fit's ``A0`` (and its interval), the
    points in ``include`` (e.g. the published ``A0``), and some margin.
    """
    import pandas as pd

    spec = get_law(law)
    if spec.limit_name is None:
        raise ValueError(f"law {spec.name} has no finite limit coefficient to profile; use relu, silu or loss")
    lim = spec.limit_name
    if values is None:
        fit = fit or fit_law(D, A, spec, n_bootstrap=0)
        pts = [fit.params[lim], *(fit.limit_ci or ()), *include]
        lo, hi = min(pts), max(pts)
        pad = max(hi - lo, 0.02 * abs(fit.params[lim]), 1e-4)
        lo_b, hi_b = fit.bounds[lim]
        if spec.above_limit:  # the curve lies above its limit: a limit above the lowest point cannot pass it
            hi_b = min(hi_b, float(np.min(A)))
        values = np.linspace(max(lo - pad, lo_b), min(hi + pad, hi_b), n)
        values = np.unique(np.append(values, fit.params[lim]))  # the free optimum itself
    rows = []
    for v in np.asarray(values, dtype=float):
        try:
            f = fit_law(D, A, spec, n_bootstrap=0, hold={lim: float(v)}, n_starts=4)
            rows.append({lim: float(v), "mse": f.mse, **{k: f.params[k] for k in spec.param_names if k != lim}})
        except (ValueError, RuntimeError):
            rows.append({lim: float(v), "mse": np.nan})
    return pd.DataFrame(rows)


def profile_interval(profile, n_points: int, level: float = 0.95, column: str | None = None):
    """Likelihood-ratio interval from :func:`mse_profile`: where ``n*log(MSE/MSE_min)`` stays
    below the chi-square(1) quantile. Returns ``(low, high)``; an end that reaches the edge of
    the profiled grid is reported as that edge (the interval may be wider)."""
    from scipy.stats import chi2

    col = column or next(c for c in profile.columns if c != "mse")
    x = profile[col].to_numpy(float)
    m = profile["mse"].to_numpy(float)
    ok = np.isfinite(m)
    order = np.argsort(x[ok])
    x, m = x[ok][order], m[ok][order]
    excess = n_points * np.log(m / m.min()) - chi2.ppf(level, 1)
    i = int(np.argmin(m))
    lo_i, hi_i = i, i
    while lo_i > 0 and excess[lo_i - 1] <= 0:
        lo_i -= 1
    while hi_i < len(x) - 1 and excess[hi_i + 1] <= 0:
        hi_i += 1

    def cross(a, b):  # linear interpolation of the threshold crossing between grid points
        return x[a] + (x[b] - x[a]) * (0 - excess[a]) / (excess[b] - excess[a])

    low = cross(lo_i, lo_i - 1) if lo_i > 0 else x[0]
    high = cross(hi_i, hi_i + 1) if hi_i < len(x) - 1 else x[-1]
    return float(low), float(high)


def save_fits(fits: Mapping[str, LawFit], path: str | os.PathLike, extra: Mapping | None = None) -> Path:
    """Write several fits as one JSON object ``{"fits": {name: fit.to_dict()}, ...}`` (atomic)."""
    return atomic_write_json(path, _jsonable({"fits": {k: f.to_dict() for k, f in fits.items()}, **(extra or {})}))
