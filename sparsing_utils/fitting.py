"""Fitting the activation-data laws (Luo et al. 2024, arXiv:2411.02335, section 2) with lmfit.

One automatic procedure fits every law to every series; nothing is tuned per model:

1. **validation** of the series (finite, ``D > 0`` in billions of tokens, strictly
   increasing, more points than free parameters), with errors that say how to fix it;
2. a **linearised pre-fit** (variable projection): each law is linear in some of its
   coefficients once the others are fixed (Eq. 4 is linear in ``A0`` and ``exp(b)``
   for fixed ``alpha, c``; Eq. 5 in ``A0, c`` for fixed ``alpha``; ...), so a grid over
   the nonlinear ones with exact least squares for the linear ones maps the whole
   error surface cheaply and its local minima become the **multi-start** points;
3. **Levenberg-Marquardt** polish of every start (``lmfit``, bounded parameters;
   ``c`` is fitted as ``log c``), keep the lowest error;
4. a **bound check**: a parameter close to a bound is pinned there and refitted; if that
   is no worse the fit is reported with the parameter *at the bound* (``at_bound``);
5. goodness of fit (MSE, MAE, AIC, BIC), standard errors from the LM covariance, and a
   seeded **bootstrap** (residual, moving-block residual, or pairs) for every
   coefficient and for the limit ``A0``.

Derived quantities: the limit activation ratio (:attr:`LawFit.limit`), ``dA/dD`` against
the data-to-parameter ratio (Fig. 8, :func:`derivative_vs_data_ratio`), the width-depth
bottleneck (Fig. 5, :func:`fit_bottleneck`), the limit loss (Fig. 12,
:func:`fit_limit_loss`), the fit error against a fixed ``A0`` (:func:`mse_profile`),
forecasting from the first checkpoints (:func:`forecast`).
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import lmfit
import numpy as np

from .jsonio import atomic_write_json
from .laws import (
    PAPER,
    POWER_LAW,
    Law,
    bottleneck_law,
    get_law,
    non_embedding_params,
    published_coefficients,
)

__all__ = [
    "ActivationSeries",
    "LawFit",
    "BottleneckFit",
    "validate_series",
    "series_from_dict",
    "load_series_file",
    "load_activation_series",
    "fit_law",
    "fit_all",
    "fit_series_file",
    "fit_limit_loss",
    "fit_bottleneck",
    "evaluate_params",
    "mse_profile",
    "profile_interval",
    "compare_with_published",
    "compare_laws",
    "forecast",
    "forecast_table",
    "derivative_vs_data_ratio",
    "fits_to_frame",
    "series_overview",
    "derivative_table",
    "derivative_at_ratios",
    "limit_disagreements",
    "limit_vs_first_checkpoints",
    "save_fits",
    "write_json_atomic",
]

TOKENS_PER_UNIT = 1e9  # the laws use D in billions of tokens
BOOTSTRAP_METHODS = ("residual", "block", "pairs")


# ---------------------------------------------------------------------------
# input
# ---------------------------------------------------------------------------
def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def validate_series(D, y, *, n_free: int = 0, ratio: bool = True, names=("D", "A")):
    """Check a series before fitting and return it as two float arrays.

    Raises :class:`ValueError` naming the problem and the fix for: different lengths,
    non-numeric values, NaN/inf, ``D <= 0``, ``D`` not sorted or repeated, too few
    points for ``n_free`` free parameters, and (``ratio=True``) values outside [0, 1].
    """
    dn, yn = names
    try:
        D = np.asarray(D, dtype=float)
        y = np.asarray(y, dtype=float)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{dn} and {yn} must be lists of numbers ({err}); remove text or null entries") from None
    if D.ndim != 1 or y.ndim != 1:
        raise ValueError(f"{dn} and {yn} must be flat 1-D lists, got shapes {D.shape} and {y.shape}")
    if len(D) != len(y):
        raise ValueError(f"{dn} has {len(D)} values but {yn} has {len(y)}; give one {yn} per checkpoint")
    for arr, nm in ((D, dn), (y, yn)):
        if not np.all(np.isfinite(arr)):
            i = _first_bad(~np.isfinite(arr))
            raise ValueError(f"{nm} contains NaN or inf (first at index {i}); drop or fill those checkpoints")
    if np.any(D <= 0):
        i = _first_bad(D <= 0)
        raise ValueError(
            f"{dn} must be positive (the laws use D in billions of tokens), but {dn}[{i}] = {D[i]:g}; "
            "drop the step-0 checkpoint"
        )
    if len(D) > 1:
        step = np.diff(D)
        if np.any(step == 0):
            i = _first_bad(step == 0)
            raise ValueError(
                f"duplicate {dn} = {D[i]:g} at indices {i} and {i + 1}; keep one value per checkpoint "
                "(average or drop the repeats)"
            )
        if np.any(step < 0):
            i = _first_bad(step < 0)
            raise ValueError(
                f"{dn} is not sorted ascending ({dn}[{i}] = {D[i]:g} > {dn}[{i + 1}] = {D[i + 1]:g}); "
                "sort the checkpoints by tokens passed"
            )
    if len(D) <= n_free:
        raise ValueError(
            f"{len(D)} points are too few for a law with {n_free} free parameters; "
            f"give at least {n_free + 1} checkpoints"
        )
    if ratio and (np.any(y < 0) or np.any(y > 1)):
        i = _first_bad((y < 0) | (y > 1))
        raise ValueError(
            f"{yn} must be activation ratios in [0, 1], but {yn}[{i}] = {y[i]:g}; "
            "give fractions, not percentages"
        )
    return D, y


def series_from_dict(obj, *, source: str = "series") -> tuple[np.ndarray, np.ndarray]:
    """Read the paper's series format ``{"token_passed": [...], "activation_ratio": [...]}``.

    Token counts are raw; the returned ``D`` is in **billions** of tokens.
    """
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"{source}: expected a JSON object {{\"token_passed\": [...], \"activation_ratio\": [...]}}, "
            f"got {type(obj).__name__}"
        )
    missing = [k for k in ("token_passed", "activation_ratio") if k not in obj]
    if missing:
        raise ValueError(
            f"{source}: missing key(s) {missing}; the series needs \"token_passed\" (raw token counts) "
            f"and \"activation_ratio\" (one per checkpoint); found keys {sorted(obj)}"
        )
    tokens, ratio = obj["token_passed"], obj["activation_ratio"]
    for k, v in (("token_passed", tokens), ("activation_ratio", ratio)):
        if not isinstance(v, (list, tuple)):
            raise ValueError(f"{source}: \"{k}\" must be a list of numbers, got {type(v).__name__}")
    D, A = validate_series(tokens, ratio, names=("token_passed", "activation_ratio"))
    if D.max() < 1e5:
        warnings.warn(
            f"{source}: token_passed tops out at {D.max():g}; it should hold raw token counts "
            "(it is divided by 1e9 to get billions). Is it already in billions?",
            stacklevel=2,
        )
    return D / TOKENS_PER_UNIT, A


def load_series_file(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Load one series JSON file; return ``(D in billions of tokens, activation ratio)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"series file {path} not found")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); expected {{\"token_passed\": [...], \"activation_ratio\": [...]}}") from None
    return series_from_dict(obj, source=str(path))


@dataclass(frozen=True)
class ActivationSeries:
    """One training run: activation ratio per checkpoint, ``D`` in billions of tokens."""

    name: str
    activation: str
    scale: str
    D: np.ndarray
    A: np.ndarray

    @property
    def law(self) -> str:
        """The paper's law for this activation (Eq. 4 for ReLU, Eq. 5 for SiLU)."""
        return POWER_LAW[self.activation]

    def __len__(self) -> int:
        return len(self.D)


