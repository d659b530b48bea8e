"""The linearised pre-fit (variable projection): where the fitting procedure starts.

Each law is linear in two of its coefficients once the others are fixed (Eq. 4 in ``A0`` and
``exp(b)`` for fixed ``alpha, c``; Eq. 5 in ``A0, c`` for fixed ``alpha``; the table of
:data:`sparsing_utils.laws.LAWS` says how, per law). On a grid of the nonlinear coefficients,
exact least squares for the linear ones maps the whole error surface cheaply; its lowest local
minima become the starts of the Levenberg-Marquardt polish in :mod:`sparsing_utils.fitting`.

The least-squares helpers also serve the bottleneck scan of Fig. 5
(:func:`sparsing_utils.analysis.fit_bottleneck`).
"""
from __future__ import annotations

import numpy as np

from .laws import Law

__all__ = ["affine_lstsq", "local_minima", "prefit_starts", "scale_lstsq", "sum_squares"]


def affine_lstsq(g: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least squares of ``y ~ u + v*g`` along the last axis, for every grid cell of ``g``
    (``g``: ``[*grid, n]``, ``y``: ``[n]``); returns ``u, v`` with the grid's shape."""
    gm = g.mean(-1)
    ym = y.mean()
    gc = g - gm[..., None]
    den = np.einsum("...i,...i->...", gc, gc)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.einsum("...i,i->...", gc, y - ym) / den
    u = ym - v * gm
    return u, v


def scale_lstsq(g: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Least squares of ``r ~ v*g`` along the last axis (no offset)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.einsum("...i,...i->...", g, r) / np.einsum("...i,...i->...", g, g)


def sum_squares(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sum of squared errors along the last axis; NaN and overflow become ``inf``."""
    with np.errstate(invalid="ignore", over="ignore"):
        s = ((pred - y) ** 2).sum(-1)
    return np.where(np.isfinite(s), s, np.inf)


def local_minima(sse: np.ndarray, k: int) -> list[tuple[int, ...]]:
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


def prefit_starts(law: Law, D: np.ndarray, y: np.ndarray, hold: dict[str, float], size: int,
                  n_starts: int) -> list[dict[str, float]]:
    """Up to ``n_starts`` starting points (in the law's coordinates, inside their boxes) from the
    linearised pre-fit of ``law.prefit`` on a grid of ``size`` (2-D) or ``4*size`` (1-D) points.
    ``hold`` maps coordinates to fixed values (a held offset is used as such)."""
    spec = law.prefit
    boxes = {c.name: c.box(D) for c in law.coords}
    lo, hi = boxes[spec.offset]
    bounded = bool(np.isfinite(lo) or np.isfinite(hi))
    starts: list[dict] = []
    with np.errstate(all="ignore"):
        theta, g = spec.grid(D, size)  # g: [*grid, n]
        shape = g.shape[:-1]
        if spec.slope is not None:  # v is a constant: u = mean(y - v*g)
            v = np.full(shape, spec.slope)
            u = np.full(shape, hold[spec.offset]) if spec.offset in hold else (y - spec.slope * g).mean(-1)
        elif spec.offset in hold or bounded:  # u held or clipped into its box, v refitted for that u
            if spec.offset in hold:
                u = np.full(shape, hold[spec.offset])
            else:
                u = np.clip(affine_lstsq(g, y)[0], lo, hi)
            v = scale_lstsq(g, y - u[..., None])
        else:
            u, v = affine_lstsq(g, y)
        sse = sum_squares(u[..., None] + v[..., None] * g, y)
        if spec.min_slope is not None:
            sse[~(v > spec.min_slope)] = np.inf
        for idx in local_minima(sse, n_starts):
            point = {k: np.broadcast_to(t, shape)[idx] for k, t in theta.items()}
            starts.append(spec.start(point, u[idx], v[idx]))
    if not starts and spec.flat is not None:
        # no admissible grid point (the data run against the law, e.g. a rising series under
        # Eq. 4): start from the flat curve; the amplitude then ends on its bound
        offset = float(hold.get(spec.offset, np.clip(y.mean(), lo, hi)))
        starts.append({**spec.flat, spec.offset: offset})
    return [{k: float(np.clip(v, *boxes[k])) for k, v in st.items()} for st in starts]
