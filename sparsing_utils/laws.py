"""The activation-data laws of the Sparsing Law paper, and the paper's reference tables.

Luo et al., *Sparsing Law: Towards Large Language Models with Greater Activation
Sparsity*, arXiv:2411.02335 (2024), section 2 ("The laws"). ``D`` is the number of
training tokens in **billions**; ``A`` is the PPL-1% activation ratio.

- :func:`relu_law`    Eq. 4, convergent decreasing logspace power law (ReLU models)
- :func:`silu_law`    Eq. 5, convergent increasing power law (SiLU models)
- :func:`log_law`     the logarithmic alternative the authors compared against
- :func:`sigmoid_law` the sigmoid-like alternative the authors compared against
- :func:`loss_law`    limit of the training loss, ``L0 + k * D**-beta`` (Fig. 12)
- :func:`bottleneck_law` "linear up to a bottleneck, flat beyond" (Fig. 5)

Everything that differs between laws is one entry of :data:`LAWS`: the formula, its
derivative and limit, and how the fitting procedure sees it (the coordinates it moves, their
boxes, and the linearised pre-fit grid). The procedure itself lives in
:mod:`sparsing_utils.fitting`; this module also loads the paper's tables in ``data/``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "ALPHA_BOUNDS",
    "DATA_DIR",
    "LAWS",
    "Coord",
    "Law",
    "Prefit",
    "bottleneck_law",
    "get_law",
    "law_for_activation",
    "log_law",
    "loss_law",
    "non_embedding_params",
    "published_coefficients",
    "read_paper_table",
    "relu_law",
    "sigmoid_law",
    "silu_law",
]

PAPER = "Luo et al. 2024, arXiv 2411.02335"


# ---------------------------------------------------------------------------
# formulas
# ---------------------------------------------------------------------------
def relu_law(D, alpha, b, c, A0):
    """Eq. 4 (ReLU): ``A(D) = exp(-c * D**alpha + b) + A0``, D in billions of tokens."""
    D = np.asarray(D, dtype=float)
    return np.exp(-c * D**alpha + b) + A0


def silu_law(D, alpha, c, A0):
    """Eq. 5 (SiLU): ``A(D) = -c * D**(-alpha) + A0``, D in billions of tokens."""
    D = np.asarray(D, dtype=float)
    return -c * D ** (-alpha) + A0


def log_law(D, a, b, c, A0):
    """Logarithmic alternative of section 2: ``A(D) = A0 + c * log(a*D + b)``.

    Only three of the four coefficients are identifiable, because
    ``c*log(a*D + b) = c*log(a) + c*log(D + b/a)``; the fitter holds ``a = 1``.
    """
    D = np.asarray(D, dtype=float)
    return A0 + c * np.log(a * D + b)


def sigmoid_law(D, a, b, c, d):
    """Sigmoid-like alternative of section 2: ``A(D) = a - 1/(1 + b*exp(c*D + d))``.

    ``b`` and ``d`` are redundant (``b*exp(d)`` is one number); the fitter holds ``b = 1``.
    """
    D = np.asarray(D, dtype=float)
    z = np.clip(c * D + d, -700.0, 700.0)
    return a - 1.0 / (1.0 + b * np.exp(z))


def loss_law(D, L0, k, beta):
    """Limit of the training loss (Fig. 12): ``L(D) = L0 + k * D**(-beta)``."""
    D = np.asarray(D, dtype=float)
    return L0 + k * D ** (-beta)


def bottleneck_law(x, slope, x_b, plateau):
    """Fig. 5: ``y = plateau + slope * (min(x, x_b) - x_b)``.

    Linear in the width-depth ratio ``x`` up to the bottleneck ``x_b``, flat beyond.
    """
    x = np.asarray(x, dtype=float)
    return plateau + slope * (np.minimum(x, x_b) - x_b)


# derivatives with respect to D (Fig. 8 uses dA/dD)
def _relu_dD(D, alpha, b, c, A0):
    D = np.asarray(D, dtype=float)
    return -c * alpha * D ** (alpha - 1.0) * np.exp(-c * D**alpha + b)


def _silu_dD(D, alpha, c, A0):
    D = np.asarray(D, dtype=float)
    return c * alpha * D ** (-alpha - 1.0)


def _log_dD(D, a, b, c, A0):
    D = np.asarray(D, dtype=float)
    return c * a / (a * D + b)


def _sigmoid_dD(D, a, b, c, d):
    D = np.asarray(D, dtype=float)
    e = b * np.exp(np.clip(c * D + d, -700.0, 700.0))
    return c * e / (1.0 + e) ** 2


def _loss_dD(D, L0, k, beta):
    D = np.asarray(D, dtype=float)
    return -k * beta * D ** (-beta - 1.0)


# limits for D -> infinity
def _sigmoid_limit(p):
    if p["c"] > 0:
        return p["a"]
    if p["c"] < 0:
        return p["a"] - 1.0
    return float(sigmoid_law(1.0, **p))


def _log_limit(p):
    return float("inf") * np.sign(p["c"]) if p["c"] != 0 else p["A0"]


# ---------------------------------------------------------------------------
# how the fitting procedure sees a law (sparsing_utils.fitting, sparsing_utils.prefit)
# ---------------------------------------------------------------------------
ALPHA_BOUNDS = (0.01, 5.0)  # box of every power-law exponent (alpha of Eqs. 4/5, beta of the loss law)


@dataclass(frozen=True)
class Coord:
    """One coordinate the optimiser moves, and the law coefficient it sets.

    ``transform`` says how: ``"identity"``; ``"exp"`` (coefficient = exp(value): keeps ``c`` of
    Eqs. 4/5 positive and lets it span orders of magnitude, it is fitted as ``log c``);
    ``"exp_shift"`` (coefficient = exp(value) - min(D): keeps ``D + b > 0`` on the data).
    ``bounds`` is the box of the value, or a function of the series' ``D`` returning it.
    """

    name: str
    coefficient: str
    bounds: tuple[float, float] | Callable[[np.ndarray], tuple[float, float]] = (-np.inf, np.inf)
    transform: str = "identity"

    def box(self, D: np.ndarray) -> tuple[float, float]:
        return self.bounds(D) if callable(self.bounds) else self.bounds


@dataclass(frozen=True)
class Prefit:
    """The linearised pre-fit of a law (:mod:`sparsing_utils.prefit`): the law written as
    ``y = u + v * g(D; theta)``, linear in the offset ``u`` and the slope ``v`` for fixed ``theta``.

    - ``grid(D, size)`` returns ``(theta, g)``: the nonlinear coefficients on a grid (arrays that
      broadcast to the grid's shape) and ``g`` with shape ``[*grid, len(D)]``;
    - ``start(theta, u, v)`` turns one grid point into a start, in the law's :class:`Coord` names;
    - ``offset`` is the coordinate ``u`` stands for; when its box is bounded, ``u`` is clipped into
      it (or held at a value) and ``v`` refitted; otherwise both come from one affine least squares;
    - ``slope``: ``v`` is this constant instead of fitted; ``min_slope``: points with ``v <= min_slope``
      are not admissible;
    - ``flat``: the start when no grid point is admissible (data running against the law), the
      offset added at its held value or the clipped mean of the data.
    """

    grid: Callable[[np.ndarray, int], tuple[dict[str, np.ndarray], np.ndarray]]
    start: Callable[[Mapping[str, float], float, float], dict[str, float]]
    offset: str
    slope: float | None = None
    min_slope: float | None = None
    flat: Mapping[str, float] | None = None


# Eq. 4: A = A0 + B*exp(-c D^alpha), B = exp(b): linear in (A0, B) for fixed (alpha, c); c is gridded
# through k = c * D_max^alpha, the exponent at the last checkpoint
def _relu_grid(D, size):
    alpha = np.geomspace(*ALPHA_BOUNDS, size)[:, None]
    c = np.geomspace(1e-3, 1e2, size)[None, :] / D.max() ** alpha
    return {"alpha": alpha, "c": c}, np.exp(-c[..., None] * D ** alpha[..., None])


# Eq. 5: A = A0 - c D^-alpha, and the loss law L = L0 + k D^-beta: linear for a fixed exponent
def _power_grid(sign):
    def grid(D, size):
        exponent = np.geomspace(*ALPHA_BOUNDS, size * 4)
        return {"exponent": exponent}, sign * D[None, :] ** (-exponent[:, None])

    return grid


# logarithmic: A = A0 + c*log(D - D_min + s), linear in (A0, c) for a fixed shift s = b + D_min
def _log_grid(D, size):
    s = np.geomspace(D.min() * 1e-4, D.max() * 1e4, size * 4)
    return {"s": s}, np.log(D[None, :] - D.min() + s[:, None])


# sigmoid-like: A = a - 1/(1 + exp(c*(D - m))), linear in a for fixed (c, m); d = -c*m
def _sigmoid_grid(D, size):
    span = D.max() - D.min()
    mag = np.geomspace(1e-2, 1e2, size // 2) / span
    c = np.concatenate([-mag[::-1], mag])[:, None]
    m = np.linspace(D.min() - 2 * span, D.max() + span, size)[None, :]
    return {"c": c, "m": m}, 1.0 / (1.0 + np.exp(np.clip(c[..., None] * (D - m[..., None]), -700, 700)))


@dataclass(frozen=True)
class Law:
    """One law: its formula, derivative in D and limit at D -> infinity, and how it is fitted.

    ``fixed`` lists coefficients held constant when fitting because they are not identifiable
    (see :func:`log_law`, :func:`sigmoid_law`). ``limit_name`` is the parameter that *is* the
    limit, when there is one (``A0`` for Eqs. 4 and 5, ``L0`` for the loss law). ``coords`` and
    ``prefit`` are the fitting procedure's view (:class:`Coord`, :class:`Prefit`); ``activation``
    names the models the paper fits with this law; ``ratio`` says the data are activation ratios
    in [0, 1]; ``above_limit`` that every point of the curve lies above its limit (so a profile
    of the limit stops at the lowest observation). A new law is one entry of :data:`LAWS`.
    """

    name: str
    title: str
    reference: str
    formula: str
    param_names: tuple[str, ...]
    func: Callable
    derivative: Callable
    limit: Callable[[Mapping[str, float]], float]
    coords: tuple[Coord, ...]
    prefit: Prefit
    limit_name: str | None = None
    fixed: Mapping[str, float] = field(default_factory=dict)
    activation: str | None = None
    ratio: bool = True
    above_limit: bool = False

    @property
    def free_names(self) -> tuple[str, ...]:
        return tuple(n for n in self.param_names if n not in self.fixed)

    @property
    def n_free(self) -> int:
        return len(self.free_names)

    def __call__(self, D, **params):
        return self.func(D, **params)


LAWS: dict[str, Law] = {
    "relu": Law(
        name="relu",
        title="convergent decreasing logspace power law",
        reference="Eq. 4",
        formula="A(D) = exp(-c * D^alpha + b) + A0",
        param_names=("alpha", "b", "c", "A0"),
        func=relu_law,
        derivative=_relu_dD,
        limit=lambda p: p["A0"],
        limit_name="A0",
        activation="relu",
        above_limit=True,
        coords=(
            Coord("alpha", "alpha", ALPHA_BOUNDS),
            Coord("log_c", "c", (-80.0, 20.0), "exp"),
            Coord("b", "b", (-100.0, 100.0)),
            Coord("A0", "A0", (0.0, 1.0)),
        ),
        prefit=Prefit(
            _relu_grid,
            lambda t, u, v: {"alpha": t["alpha"], "log_c": math.log(t["c"]), "b": math.log(v), "A0": u},
            offset="A0",
            min_slope=math.exp(-100),
            flat={"alpha": 1.0, "log_c": 0.0, "b": -100.0},  # amplitude exp(b) on its lower bound
        ),
    ),
    "silu": Law(
        name="silu",
        title="convergent increasing power law",
        reference="Eq. 5",
        formula="A(D) = -c * D^(-alpha) + A0",
        param_names=("alpha", "c", "A0"),
        func=silu_law,
        derivative=_silu_dD,
        limit=lambda p: p["A0"],
        limit_name="A0",
        activation="silu",
        coords=(
            Coord("alpha", "alpha", ALPHA_BOUNDS),
            Coord("log_c", "c", (-30.0, 10.0), "exp"),
            Coord("A0", "A0", (0.0, 1.0)),
        ),
        prefit=Prefit(
            _power_grid(-1.0),
            lambda t, u, v: {"alpha": t["exponent"], "log_c": math.log(v), "A0": u},
            offset="A0",
            min_slope=0.0,
            flat={"alpha": 1.0, "log_c": -30.0},
        ),
    ),
    "log": Law(
        name="log",
        title="logarithmic",
        reference="section 2 (alternative)",
        formula="A(D) = A0 + c * log(a*D + b)   [a held at 1]",
        param_names=("a", "b", "c", "A0"),
        func=log_law,
        derivative=_log_dD,
        limit=_log_limit,
        fixed={"a": 1.0},
        coords=(
            # b = s - D_min with s > 0 keeps a*D + b > 0 on the data (a is held at 1)
            Coord("log_s", "b", lambda D: (math.log(D.min()) - 25.0, math.log(D.max()) + 25.0), "exp_shift"),
            Coord("c", "c"),
            Coord("A0", "A0"),
        ),
        prefit=Prefit(_log_grid, lambda t, u, v: {"log_s": math.log(t["s"]), "c": v, "A0": u}, offset="A0"),
    ),
    "sigmoid": Law(
        name="sigmoid",
        title="sigmoid-like",
        reference="section 2 (alternative)",
        formula="A(D) = a - 1/(1 + b*exp(c*D + d))   [b held at 1]",
        param_names=("a", "b", "c", "d"),
        func=sigmoid_law,
        derivative=_sigmoid_dD,
        limit=_sigmoid_limit,
        fixed={"b": 1.0},
        coords=(Coord("a", "a"), Coord("c", "c"), Coord("d", "d")),
        prefit=Prefit(_sigmoid_grid, lambda t, u, v: {"a": u, "c": t["c"], "d": -t["c"] * t["m"]}, offset="a",
                      slope=-1.0),
    ),
    "loss": Law(
        name="loss",
        title="limit-loss power law",
        reference="Fig. 12",
        formula="L(D) = L0 + k * D^(-beta)",
        param_names=("L0", "k", "beta"),
        func=loss_law,
        derivative=_loss_dD,
        limit=lambda p: p["L0"],
        limit_name="L0",
        ratio=False,
        above_limit=True,
        coords=(
            Coord("L0", "L0", (0.0, np.inf)),
            Coord("log_k", "k", (-30.0, 20.0), "exp"),
            Coord("beta", "beta", ALPHA_BOUNDS),
        ),
        prefit=Prefit(
            _power_grid(1.0),
            lambda t, u, v: {"beta": t["exponent"], "log_k": math.log(v), "L0": u},
            offset="L0",
            min_slope=0.0,
            flat={"beta": 1.0, "log_k": -30.0},
        ),
    ),
}


def get_law(name: str | Law) -> Law:
    """Look a law up by name (``relu``, ``silu``, ``log``, ``sigmoid``, ``loss``)."""
    if isinstance(name, Law):
        return name
    try:
        return LAWS[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown law {name!r}; choose one of {sorted(LAWS)}") from None


def law_for_activation(activation: str) -> Law:
    """The paper's law for models with this activation function: Eq. 4 for ReLU, Eq. 5 for SiLU."""
    for law in LAWS.values():
        if law.activation == str(activation).lower():
            return law
    known = sorted(law.activation for law in LAWS.values() if law.activation)
    raise ValueError(f"no law for activation {activation!r}; the paper fits {known}")


# ---------------------------------------------------------------------------
# the paper's tables (data/*.csv)
# ---------------------------------------------------------------------------
#: ``data/`` of this repository (reference tables from the paper, with a source column)
DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def read_paper_table(name: str, data_dir: str | Path | None = None):
    """Read ``data/<name>.csv`` (e.g. ``table2``) as a pandas DataFrame."""
    import pandas as pd

    path = Path(data_dir or DATA_DIR) / (name if name.endswith(".csv") else f"{name}.csv")
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; the paper tables live in the repository's data/ folder "
            "(pass data_dir= if you moved them)"
        )
    return pd.read_csv(path)


def published_coefficients(data_dir: str | Path | None = None) -> dict[tuple[str, str], dict[str, float]]:
    """Table 2 of the paper as ``{(activation, scale): {param: value}}``.

    Keys look like ``("relu", "0.1B")``; SiLU entries have no ``b`` (Eq. 5 has none).
    """
    df = read_paper_table("table2", data_dir)
    out = {}
    for row in df.itertuples(index=False):
        act = row.activation.lower()
        names = law_for_activation(act).param_names
        out[(act, row.scale)] = {n: float(getattr(row, n)) for n in names}
    return out


def non_embedding_params(data_dir: str | Path | None = None) -> dict[str, float]:
    """Table 3: non-embedding parameter count ``N`` per scale (``{"0.1B": 1.08e8, ...}``)."""
    df = read_paper_table("table3", data_dir)
    return {row.scale: float(row.non_embedding_params) for row in df.itertuples(index=False)}
