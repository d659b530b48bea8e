"""Activation-vs-data series: checked input for the laws (Luo et al. 2024, arXiv:2411.02335, section 2).

A series is one training run: the training tokens ``D`` of its checkpoints (in **billions**, the
unit of Eqs. 4 and 5) and the PPL-1% activation ratio ``A`` there. On disk it is the paper's
format, ``{"token_passed": [raw token counts], "activation_ratio": [...]}``, one file per run.

Everything is checked before any fitting; each error names the problem and the fix.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .laws import Law, get_law, law_for_activation

__all__ = [
    "TOKENS_PER_UNIT",
    "ActivationSeries",
    "check_enough_points",
    "load_activation_series",
    "load_series_file",
    "series_from_dict",
    "validate_series",
]

TOKENS_PER_UNIT = 1e9  # the laws use D in billions of tokens
_FORMAT = '{"token_passed": [raw token counts, ascending], "activation_ratio": [one per checkpoint]}'


def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def validate_series(D, y, *, ratio: bool = True, names=("D", "A")) -> tuple[np.ndarray, np.ndarray]:
    """Check a series and return it as two float arrays.

    Raises :class:`ValueError` naming the problem and the fix for: non-numeric values,
    nested lists, different lengths, no points, NaN/inf/null, ``D <= 0``, ``D`` not sorted or
    repeated, and (``ratio=True``) values outside [0, 1]. Whether there are enough points for a
    law is :func:`check_enough_points`.
    """
    dn, yn = names
    try:
        D = np.asarray(D, dtype=float)
        y = np.asarray(y, dtype=float)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{dn} and {yn} must be lists of numbers ({err}); remove text or nested entries") from None
    if D.ndim != 1 or y.ndim != 1:
        raise ValueError(f"{dn} and {yn} must be flat lists of numbers, got shapes {D.shape} and {y.shape}; "
                         "give one number per checkpoint")
    if len(D) != len(y):
        raise ValueError(f"{dn} has {len(D)} values but {yn} has {len(y)}; give one {yn} per checkpoint")
    if len(D) == 0:
        raise ValueError(f"the series is empty: {dn} and {yn} hold no checkpoints; give one value per checkpoint "
                         "in each")
    for arr, nm in ((D, dn), (y, yn)):
        if not np.all(np.isfinite(arr)):
            i = _first_bad(~np.isfinite(arr))
            raise ValueError(f"{nm}[{i}] is {arr[i]} (NaN, inf or null); drop or fill those checkpoints")
    if np.any(D <= 0):
        i = _first_bad(D <= 0)
        raise ValueError(
            f"{dn} must be positive (the laws use D in billions of tokens), but {dn}[{i}] = {D[i]:g}; "
            "drop the step-0 checkpoint and any with a negative count"
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
    if ratio and (np.any(y < 0) or np.any(y > 1)):
        i = _first_bad((y < 0) | (y > 1))
        fix = "give fractions, not percentages" if y[i] > 1 else "an activation ratio cannot be negative"
        raise ValueError(f"{yn} must be activation ratios in [0, 1], but {yn}[{i}] = {y[i]:g}; {fix}")
    return D, y


def check_enough_points(n_points: int, law: str | Law, n_held: int = 0) -> None:
    """Raise :class:`ValueError` unless ``n_points`` exceed the free coefficients of ``law``
    (less ``n_held`` held fixed): a least-squares fit needs at least one point more."""
    spec = get_law(law)
    n_free = spec.n_free - n_held
    if n_points <= n_free:
        held = f" ({n_held} more held fixed)" if n_held else ""
        raise ValueError(
            f"{n_points} checkpoint{' is' if n_points == 1 else 's are'} too few to fit law {spec.name} "
            f"({spec.reference}) with {n_free} free parameters{held}; give at least {n_free + 1} checkpoints"
        )


def series_from_dict(obj, *, source: str = "series") -> tuple[np.ndarray, np.ndarray]:
    """Read the paper's series format ``{"token_passed": [...], "activation_ratio": [...]}``.

    Token counts are raw; the returned ``D`` is in **billions** of tokens.
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: expected a JSON object {_FORMAT}, got {type(obj).__name__}")
    missing = [k for k in ("token_passed", "activation_ratio") if k not in obj]
    if missing:
        raise ValueError(
            f"{source}: missing key(s) {missing}; the series needs \"token_passed\" (raw token counts) "
            f"and \"activation_ratio\" (one per checkpoint); found keys {sorted(obj)}"
        )
    tokens, ratio = obj["token_passed"], obj["activation_ratio"]
    for k, v in (("token_passed", tokens), ("activation_ratio", ratio)):
        if not isinstance(v, (list, tuple)):
            raise ValueError(f"{source}: \"{k}\" must be a list of numbers, got {type(v).__name__}; expected {_FORMAT}")
    try:
        D, A = validate_series(tokens, ratio, names=("token_passed", "activation_ratio"))
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
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
        what = "is a folder" if path.is_dir() else "not found"
        raise FileNotFoundError(f"series file {path} {what}; pass a JSON file {_FORMAT}")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); expected {_FORMAT}") from None
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
        return law_for_activation(self.activation).name

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
