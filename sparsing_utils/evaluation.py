"""What sparsity costs on benchmarks: a dense or PPL-p%-sparsified model through lm-evaluation-harness.

The paper compares dense models with their PPL-1/5/10% versions on downstream tasks (Luo et al.
2024, arXiv:2411.02335, Tables 1 and 4-6; PAPER.md Sec. 3). Here the harness (PyPI ``lm-eval``)
scores the model itself: lm-eval's ``HFLM`` wraps the loaded model object and its tokenizer, so
nothing is registered by hand, and the sparse model is that same object inside
:func:`~sparsing_utils.results.sparse_inference` - the hooks and per-layer thresholds of the
metric (:class:`~sparsing_utils.rules.CETTRule`). While the harness runs, the rule's masks are
counted on every token the harness feeds the model (padding excluded): the activation ratio
*during evaluation*, reported beside the scores.

* :func:`evaluate_model` - a loaded model on lm-eval tasks (offline: :mod:`~sparsing_utils.eval_tasks`
  from ``data_dir``; online: lm-eval's hub tasks by name), dense or sparse -> :class:`EvalReport`.
* :func:`run_evaluation` - the ``sparsing evaluate`` command: every input checked before the model
  is loaded, the result's model compared with the loaded one, ``eval.json`` written atomically.
* :func:`check_same_model` - a PPL-p% result applies only to the model it was measured on.

Needs the optional dependency ``lm-eval`` (``pip install 'sparsing-law[eval]'``).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import __version__
from .eval_tasks import (
    LOCAL_TASKS,
    build_local_task,
    check_local_data,
    lm_eval_name,
    local_task,
)
from .ffn import FFNSite, find_ffn_sites
from .hub import hub_offline
from .jsonio import atomic_write_json, check_writable
from .results import PPLPResult, SparsityReport, sparse_inference

__all__ = [
    "DEFAULT_TASKS",
    "ActivationCounter",
    "EvalReport",
    "TaskResult",
    "check_same_model",
    "check_tasks",
    "evaluate_model",
    "group_drops",
    "lm_eval_version",
    "load_sparsity",
    "paper_drops",
    "run_evaluation",
    "scores_frame",
]

# Tables 4 and 5 (TyDiQA has no local copy): commonsense reasoning, then reading comprehension.
DEFAULT_TASKS = tuple(LOCAL_TASKS)


def lm_eval_version() -> str:
    import lm_eval

    return lm_eval.__version__


# ---------------------------------------------------------------------------------------
# the activation ratio during evaluation
# ---------------------------------------------------------------------------------------

class ActivationCounter:
    """Activated neurons on the tokens the harness runs through the model, per layer (the metric's
    ratio, Sec. 3.1).

    :meth:`count` is the counter of :func:`~sparsing_utils.rules.apply_rule` (:meth:`record` the
    same from a full mask): it keeps each layer's count of activated neurons per position of the
    forward in flight. The harness pads its
    batches on the right with no attention mask, so the real length of each row is taken from
    the harness itself (:meth:`claim`, in row order, see :class:`_CountingHFLM`); counts of rows
    never claimed (batch-size probing, generation) are dropped. A dense run counts tokens only
    (every neuron computes: ratio 1). ``keep_tokens`` keeps the token rows run (for tests).

    MoE models also count, per layer, the neurons of the experts that ran on each token
    (:meth:`~sparsing_utils.ffn.FFNSite.ran_neurons`, as :meth:`SparsityProbe.sparse_pass` counts
    them): :attr:`activation_ratio_ran`; None for dense models.
    """

    def __init__(self, sites: Sequence[FFNSite], *, keep_tokens: bool = False):
        self.d_ff = torch.tensor([s.d_ff for s in sites], dtype=torch.float64)
        self.active = torch.zeros(len(sites), dtype=torch.float64)  # [layers]
        self.moe = any(s.moe is not None for s in sites)
        self.ran = torch.zeros(len(sites), dtype=torch.float64)  # [layers] MoE: neurons of the experts that ran
        self.tokens = 0
        self.sparse = False  # set when a rule records masks
        self.keep_tokens = keep_tokens
        self.sequences: list[list[int]] = []
        self._counts: dict[int, torch.Tensor] = {}  # layer -> [batch, seq] activated neurons
        self._ran: dict[int, torch.Tensor] = {}  # layer -> [batch, seq] neurons that ran (MoE models)
        self._lengths: list[int] = []
        self._inputs: torch.Tensor | None = None

    def count(self, site: FFNSite, n: torch.Tensor) -> None:  # n [batch, seq] activated neurons (float32)
        self.sparse = True
        self._counts[site.index] = n.to(torch.int32)  # [batch, seq], exact: whole numbers below 2^24
        if self.moe:
            self._ran[site.index] = site.ran_neurons(n.unsqueeze(-1))  # [batch, seq]

    def record(self, site: FFNSite, keep: torch.Tensor) -> None:  # keep [batch, seq, d_ff] bool
        self.count(site, keep.sum(dim=-1, dtype=torch.float32))

    def new_batch(self, inputs: torch.Tensor) -> None:  # inputs [batch, seq] token ids
        self._flush()
        self._inputs = inputs if self.keep_tokens else None

    def claim(self, length: int) -> None:
        """The next row of the batch has ``length`` real tokens (the rest is padding)."""
        if self._inputs is not None:
            self.sequences.append(self._inputs[len(self._lengths), :length].tolist())
        self._lengths.append(int(length))

    def _flush(self) -> None:
        if self._lengths:
            lengths = torch.tensor(self._lengths)  # [rows]
            for layer, counts in self._counts.items():  # summed where the counts are (no sync per layer)
                if self.active.device != counts.device:
                    self.active, self.ran = self.active.to(counts.device), self.ran.to(counts.device)
                self.active[layer] += _sum_real(counts, lengths)
                if layer in self._ran:
                    self.ran[layer] += _sum_real(self._ran[layer], lengths)
            self.tokens += int(lengths.sum())
        self._counts, self._ran, self._lengths, self._inputs = {}, {}, [], None

    def finish(self) -> None:
        self._flush()

    @property
    def layer_activation_ratio(self) -> list[float]:
        if not self.sparse:
            return [1.0] * len(self.d_ff)
        return (self.active.cpu() / (max(self.tokens, 1) * self.d_ff)).tolist()

    @property
    def activation_ratio(self) -> float | None:
        """Mean over layers of each layer's activated fraction (as the metric); None before any token."""
        if self.tokens == 0:
            return None
        ratios = self.layer_activation_ratio
        return float(sum(ratios) / len(ratios))

    @property
    def layer_activation_ratio_ran(self) -> list[float] | None:
        """MoE models: activated / neurons of the experts that ran, per layer (1 in a dense run); else None."""
        if not self.moe:
            return None
        if not self.sparse:
            return [1.0] * len(self.d_ff)
        return (self.active / self.ran.clamp_min(1)).cpu().tolist()

    @property
    def activation_ratio_ran(self) -> float | None:
        """Mean over layers of :attr:`layer_activation_ratio_ran`; None for dense models or before any token."""
        ratios = self.layer_activation_ratio_ran
        if ratios is None or self.tokens == 0:
            return None
        return float(sum(ratios) / len(ratios))