_SERIES_NAME = re.compile(r"^(\d+(?:\.\d+)?)b_(relu|silu)\.json$", re.IGNORECASE)


def load_activation_series(directory: str | os.PathLike) -> list[ActivationSeries]:
    """Load the paper's activation-vs-data points (``<scale>b_<act>.json`` files).

    The authors' curve-fitting data (ten files, 0.1B-1.2B x ReLU/SiLU) are third-party
    data: this reads them from wherever they are and never copies them. Token counts
    are converted to billions. Series come back ordered ReLU then SiLU, small to large.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"activation-vs-data directory {directory} not found (cwd {Path.cwd()}); pass the folder "
            "holding 0.1b_relu.json ... 1.2b_silu.json"
        )
    found = []
    for path in directory.iterdir():
        m = _SERIES_NAME.match(path.name)
        if m:
            D, A = load_series_file(path)
            scale = f"{m.group(1)}B"
            act = m.group(2).lower()
            found.append((act != "relu", float(m.group(1)), ActivationSeries(f"{scale} {act}", act, scale, D, A)))
    if not found:
        raise ValueError(f"no <scale>b_<relu|silu>.json files in {directory}")
    return [s for *_, s in sorted(found, key=lambda t: t[:2])]


# ---------------------------------------------------------------------------
# per-law fitting specification: internal parameters, bounds, linearised pre-fit
# ---------------------------------------------------------------------------
ALPHA_BOUNDS = (0.01, 5.0)


@dataclass(frozen=True)
class _Internal:
    name: str
    lo: float
    hi: float
    public: str  # the public parameter it sets
    log: bool = False  # public = exp(internal)


def _internal_params(law: Law, D: np.ndarray) -> list[_Internal]:
    inf = np.inf
    if law.name == "relu":
        return [
            _Internal("alpha", *ALPHA_BOUNDS, "alpha"),
            _Internal("log_c", -80.0, 20.0, "c", log=True),
            _Internal("b", -100.0, 100.0, "b"),
            _Internal("A0", 0.0, 1.0, "A0"),
        ]
    if law.name == "silu":
        return [
            _Internal("alpha", *ALPHA_BOUNDS, "alpha"),
            _Internal("log_c", -30.0, 10.0, "c", log=True),
            _Internal("A0", 0.0, 1.0, "A0"),
        ]
    if law.name == "log":
        # b = s - D_min with s > 0 keeps a*D + b > 0 on the data (a is held at 1)
        return [
            _Internal("log_s", math.log(D.min()) - 25.0, math.log(D.max()) + 25.0, "b"),
            _Internal("c", -inf, inf, "c"),
            _Internal("A0", -inf, inf, "A0"),
        ]
    if law.name == "sigmoid":
        return [_Internal("a", -inf, inf, "a"), _Internal("c", -inf, inf, "c"), _Internal("d", -inf, inf, "d")]
    if law.name == "loss":
        return [
            _Internal("L0", 0.0, inf, "L0"),
            _Internal("log_k", -30.0, 20.0, "k", log=True),
            _Internal("beta", *ALPHA_BOUNDS, "beta"),
        ]
    raise ValueError(f"no fitting specification for law {law.name!r}")


def _public_from_internal(law: Law, D: np.ndarray, v: Mapping[str, float]) -> dict[str, float]:
    out = dict(law.fixed)
    for ip in _internal_params(law, D):
        val = v[ip.name]
        if ip.log:
            val = math.exp(val)
        elif law.name == "log" and ip.name == "log_s":
            val = math.exp(val) - float(D.min())
        out[ip.public] = float(val)
    return {n: out[n] for n in law.param_names}


def _internal_from_public(law: Law, D: np.ndarray, p: Mapping[str, float]) -> dict[str, float]:
    out = {}
    for ip in _internal_params(law, D):
        val = p[ip.public]
        if ip.log:
            val = math.log(val) if val > 0 else ip.lo
        elif law.name == "log" and ip.name == "log_s":
            s = val + float(D.min())
            val = math.log(s) if s > 0 else ip.lo
        out[ip.name] = float(np.clip(val, ip.lo, ip.hi))
    return out


def _local_minima(sse: np.ndarray, k: int) -> list[tuple[int, ...]]:
    """Indices of the ``k`` lowest local minima (8-neighbourhood) of a 1-D or 2-D grid."""
    s = np.where(np.isfinite(sse), sse, np.inf)
    pad = np.pad(s, 1, constant_values=np.inf)
    is_min = np.ones(s.shape, bool)
    offsets = [(-1,), (1,)] if s.ndim == 1 else [(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1) if (i, j) != (0, 0)]
    for off in offsets:
        sl = tuple(slice(1 + o, 1 + o + n) for o, n in zip(off, s.shape))
        is_min &= s <= pad[sl]
    is_min &= np.isfinite(s)
    idx = np.flatnonzero(is_min.ravel())
    if idx.size == 0:
        if not np.isfinite(s).any():
            return []
        idx = np.array([int(np.argmin(s))])
    idx = idx[np.argsort(s.ravel()[idx], kind="stable")][:k]
    return [np.unravel_index(i, s.shape) for i in idx]


def _affine_ls(g: np.ndarray, y: np.ndarray):
    """Least squares of ``y ~ u + v*g`` along the last axis, for every grid cell of ``g``."""
    gm = g.mean(-1)
    ym = y.mean()
    gc = g - gm[..., None]
    den = np.einsum("...i,...i->...", gc, gc)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.einsum("...i,i->...", gc, y - ym) / den
    u = ym - v * gm
    return u, v


def _scale_ls(g: np.ndarray, r: np.ndarray):
    """Least squares of ``r ~ v*g`` along the last axis."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.einsum("...i,...i->...", g, r) / np.einsum("...i,...i->...", g, g)


