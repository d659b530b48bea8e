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

This module only holds formulas (values, derivatives, limits) and the loaders for
the paper's tables in ``data/``; the fitting procedure lives in
:mod:`sparsing_utils.fitting`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

__all__ = [
    "relu_law",
    "silu_law",
    "log_law",
    "sigmoid_law",
    "loss_law",
    "bottleneck_law",
    "Law",
    "LAWS",
    "get_law",
    "POWER_LAW",
    "DATA_DIR",
    "read_paper_table",
    "published_coefficients",
    "non_embedding_params",
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


@dataclass(frozen=True)
class Law:
    """One law: its formula, parameter names, derivative in D and limit at D -> infinity.

    ``fixed`` lists coefficients that are held constant when fitting because they
    are not identifiable (see :func:`log_law`, :func:`sigmoid_law`).
    ``limit_name`` is the parameter that *is* the limit, when there is one
    (``A0`` for Eqs. 4 and 5, ``L0`` for the loss law).
    """

    name: str
    title: str
    reference: str
    formula: str
    param_names: tuple[str, ...]
    func: Callable
    derivative: Callable
    limit: Callable[[Mapping[str, float]], float]
    limit_name: str | None = None
    fixed: Mapping[str, float] = field(default_factory=dict)

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
        "relu",
        "convergent decreasing logspace power law",
        "Eq. 4",
        "A(D) = exp(-c * D^alpha + b) + A0",
        ("alpha", "b", "c", "A0"),
        relu_law,
        _relu_dD,
        lambda p: p["A0"],
        "A0",
    ),
    "silu": Law(
        "silu",
        "convergent increasing power law",
        "Eq. 5",
        "A(D) = -c * D^(-alpha) + A0",
        ("alpha", "c", "A0"),
        silu_law,
        _silu_dD,
        lambda p: p["A0"],
        "A0",
    ),
    "log": Law(
        "log",
        "logarithmic",
        "section 2 (alternative)",
        "A(D) = A0 + c * log(a*D + b)   [a held at 1]",
        ("a", "b", "c", "A0"),
        log_law,
        _log_dD,
        _log_limit,
        None,
        {"a": 1.0},
    ),
    "sigmoid": Law(
        "sigmoid",
        "sigmoid-like",
        "section 2 (alternative)",
        "A(D) = a - 1/(1 + b*exp(c*D + d))   [b held at 1]",
        ("a", "b", "c", "d"),
        sigmoid_law,
        _sigmoid_dD,
        _sigmoid_limit,
        None,
        {"b": 1.0},
    ),
    "loss": Law(
        "loss",
        "limit-loss power law",
        "Fig. 12",
        "L(D) = L0 + k * D^(-beta)",
        ("L0", "k", "beta"),
        loss_law,
        _loss_dD,
        lambda p: p["L0"],
        "L0",
    ),
}

#: the paper's power law for each activation function (Eq. 4 for ReLU, Eq. 5 for SiLU)
POWER_LAW = {"relu": "relu", "silu": "silu"}


def get_law(name: str | Law) -> Law:
    """Look a law up by name (``relu``, ``silu``, ``log``, ``sigmoid``, ``loss``)."""
    if isinstance(name, Law):
        return name
    try:
        return LAWS[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown law {name!r}; choose one of {sorted(LAWS)}") from None


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
        names = get_law(POWER_LAW[act]).param_names
        out[(act, row.scale)] = {n: float(getattr(row, n)) for n in names}
    return out


def non_embedding_params(data_dir: str | Path | None = None) -> dict[str, float]:
    """Table 3: non-embedding parameter count ``N`` per scale (``{"0.1B": 1.08e8, ...}``)."""
    df = read_paper_table("table3", data_dir)
    return {row.scale: float(row.non_embedding_params) for row in df.itertuples(index=False)}
