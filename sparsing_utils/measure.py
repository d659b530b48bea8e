"""End to end: a model spec and a text source in, a :class:`SparsityReport` out.

This is what ``sparsing measure`` and notebook 01 call: load the model (``models``), cut the
text into token blocks (``blocks``), build a :class:`~sparsing_utils.probe.SparsityProbe`
(one dense pass) and search PPL-p% for every requested ``p`` (``search``; Luo et al. 2024,
Sec. 3.1).
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch

from .blocks import make_blocks
from .models import describe_model, load_model
from .probe import SparsityProbe
from .results import SparsityReport
from .search import EvaluationTable, check_tol, search_ppl_p

__all__ = ["check_p_values", "check_search_options", "measure_probe", "measure_sparsity"]


def check_p_values(p: float | Sequence[float]) -> list[float]:
    """Validate PPL-p% targets: each a percentage in (0, 100)."""
    values = [p] if isinstance(p, (int, float)) else list(p)
    if not values:
        raise ValueError("no p given: pass one or more percentages, e.g. --p 1 5 10")
    for v in values:
        if not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 < v < 100:
            raise ValueError(f"p must be a percentage in (0, 100), got {v!r} (e.g. 1 for PPL-1%)")
    return [float(v) for v in values]


def check_search_options(p: float | Sequence[float], tol: float) -> list[float]:
    """Validate the targets and the PPL tolerance together (``tol`` below every ``p/100``)."""
    ps = check_p_values(p)
    for v in ps:
        check_tol(tol, v)
    return ps


def measure_sparsity(model: str | object = "smollm2", text: str = "pydoc", *, tokens: int = 8192,
                     p: float | Sequence[float] = (1.0, 5.0, 10.0), block_len: int = 512,
                     dtype: str = "auto", device: str = "auto", batch_size: int | None = None,
                     mode: str = "memory", calibrate_on_split: bool = False, seed: int = 0,
                     sketch_dim: int = 64, curve_tokens: int = 1024, tol: float = 1e-3, progress: bool = True,
                     tokenizer=None) -> SparsityReport:
    """PPL-p% sparsity of one model on one text (see the module docstring).

    model: ``"smollm2"`` (embedded default), a hub id, a local folder, a ``.gguf`` file, or an
    already loaded model (then pass ``tokenizer``). text: a built-in source (``pydoc``,
    ``stdlib``), a ``.txt``/``.jsonl`` file or ``hf:NAME[:CONFIG][:SPLIT]``. With
    ``calibrate_on_split`` the thresholds are calibrated on the first half of the text and the
    PPL measured on the second half (``tokens`` each). ``tol`` is the tolerance on the PPL ratio
    (1e-3 = 0.1 point): each result reports the activation-ratio uncertainty it implies.
    """
    ps = check_search_options(p, tol)
    if not isinstance(tokens, int) or tokens < 2:
        raise ValueError(f"tokens must be an integer >= 2, got {tokens!r}")
    start = time.perf_counter()
    torch.manual_seed(seed)
    if isinstance(model, str):
        loaded = load_model(model, dtype=dtype, device=device)
        net, tok, model_info = loaded.model, loaded.tokenizer, {"spec": model, **loaded.describe()}
    else:
        if tokenizer is None:
            raise ValueError("a loaded model needs its tokenizer: measure_sparsity(model, text, tokenizer=...)")
        net, tok = model, tokenizer
        model_info = {"spec": type(model).__name__, **describe_model(model)}
    if calibrate_on_split:
        cal = make_blocks(tok, text, tokens=tokens, block_len=block_len, split="calibration", seed=seed)
        evl = make_blocks(tok, text, tokens=tokens, block_len=block_len, split="evaluation", seed=seed)
        calib = SparsityProbe(net, cal, mode=mode, batch_size=batch_size, sketch_dim=sketch_dim, curve_tokens=curve_tokens,
                              progress=progress, name="calibration")
        probe = SparsityProbe(net, evl, mode=mode, batch_size=batch_size, progress=progress,
                              name="evaluation", calibration=calib)
        text_info = {"source": text, "calibration": cal.to_dict(), "evaluation": evl.to_dict()}
    else:
        blocks = make_blocks(tok, text, tokens=tokens, block_len=block_len, seed=seed)
        probe = SparsityProbe(net, blocks, mode=mode, batch_size=batch_size, sketch_dim=sketch_dim, curve_tokens=curve_tokens,
                              progress=progress, name=model_info.get("spec", "model"))
        text_info = {"source": text, **blocks.to_dict()}
    report = measure_probe(probe, ps, model_info=model_info, text_info=text_info, seed=seed, tol=tol)
    report.seconds = time.perf_counter() - start
    report.extra.update({"block_len": block_len, "sketch_dim": sketch_dim, "curve_tokens": curve_tokens})
    return report


def measure_probe(probe: SparsityProbe, p: float | Sequence[float] = (1.0, 5.0, 10.0), *,
                  model_info: dict | None = None, text_info: dict | None = None, seed: int = 0,
                  tol: float = 1e-3, evaluations: EvaluationTable | None = None) -> SparsityReport:
    """Search PPL-p% for every ``p`` on a prepared (or not yet prepared) probe; evaluated
    points are shared between the p values (pass ``evaluations``, an
    :class:`~sparsing_utils.search.EvaluationTable` of this probe, to keep their sparse passes).
    Returns a :class:`SparsityReport` whose ``search_points`` list every evaluated CETT."""
    ps = check_search_options(p, tol)
    start = time.perf_counter()
    probe.prepare()
    if evaluations is None:
        evaluations = EvaluationTable([probe])
    elif evaluations.probes != [probe]:
        raise ValueError("the evaluation table was made for other probes: pass EvaluationTable([probe])")
    results = [search_ppl_p(probe, v, tol=tol, evaluations=evaluations) for v in ps]
    param = next(probe.model.parameters())
    return SparsityReport(
        model=model_info or {"spec": probe.name, **describe_model(probe.model)},
        text=text_info or {"n_tokens": probe.n_tokens}, results=results, ppl_dense=probe.dense.ppl, seed=seed,
        device=str(param.device), dtype=str(param.dtype).replace("torch.", ""),
        seconds=time.perf_counter() - start,
        extra={"mode": probe.mode, "tol": tol, "sparse_passes": probe.sparse_passes,
               "dense_passes": probe.dense_passes
               + (probe.calibration.dense_passes if probe.calibration is not None else 0)},
        search_points=evaluations.rows(),
    )