def _sse(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        s = ((pred - y) ** 2).sum(-1)
    return np.where(np.isfinite(s), s, np.inf)


def _prefit(law: Law, D, y, fixed: Mapping[str, float], size: int, n_starts: int) -> list[dict]:
    """Linearised pre-fit on a grid of the nonlinear coefficients; returns internal starts."""
    lname = law.name
    starts: list[dict] = []
    with np.errstate(all="ignore"):
        if lname == "relu":
            # A = A0 + B*exp(-c D^alpha), B = exp(b): linear in (A0, B) for fixed (alpha, c);
            # c is gridded through k = c * D_max^alpha, the exponent at the last checkpoint.
            al = np.geomspace(*ALPHA_BOUNDS, size)[:, None]
            kk = np.geomspace(1e-3, 1e2, size)[None, :]
            c = kk / D.max() ** al
            g = np.exp(-c[..., None] * D ** al[..., None])
            if "A0" in fixed:
                A0 = np.full(c.shape, fixed["A0"])
            else:
                A0, _ = _affine_ls(g, y)
                A0 = np.clip(A0, 0.0, 1.0)
            B = _scale_ls(g, y - A0[..., None])
            sse = _sse(A0[..., None] + B[..., None] * g, y)
            sse[~(B > math.exp(-100))] = np.inf
            for i, j in _local_minima(sse, n_starts):
                starts.append({"alpha": al[i, 0], "log_c": math.log(c[i, j]), "b": math.log(B[i, j]), "A0": A0[i, j]})
        elif lname in ("silu", "loss"):
            # silu: A = A0 - c D^-alpha ; loss: L = L0 + k D^-beta  (linear for fixed exponent)
            lim, amp, ex = ("A0", "log_c", "alpha") if lname == "silu" else ("L0", "log_k", "beta")
            sign = -1.0 if lname == "silu" else 1.0
            al = np.geomspace(*ALPHA_BOUNDS, size * 4)
            g = sign * D[None, :] ** (-al[:, None])
            hi = 1.0 if lname == "silu" else np.inf
            if lim in fixed:
                L = np.full(al.shape, fixed[lim])
            else:
                L, _ = _affine_ls(g, y)
                L = np.clip(L, 0.0, hi)
            amp_v = _scale_ls(g, y - L[:, None])
            sse = _sse(L[:, None] + amp_v[:, None] * g, y)
            sse[~(amp_v > 0)] = np.inf
            for (i,) in _local_minima(sse, n_starts):
                starts.append({ex: al[i], amp: math.log(amp_v[i]), lim: L[i]})
        elif lname == "log":
            # A = A0 + c*log(D - D_min + s): linear in (A0, c) for fixed shift s
            s = np.geomspace(D.min() * 1e-4, D.max() * 1e4, size * 4)
            g = np.log(D[None, :] - D.min() + s[:, None])
            A0, cc = _affine_ls(g, y)
            sse = _sse(A0[:, None] + cc[:, None] * g, y)
            for (i,) in _local_minima(sse, n_starts):
                starts.append({"log_s": math.log(s[i]), "c": cc[i], "A0": A0[i]})
        elif lname == "sigmoid":
            # A = a - 1/(1 + exp(c*(D - m))): linear in a for fixed (c, m); d = -c*m
            span = D.max() - D.min()
            mag = np.geomspace(1e-2, 1e2, size // 2) / span
            cg = np.concatenate([-mag[::-1], mag])[:, None]
            m = np.linspace(D.min() - 2 * span, D.max() + span, size)[None, :]
            g = 1.0 / (1.0 + np.exp(np.clip(cg[..., None] * (D - m[..., None]), -700, 700)))
            a = (y + g).mean(-1)
            sse = _sse(a[..., None] - g, y)
            for i, j in _local_minima(sse, n_starts):
                starts.append({"a": a[i, j], "c": cg[i, 0], "d": -cg[i, 0] * m[0, j]})
        else:  # pragma: no cover - guarded by get_law
            raise ValueError(lname)
    specs = {ip.name: ip for ip in _internal_params(law, D)}
    if not starts:
        # no admissible grid point (the data run against the law, e.g. a rising series
        # under Eq. 4): start from the flat curve; the amplitude then ends on its bound
        flat = {"relu": {"alpha": 1.0, "log_c": 0.0, "b": specs["b"].lo if "b" in specs else 0.0},
                "silu": {"alpha": 1.0, "log_c": specs["log_c"].lo if "log_c" in specs else 0.0},
                "loss": {"beta": 1.0, "log_k": specs["log_k"].lo if "log_k" in specs else 0.0}}[lname]
        lim = law.limit_name
        starts.append({**flat, lim: float(fixed.get(lim, np.clip(y.mean(), specs[lim].lo, specs[lim].hi)))})
    return [{k: float(np.clip(v, specs[k].lo, specs[k].hi)) for k, v in st.items()} for st in starts]


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
    specs = _internal_params(law, D)
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
    starts = list(extra_starts) + _prefit(law, D, y, hold, grid, n_starts)
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
        for ip in _internal_params(law, D):
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


def write_json_atomic(obj, path: str | os.PathLike) -> Path:
    """Write ``obj`` (numpy values allowed, NaN as null) to ``path`` atomically."""
    return atomic_write_json(path, _jsonable(obj), indent=2)


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

    def residuals(self) -> np.ndarray:
        return self.y - self.predict(self.D)

    @property
    def ci_contains_limit(self) -> bool | None:
        if self.limit_ci is None or self.limit is None:
            return None
        lo, hi = self.limit_ci
        return bool(lo <= self.limit <= hi)

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
    def from_dict(cls, d: Mapping) -> "LawFit":
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
        return write_json_atomic(self.to_dict(include_data), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LawFit":
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
    block = max(2, int(round(n ** (1 / 3))))
    names = list(law.param_names)
    samples, failed = [], 0
    for _ in range(n_boot):
        Db = D
        if method == "residual":
            yb = fitted + r[rng.integers(0, n, n)]
        elif method == "block":
            starts = rng.integers(0, n - block + 1, int(math.ceil(n / block)))
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
    info = {"method": method, "n": n_boot, "n_ok": int(len(samples)), "n_failed": failed, "seed": seed}
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
    unknown = set(hold) - set(spec.param_names)
    if unknown:
        raise ValueError(f"cannot hold {sorted(unknown)}: law {spec.name} has parameters {spec.param_names}")
    n_free = spec.n_free - len(hold)
    D, A = validate_series(D, A, n_free=n_free, ratio=(spec.name != "loss") if ratio is None else ratio)
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    ips = _internal_params(spec, D)
    hold_int = {}
    for name, val in hold.items():
        ip = next(i for i in ips if i.public == name)
        hold_int[ip.name] = _internal_from_public(spec, D, {**{p: 1.0 for p in spec.param_names}, name: val})[ip.name]
        if not ip.lo <= hold_int[ip.name] <= ip.hi:
            raise ValueError(f"{name} = {val} is outside the admissible range [{ip.lo}, {ip.hi}]")
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
        if ip.log or (spec.name == "log" and ip.name == "log_s"):
            se = math.exp(core.internal[ip.name]) * se
        stderr[ip.public] = float(se)
    bounds = {}
    for ip in ips:
        lo, hi = ip.lo, ip.hi
        if ip.log:
            lo, hi = math.exp(lo), math.exp(hi)
        elif spec.name == "log" and ip.name == "log_s":
            lo, hi = -float(D.min()), math.exp(hi) - float(D.min())
        bounds[ip.public] = (float(lo), float(hi))
    at_bound = [next(i.public for i in ips if i.name == nm) for nm in core.pinned]
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
    """``sparsing fit``: fit a series JSON (raw token counts) and optionally write ``fit.json``."""
    get_law(law)
    if law == "loss":
        raise ValueError("the series file holds activation ratios; use law relu, silu, log or sigmoid")
    D, A = load_series_file(path)
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
        if spec.name == "relu":  # A0 below every observed point, else the curve cannot pass them
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

    col = column or [c for c in profile.columns if c != "mse"][0]
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


# ---------------------------------------------------------------------------
# tables over many series
# ---------------------------------------------------------------------------
def fits_to_frame(fits: Mapping[str, LawFit]):
    """One row per fit: coefficients, stderr, limit interval, goodness of fit, bound flags."""
    import pandas as pd

    rows = []
    for name, f in fits.items():
        row = {"series": name, "law": f.law, "n_points": f.n_points}
        for p in ("alpha", "b", "c", "A0", "a", "d", "L0", "k", "beta"):
            if p in f.params:
                row[p] = f.params[p]
                row[f"{p}_stderr"] = f.stderr.get(p)
        if f.limit_name:
            lo, hi = f.limit_ci or (np.nan, np.nan)
            row.update({f"{f.limit_name}_lo": lo, f"{f.limit_name}_hi": hi})
        row.update({"mse": f.mse, "mae": f.mae, "aic": f.aic, "bic": f.bic, "at_bound": ", ".join(f.at_bound)})
        rows.append(row)
    return pd.DataFrame(rows)


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


def save_fits(fits: Mapping[str, LawFit], path: str | os.PathLike, extra: Mapping | None = None) -> Path:
    """Write several fits as one JSON object ``{"fits": {name: fit.to_dict()}, ...}`` (atomic)."""
    return write_json_atomic({"fits": {k: f.to_dict() for k, f in fits.items()}, **(extra or {})}, path)


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


def limit_vs_first_checkpoints(series: Sequence[ActivationSeries], drops: Sequence[int] = (0, 1, 2, 3)):
    """Sensitivity of the fitted limit to the earliest checkpoints: refit without the first
    ``k`` checkpoints for each ``k`` in ``drops``; one row per series, ``A0`` per ``k``."""
    import pandas as pd

    rows = []
    for s in series:
        row = {"series": s.name}
        for k in drops:
            f = fit_law(s.D[k:], s.A[k:], s.law, n_bootstrap=0)
            row[f"A0_drop{k}"] = f.params["A0"]
            if f.at_bound:
                row[f"at_bound_drop{k}"] = ", ".join(f.at_bound)
        rows.append(row)
    return pd.DataFrame(rows)


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
    D, A = validate_series(D, A, n_free=spec.n_free, ratio=spec.name != "loss")
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    n = len(D)
    n_train = max(spec.n_free + 1, int(math.ceil(train_fraction * n)))
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
# derived quantities: Fig. 8, Fig. 5, Fig. 12
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
    u, v = _affine_ls(g, y)
    sse = _sse(u[:, None] + v[:, None] * g, y)
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