def _sum_real(counts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Sum of ``counts [batch, seq]`` over the first ``lengths [rows]`` positions of its first rows
    (the real tokens of each row; float64, on the counts' device)."""
    counts = counts[: len(lengths)]  # [rows, seq]
    valid = torch.arange(counts.shape[1], device=counts.device) < lengths.to(counts.device)[:, None]
    return counts.masked_fill(~valid, 0).sum(dtype=torch.float64)


def _counting_lm_class():
    from lm_eval.models.huggingface import HFLM

    class _CountingHFLM(HFLM):
        """lm-eval's HFLM on an already loaded model, telling an :class:`ActivationCounter` which
        positions of each padded batch are real (lm-eval slices each row to its input length)."""

        counter: ActivationCounter | None = None

        def _model_call(self, inps, attn_mask=None, labels=None):
            if self.counter is not None:
                self.counter.new_batch(inps)
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

        def _select_cont_toks(self, logits, contlen=None, inplen=None):
            if self.counter is not None and inplen is not None:
                self.counter.claim(inplen)
            return super()._select_cont_toks(logits, contlen=contlen, inplen=inplen)

    return _CountingHFLM


# ---------------------------------------------------------------------------------------
# checks made before any model work
# ---------------------------------------------------------------------------------------

_IDENTITY = ("architecture", "model_type", "n_layers", "hidden", "d_ff", "n_heads", "vocab_size", "n_experts",
             "n_params", "weights")


def check_same_model(measured: dict, loaded: dict) -> None:
    """Refuse a PPL-p% result measured on another model than ``loaded``.

    ``measured`` is the result's ``model`` block, ``loaded`` :meth:`LoadedModel.describe` (or, before
    loading, just ``{"spec", "path"}``). The model must be the same spec or file/folder, and every
    architecture fact both sides record (architecture, layers, widths, parameters, ``weights`` such as
    ``"Q4_1 GGUF dequantized to float32"``) must agree. Raises ``ValueError`` naming each difference.
    """
    diffs = []
    same_path = bool(measured.get("path")) and str(measured.get("path")) == str(loaded.get("path"))
    if measured.get("spec") != loaded.get("spec") and not same_path:
        diffs.append(f"model {measured.get('spec')!r} (result) vs {loaded.get('spec')!r} (asked for)")
    for key in _IDENTITY:
        a, b = measured.get(key), loaded.get(key)
        if a not in (None, "") and b not in (None, "") and a != b:
            diffs.append(f"{key} {a!r} (result) vs {b!r} (this model)")
    if diffs:
        raise ValueError("the sparsity result was measured on a different model (" + "; ".join(diffs) + "): its "
                         "thresholds do not apply here; measure this model first (`sparsing measure --model ...`)")


def load_sparsity(path: str | os.PathLike, p: float) -> tuple[SparsityReport, PPLPResult]:
    """The report in ``path`` and its result at ``p``; clear errors for a missing file, another
    format, or a ``p`` the file does not hold."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"sparsity result {str(path)!r} not found: pass the JSON written by `sparsing measure`")
    try:
        report = SparsityReport.load(path)
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{str(path)!r} is not a result of `sparsing measure` ({type(err).__name__}: {err})") from err
    try:
        return report, report.result(float(p))
    except KeyError:
        held = ", ".join(f"{r.p:g}" for r in report.results)
        raise ValueError(f"p={p:g} is not in {str(path)!r} (it holds p = {held}): pass one of those, or measure it "
                         f"(`sparsing measure ... --p {p:g}`)") from None


def check_tasks(tasks: Sequence[str], data_dir: str | os.PathLike | None) -> list[str]:
    """Validate task names before any model work. With ``data_dir`` every task must be an offline
    task whose files are there; without it, the names must be lm-eval tasks and the hub reachable."""
    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise ValueError(f"no task given: pass --tasks, e.g. {','.join(DEFAULT_TASKS)}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"a task is named twice in {tasks}")
    if data_dir is not None:
        for t in tasks:
            local_task(t)  # unknown -> ValueError naming the offline tasks
        check_local_data(tasks, data_dir)
        return tasks
    if hub_offline():
        raise ValueError(f"lm-eval's hub tasks ({', '.join(tasks)}) need the Hugging Face hub, and HF_HUB_OFFLINE=1 "
                         f"is set: pass --data-dir with the offline data (../shared/data) for the offline tasks "
                         f"{', '.join(LOCAL_TASKS)}")
    from lm_eval.tasks import TaskManager

    known = set(TaskManager().all_tasks)
    unknown = [t for t in tasks if lm_eval_name(t) not in known]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}: not lm-eval tasks (`lm-eval ls tasks` lists them); the offline "
                         f"tasks are {', '.join(LOCAL_TASKS)}")
    return tasks


# ---------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------

@dataclass
class TaskResult:
    """One task, one setting: lm-eval's metrics with their standard errors (``acc``, ``acc_stderr``,
    ``acc_norm``, ..., LAMBADA's ``perplexity``), items scored, and the activation ratio measured on
    the harness's tokens (MoE models: also over the experts that ran, ``activation_ratio_ran``; left
    out of dense models' JSON, as in :class:`~sparsing_utils.results.PPLPResult`)."""

    task: str
    lm_eval_task: str
    source: str  # "local" or "hub"
    n_items: int
    n_items_total: int
    metrics: dict[str, float | None]
    activation_ratio: float | None
    layer_activation_ratio: list[float]
    tokens: int
    seconds: float
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    activation_ratio_ran: float | None = None
    layer_activation_ratio_ran: list[float] | None = None

    @property
    def items_per_second(self) -> float:
        return self.n_items / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class EvalReport:
    """One model in one setting (dense, or a PPL-p% result) on a list of tasks; JSON via :meth:`save`."""

    model: dict
    sparsity: dict | None
    tasks: dict[str, TaskResult]
    limit: int | None
    batch_size: int
    bootstrap_iters: int
    data_dir: str | None
    num_fewshot: int = 0
    version: str = __version__
    lm_eval_version: str = ""
    seconds: float = 0.0
    samples: dict = field(default_factory=dict, repr=False)  # lm-eval's per-item outputs (keep_samples)

    @property
    def setting(self) -> str:
        return "dense" if self.sparsity is None else f"PPL-{self.sparsity['p']:g}%"

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("samples")
        for task in d["tasks"].values():
            for key in _MOE_ONLY:
                if task[key] is None:
                    del task[key]
        d["setting"] = self.setting
        return d

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> EvalReport:
        import json

        with open(path) as fh:
            d = json.load(fh)
        d.pop("setting", None)
        d["tasks"] = {k: TaskResult(**v) for k, v in d["tasks"].items()}
        return cls(**d)

    def table(self) -> str:
        """One row per task; MoE models get a ``ran ratio`` column (over the experts that ran) beside
        the activation ratio (over all expert neurons), as the ``sparsing measure`` table does."""
        moe = any(t.activation_ratio_ran is not None for t in self.tasks.values())
        head = (f"{'task':<11} {'items':>6} {'acc':>7} {'±':>6} {'acc_norm':>8} {'ppl':>8} {'act. ratio':>10} "
                + (f"{'ran ratio':>10} " if moe else "") + f"{'items/s':>8}")
        rows = [head]
        for t in self.tasks.values():
            cells = [_cell(t.metrics.get(key), width, spec) for key, width, spec in _TABLE_COLUMNS]
            ran = f"{_cell(t.activation_ratio_ran, 10, '.4f')} " if moe else ""
            rows.append(f"{t.task:<11} {t.n_items:>6} {' '.join(cells)} {_cell(t.activation_ratio, 10, '.4f')} "
                        f"{ran}{t.items_per_second:>8.2f}")
        if moe:
            rows.append("act. ratio: over all expert neurons of each layer; ran ratio: over the neurons of the "
                        "experts that ran for each token (shared experts in both)")
        return "\n".join(rows)


_MOE_ONLY = ("activation_ratio_ran", "layer_activation_ratio_ran")  # TaskResult fields that dense models leave out

# (metric, column width, format) of EvalReport.table
_TABLE_COLUMNS = (("acc", 7, ".4f"), ("acc_stderr", 6, ".4f"), ("acc_norm", 8, ".4f"), ("perplexity", 8, ".2f"))


def _cell(value: float | None, width: int, spec: str) -> str:
    return f"{value:>{width}{spec}}" if value is not None else f"{'-':>{width}}"


def _metrics(raw: dict) -> dict[str, float | None]:
    """lm-eval's ``{"acc,none": x, "acc_stderr,none": s, ...}`` -> ``{"acc": x, "acc_stderr": s}``
    (a filter other than ``none`` stays in the name; ``N/A`` and NaN become None)."""
    out = {}
    for key, value in raw.items():
        if "," not in key:
            continue
        metric, filt = key.split(",", 1)
        name = metric if filt == "none" else key
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
        else:
            out[name] = None
    return out


@contextlib.contextmanager
def _lm_eval_logging(verbose: bool) -> Iterator[None]:
    """lm-eval logs every task's set-up at WARNING, and ``datasets`` draws a bar for every mapping
    (HellaSwag's preprocessing); keep to errors and the harness's own progress bars unless asked."""
    import datasets

    logger = logging.getLogger("lm_eval")
    level, bars = logger.level, datasets.is_progress_bar_enabled()
    if not verbose:
        logger.setLevel(logging.ERROR)
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


# ---------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------

def evaluate_model(loaded, tasks: Sequence[str] = DEFAULT_TASKS, *, data_dir: str | os.PathLike | None = None,
                   sparsity: SparsityReport | PPLPResult | None = None, p: float | None = None,
                   sparsity_file: str | os.PathLike | None = None, limit: int | None = None, batch_size: int = 8,
                   bootstrap_iters: int = 1000, keep_samples: bool = False, keep_tokens: bool = False,
                   verbose: bool = False) -> EvalReport:
    """Score ``loaded`` (a :class:`~sparsing_utils.models.LoadedModel`) on lm-eval tasks, zero-shot.

    Args:
        tasks: our names (``piqa, siqa, hellaswag, winogrande, copa, boolq, lambada``) or lm-eval's.
        data_dir: the offline data folder (``../shared/data``): the tasks are built from its files
            (:mod:`~sparsing_utils.eval_tasks`). ``None``: lm-eval's hub tasks, by name (needs the network).
        sparsity: ``None`` for the dense model; a :class:`~sparsing_utils.results.SparsityReport`
            (``p`` picks its result; its model block must match ``loaded``) or a :class:`PPLPResult`.
        limit: the first ``limit`` items of each task (lm-eval's ``limit``); ``None``: all.
        batch_size: sequences per forward (8 is the fastest on a 2-core CPU for these tasks).
        bootstrap_iters: lm-eval's bootstrap for standard errors without a closed form (LAMBADA's
            perplexity); accuracies use the closed form.
        keep_samples: keep lm-eval's per-item outputs in :attr:`EvalReport.samples` (not saved).
        keep_tokens: keep the token rows run for each task (``report.samples[task]["tokens"]``).

    Each task runs on its own, so its activation ratio, token count and time are its own. As lm-eval's
    ``simple_evaluate`` does, each run seeds Python's, NumPy's and torch's random generators.
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks = check_tasks(list(tasks), data_dir)
    result = sparsity
    if isinstance(sparsity, SparsityReport):
        check_same_model(sparsity.model, loaded.describe())
        if p is None and len(sparsity.results) != 1:
            raise ValueError(f"the result holds p = {[r.p for r in sparsity.results]}: pass p=...")
        result = sparsity.results[0] if p is None else sparsity.result(float(p))
    model, sites = loaded.model, find_ffn_sites(loaded.model)
    if result is not None and len(result.thresholds) != len(sites):
        raise ValueError(f"{len(result.thresholds)} thresholds for a model with {len(sites)} FFN layers: the result "
                         "was measured on a different model")
    with _lm_eval_logging(verbose):
        lm = _counting_lm_class()(pretrained=model, tokenizer=loaded.tokenizer, batch_size=int(batch_size))
        manager = TaskManager(include_defaults=False) if data_dir is not None else TaskManager()
    start = time.perf_counter()
    report = EvalReport(
        model=loaded.describe(), sparsity=None, tasks={}, limit=limit, batch_size=int(batch_size),
        bootstrap_iters=int(bootstrap_iters), data_dir=None if data_dir is None else str(data_dir),
        lm_eval_version=lm_eval_version())
    if result is not None:
        report.sparsity = {"file": None if sparsity_file is None else str(sparsity_file), "p": result.p,
                           "cett": result.cett, "activation_ratio_measured": result.activation_ratio,
                           "ppl_ratio": result.ppl_ratio, "thresholds": list(result.thresholds)}
        if result.activation_ratio_ran is not None:  # MoE models
            report.sparsity["activation_ratio_ran_measured"] = result.activation_ratio_ran
        if isinstance(sparsity, SparsityReport):
            report.sparsity["text"] = {k: v for k, v in sparsity.text.items() if not isinstance(v, (list, dict))}
    for name, task_obj in _task_objects(tasks, data_dir, manager, verbose):
        with _lm_eval_logging(verbose):
            counter = ActivationCounter(sites, keep_tokens=keep_tokens)
            lm.counter = counter
            rule = sparse_inference(model, result, count=counter.count) if result is not None \
                else contextlib.nullcontext()
            t0 = time.perf_counter()
            try:
                with rule:
                    out = simple_evaluate(model=lm, tasks=[task_obj], limit=limit, task_manager=manager,
                                          bootstrap_iters=int(bootstrap_iters), log_samples=keep_samples)
            finally:
                lm.counter = None
            seconds = time.perf_counter() - t0
            counter.finish()
        key = task_obj.config.task
        n = out["n-samples"][key]
        report.tasks[name] = TaskResult(
            task=name, lm_eval_task=key, source="local" if data_dir is not None else "hub",
            n_items=int(n["effective"]), n_items_total=int(n["original"]), metrics=_metrics(out["results"][key]),
            activation_ratio=counter.activation_ratio, layer_activation_ratio=counter.layer_activation_ratio,
            tokens=counter.tokens, seconds=seconds, higher_is_better=dict(out.get("higher_is_better", {}).get(key, {})),
            activation_ratio_ran=counter.activation_ratio_ran,
            layer_activation_ratio_ran=counter.layer_activation_ratio_ran)
        if keep_samples or keep_tokens:
            report.samples[name] = {"items": out.get("samples", {}).get(key, []), "tokens": counter.sequences}
    report.seconds = time.perf_counter() - start
    return report


def _task_objects(tasks: Sequence[str], data_dir, manager, verbose: bool) -> Iterator[tuple[str, object]]:
    """``(name, lm-eval Task)`` for each task, built when its turn comes: the offline task from the
    local files, or lm-eval's hub task (a group or tag yields each of its tasks, under lm-eval's names)."""
    for name in tasks:
        with _lm_eval_logging(verbose):
            if data_dir is not None:
                built = [(name, build_local_task(name, data_dir))]
            else:
                leaves = manager.load([lm_eval_name(name)])["tasks"]
                built = [(name, t) for t in leaves.values()] if len(leaves) == 1 else list(leaves.items())
        yield from built


def run_evaluation(model: str = "smollm2", tasks: Sequence[str] = DEFAULT_TASKS, *,
                   data_dir: str | os.PathLike | None = None, sparsity_file: str | os.PathLike | None = None,
                   p: float | None = None, limit: int | None = None, out: str | os.PathLike | None = None,
                   batch_size: int = 8, bootstrap_iters: int = 1000, dtype: str = "auto", device: str = "auto",
                   verbose: bool = False) -> EvalReport:
    """The ``sparsing evaluate`` command: check everything cheap first (tasks and data, the result file
    and ``p``, the model spec against the result, the output path), then load the model, compare its
    architecture with the result's, evaluate and write ``out`` atomically."""
    from .models import _resolve, load_model

    if limit is not None and int(limit) < 1:
        raise ValueError(f"--limit must be a positive number of items, got {limit}")
    tasks = check_tasks(list(tasks), data_dir)
    report = result = None
    if sparsity_file is not None:
        if p is None:
            raise ValueError("--sparsity needs --p: the PPL-p% setting to evaluate (one of the result's p values)")
        report, result = load_sparsity(sparsity_file, p)
        _, path = _resolve(model)
        check_same_model(report.model, {"spec": model, "path": str(path) if path is not None else ""})
    elif p is not None:
        raise ValueError("--p without --sparsity: pass the PPL-p% result JSON (`sparsing measure --out ...`)")
    if out is not None:
        check_writable(out)
    loaded = load_model(model, dtype=dtype, device=device)
    ev = evaluate_model(loaded, tasks, data_dir=data_dir, sparsity=report, p=None if result is None else result.p,
                        sparsity_file=sparsity_file, limit=limit, batch_size=batch_size,
                        bootstrap_iters=bootstrap_iters, verbose=verbose)
    if out is not None:
        ev.save(out)
    return ev


# ---------------------------------------------------------------------------------------
# what sparsity costs: our drops beside the paper's (notebook 06)
# ---------------------------------------------------------------------------------------

def scores_frame(reports: Sequence[EvalReport]):
    """One row per (setting, task): the task's score (``LocalTask.score``: acc, HellaSwag acc_norm) in
    points with its standard error, the items, the activation ratio during evaluation (MoE models:
    also ``activation_ratio_ran``, over the experts that ran), and the drop from the dense report's
    score on the same task (points; negative = worse). Exactly one report must be dense."""
    import pandas as pd

    rows = []
    for rep in reports:
        p = 0.0 if rep.sparsity is None else float(rep.sparsity["p"])
        for name, t in rep.tasks.items():
            spec = next((x for x in LOCAL_TASKS.values() if name in (x.name, x.lm_eval)), None)
            metric = spec.score if spec is not None else "acc"  # a hub task without a paper column: its acc
            value, err = t.metrics.get(metric), t.metrics.get(f"{metric}_stderr")
            rows.append({"setting": rep.setting, "p": p, "task": name, "paper_task": spec and spec.paper,
                         "group": spec.group if spec is not None else "other",
                         "metric": metric, "score": None if value is None else 100 * value,
                         "stderr": None if err is None else 100 * err, "n_items": t.n_items,
                         "activation_ratio": t.activation_ratio, "seconds": t.seconds,
                         **({} if t.activation_ratio_ran is None else {"activation_ratio_ran": t.activation_ratio_ran})})
    frame = pd.DataFrame(rows)
    dense = frame[frame["p"] == 0]
    if dense.empty or dense["task"].duplicated().any():
        raise ValueError("give exactly one dense report (no --sparsity) among the reports: drops are measured from it")
    frame["drop"] = frame["score"] - frame["task"].map(dense.set_index("task")["score"])
    return frame.sort_values(["p", "task"], ignore_index=True)


def paper_drops(data_dir: str | os.PathLike | None = None):
    """The paper's Tables 4 and 5 (``data/table4.csv``, ``data/table5.csv``) as drops from dense, in
    points, one row per (scale, activation, setting, task), for the seven tasks with offline data."""
    import pandas as pd

    from .laws import read_paper_table

    tasks = {t.paper: t for t in LOCAL_TASKS.values()}
    parts = []
    for table in ("table4", "table5"):
        df = read_paper_table(table, data_dir)
        cols = [c for c in df.columns if c in tasks]
        parts.append(df.melt(id_vars=["scale", "activation", "setting"], value_vars=cols, var_name="paper_task",
                             value_name="score"))
    long = pd.concat(parts, ignore_index=True)
    dense = long[long["setting"] == "dense"].set_index(["scale", "activation", "paper_task"])["score"]
    long["drop"] = long["score"] - [dense[(s, a, t)] for s, a, t in zip(long["scale"], long["activation"],
                                                                           long["paper_task"])]
    long["task"] = long["paper_task"].map({k: v.name for k, v in tasks.items()})
    long["group"] = long["paper_task"].map({k: v.group for k, v in tasks.items()})
    long["p"] = long["setting"].map(lambda s: 0.0 if s == "dense" else float(s.removeprefix("PPL-").rstrip("%")))
    return long


def group_drops(frame):
    """Mean drop per (setting, task group) - the shape of the paper's Table 1 (our reading group has
    BoolQ and LAMBADA; the paper's also TyDiQA). Works on :func:`scores_frame` and :func:`paper_drops`."""
    keys = [k for k in ("scale", "activation") if k in frame.columns]
    return frame.groupby([*keys, "p", "group"], as_index=False)["drop"].mean()
