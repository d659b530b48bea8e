"""What a PPL-p% measurement produces, on disk and back, and how a model runs with it.

* :class:`PPLPResult` - one model at one ``p``: the CETT target, thresholds, activation ratios.
* :class:`CheckpointResult` - Algorithm 1: one CETT shared by a list of checkpoints.
* :class:`SparsityReport` - a measurement with its model, text and run facts; saved as JSON
  atomically (:func:`~sparsing_utils.jsonio.atomic_write_json`) and loaded back.
* :func:`sparse_inference` - run a model sparsely with the thresholds of a result.
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

from torch import nn

from . import __version__
from .ffn import find_ffn_sites
from .jsonio import atomic_write_json
from .rules import CETTRule, Counter, Recorder, apply_rule

__all__ = ["CheckpointResult", "PPLPResult", "SparsityReport", "sparse_inference"]


@dataclass
class PPLPResult:
    """PPL-p% sparsity of one model (PAPER.md Sec. 1): the CETT target ``c`` whose sparse PPL is
    ``(1 + p/100)`` times the dense PPL, and the activation ratios at that point.

    MoE models (:mod:`sparsing_utils.moe`): ``activation_ratio`` and ``layer_activation_ratio``
    count over all expert neurons of each layer (+ shared); ``activation_ratio_ran`` and
    ``layer_activation_ratio_ran`` over the neurons of the experts that ran for each token (+ shared).
    Both are None for dense models, and left out of their JSON."""

    p: float
    cett: float
    activation_ratio: float
    ppl_dense: float
    ppl_sparse: float
    ppl_ratio: float
    thresholds: list[float]
    layer_activation_ratio: list[float]
    layer_cett: list[float]
    token_activation_ratio: list[float] = field(default_factory=list)
    converged: bool = True
    message: str = ""
    sparse_passes: int = 0
    seconds: float = 0.0
    activation_ratio_ran: float | None = None
    layer_activation_ratio_ran: list[float] | None = None
    # |d(activation ratio)/d(PPL ratio)| x the search's PPL tolerance, from the evaluated points
    # nearest the target (None: fewer than two points); see search.activation_uncertainty
    activation_ratio_uncertainty: float | None = None

    @property
    def sparsity_ratio(self) -> float:
        return 1.0 - self.activation_ratio

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in _MOE_ONLY:
            if d[key] is None:
                del d[key]
        return d


_MOE_ONLY = ("activation_ratio_ran", "layer_activation_ratio_ran")  # PPLPResult fields that dense models leave out


@dataclass
class CheckpointResult:
    """Algorithm 1: one CETT for a list of checkpoints so that their *mean* PPL ratio is 1+p%."""

    p: float
    cett: float
    mean_ppl_ratio: float
    checkpoints: list[PPLPResult]
    names: list[str]
    converged: bool = True
    message: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["checkpoints"] = [c.to_dict() for c in self.checkpoints]
        return d


@dataclass
class SparsityReport:
    """Everything a PPL-p% measurement produced; saves to JSON atomically and loads back.

    ``model`` describes the model (:meth:`~sparsing_utils.models.LoadedModel.describe`: spec,
    source, ``weights`` - e.g. ``"Q4_1 GGUF dequantized to float32"`` for the default -,
    architecture); ``text`` the token blocks (:meth:`~sparsing_utils.blocks.TokenBlocks.to_dict`).
    ``search_points`` lists every CETT target the search evaluated, in order, each one sparse
    pass on the same tokens (``c``, ``ppl_sparse``, ``ppl_ratio``, ``activation_ratio``): the
    CETT curve of the Pareto comparison (:func:`~sparsing_utils.pareto.pareto_from_search`).
    """

    model: dict
    text: dict
    results: list[PPLPResult]
    ppl_dense: float
    seed: int = 0
    version: str = __version__
    device: str = "cpu"
    dtype: str = "float32"
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    search_points: list[dict] = field(default_factory=list)

    def result(self, p: float) -> PPLPResult:
        for r in self.results:
            if abs(r.p - p) < 1e-9:
                return r
        raise KeyError(f"no result for p={p}; available: {[r.p for r in self.results]}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["results"] = [r.to_dict() for r in self.results]
        return d

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> SparsityReport:
        with open(path) as f:
            d = json.load(f)
        d["results"] = [PPLPResult(**r) for r in d["results"]]
        return cls(**d)

    def table(self) -> str:
        """One row per ``p``; ``+-`` is the activation-ratio uncertainty the PPL tolerance implies
        (``?``: fewer than two evaluated points). MoE models get a second activation-ratio column,
        over the experts that ran (the first counts over all expert neurons)."""
        moe = any(r.activation_ratio_ran is not None for r in self.results)
        head = (f"{'p%':>5} {'CETT':>8} {'act. ratio':>10} {'+-':>7} " + (f"{'ran ratio':>10} " if moe else "")
                + f"{'PPL dense':>10} {'PPL sparse':>10} {'ratio':>8} ok")
        rows = [head]
        for r in self.results:
            u = r.activation_ratio_uncertainty
            ran = f"{r.activation_ratio_ran:>10.4f} " if moe else ""
            rows.append(f"{r.p:>5g} {r.cett:>8.4f} {r.activation_ratio:>10.4f} {'?' if u is None else f'{u:.4f}':>7} "
                        f"{ran}{r.ppl_dense:>10.4f} {r.ppl_sparse:>10.4f} {r.ppl_ratio:>8.4f} "
                        f"{'yes' if r.converged else 'NO: ' + r.message}")
        if moe:
            rows.append("act. ratio: over all expert neurons of each layer; ran ratio: over the neurons of the "
                        "experts that ran for each token (shared experts in both)")
        return "\n".join(rows)

    def dataframe(self):
        import pandas as pd

        return pd.DataFrame([{k: v for k, v in r.to_dict().items() if not isinstance(v, list)}
                             for r in self.results])


@contextlib.contextmanager
def sparse_inference(model: nn.Module, result: PPLPResult | SparsityReport | Sequence[float], *,
                     p: float | None = None, record: Recorder | None = None,
                     count: Counter | None = None) -> Iterator[CETTRule]:
    """Run ``model`` sparsely with the thresholds of a PPL-p% result (what evaluation uses).

    ``result`` may be a :class:`PPLPResult`, a :class:`SparsityReport` (then ``p`` picks the
    result; default: the only one), or a list of per-layer thresholds. ``record(site, keep)``
    (optional) sees each layer's mask and ``count(site, n)`` each token's number of activated
    neurons, as in :func:`~sparsing_utils.rules.apply_rule`.
    """
    if isinstance(result, SparsityReport):
        if p is None:
            if len(result.results) != 1:
                raise ValueError(f"the report holds p = {[r.p for r in result.results]}: pass p=...")
            result = result.results[0]
        else:
            result = result.result(p)
    thresholds = result.thresholds if isinstance(result, PPLPResult) else list(result)
    sites = find_ffn_sites(model)
    if len(thresholds) != len(sites):
        raise ValueError(f"{len(thresholds)} thresholds for a model with {len(sites)} FFN layers: "
                         "the result was measured on a different model")
    rule = CETTRule(thresholds)
    with apply_rule(model, rule, sites=sites, record=record, count=count):
        yield rule
