"""The shipped training-lab results: ``data/runs/<sweep>/<run>.json``, read and turned into tables.

A result file is what :func:`sparsing_utils.tracking.track` writes (format ``sparsing-run/1``):
the run's config and plan, per-checkpoint records (tokens, stage, losses, epochs, the PPL-1%
activation ratio at the run's one CETT of Algorithm 1) and activation patterns. A run that belongs
to several sweeps (the ~2M ReLU run is the activation run, the 26.7 width-depth point, seed 0 and
the full-corpus repetition run) is stored once; its other places hold an **alias**,
``{"format": "sparsing-run-alias/1", "sweep": ..., "run": ..., "same_as": "<sweep>/<run>.json"}``
(:func:`publish` writes both kinds, ``scripts/run_sweeps.py`` calls it).

What the notebooks 03-05 need (Luo et al. 2024, arXiv:2411.02335, Figs. 5-11):

- :func:`load_run`, :func:`load_sweep`, :func:`load_runs`: read and check, aliases resolved;
- :func:`checkpoint_frame`, :func:`run_table`, :func:`loss_curve_frame`: tidy tables;
  :func:`compare_at_tokens`: runs of slightly different length compared at equal data;
- :func:`checkpoint_series` / :func:`activation_series`: a run as a series for the fitting code
  (``D`` in billions of tokens, the checkpoints before the decay stage, as the paper);
- :func:`fit_activation_laws`, :func:`limit_table`: Eq. 4 / Eq. 5 per run, ``A0`` with bootstrap
  intervals; :func:`fit_loss_limits`: the limit loss of Fig. 6 / Fig. 12; :func:`limit_points`:
  limits of ours and of the paper side by side (Fig. 7);
- :func:`seed_spread`, :func:`seed_band`: the spread between seeds of one config, the noise floor;
- :func:`neuron_frequency_frame`, :func:`pattern_table`, :func:`token_ratio_pair`: Figs. 9 and 10.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .laws import DATA_DIR
from .series import TOKENS_PER_UNIT, ActivationSeries

__all__ = [
    "ALIAS_FORMAT",
    "PRE_DECAY",
    "RUNS_DIR",
    "RUN_FORMAT",
    "RunResult",
    "activation_series",
    "checkpoint_frame",
    "checkpoint_series",
    "compare_at_tokens",
    "fit_activation_laws",
    "fit_loss_limits",
    "limit_points",
    "limit_table",
    "load_run",
    "load_runs",
    "load_sweep",
    "loss_curve_frame",
    "neuron_frequency_frame",
    "pareto_frame",
    "pattern_checkpoint",
    "pattern_table",
    "publish",
    "run_table",
    "seed_band",
    "seed_spread",
    "token_ratio_pair",
    "token_ratios",
    "value_at_tokens",
    "write_alias",
]

RUN_FORMAT = "sparsing-run/1"
ALIAS_FORMAT = "sparsing-run-alias/1"
RUNS_DIR = DATA_DIR / "runs"
#: the stages before the decay of the warmup-stable-decay schedule: the paper's activation curves use these
PRE_DECAY = ("warmup", "stable")
STAGES = ("warmup", "stable", "decay")
SEGMENTS = ("all", "falling", "rising")
_REQUIRED = ("config", "plan", "checkpoints", "tracking")


# ---------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RunResult:
    """One entry of a sweep: ``sweep``/``name`` are its place (an alias keeps its own names),
    ``data`` the full result (for an alias, that of the run it points to, ``alias_of``)."""

    sweep: str
    name: str
    path: Path
    data: dict = field(repr=False)
    alias_of: str | None = None

    @property
    def key(self) -> str:
        return f"{self.sweep}/{self.name}"

    @property
    def is_alias(self) -> bool:
        return self.alias_of is not None

    @property
    def config(self) -> dict:
        return self.data["config"]

    @property
    def activation(self) -> str:
        return str(self.config["activation"]).lower()

    @property
    def n_params(self) -> int:
        """Non-embedding parameters ``N`` (the paper's count for ``D/N``)."""
        return int(self.data["plan"]["non_embedding_params"])

    @property
    def scale(self) -> str:
        """``N`` as a label, e.g. ``"1.9M"`` (``"40.0k"`` below 100k parameters)."""
        return f"{self.n_params / 1e6:.1f}M" if self.n_params >= 1e5 else f"{self.n_params / 1e3:.1f}k"

    @property
    def width_depth_ratio(self) -> float:
        """hidden size / layers (Fig. 5, 6)."""
        return self.config["hidden_size"] / self.config["num_layers"]

    @property
    def checkpoints(self) -> list[dict]:
        return self.data["checkpoints"]

    @property
    def tokens_per_epoch(self) -> float:
        """Training tokens of one pass over the run's training data (from its last checkpoint)."""
        last = self.checkpoints[-1]
        return last["tokens"] / _mean_epochs(last)


def _read_json(path: Path, what: str) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {path} is not valid JSON ({err}); restore it (`git checkout -- {path}`) "
                         "or write it again with `sparsing track`") from None
    if not isinstance(obj, dict) or obj.get("format") not in (RUN_FORMAT, ALIAS_FORMAT):
        found = repr(obj.get("format")) if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise ValueError(f"{what} {path} has format {found}, expected {RUN_FORMAT!r} or {ALIAS_FORMAT!r}; "
                         "is it a run result written by `sparsing track`?")
    return obj


def _check_full(obj: dict, path: Path) -> dict:
    missing = [k for k in _REQUIRED if k not in obj]
    if missing:
        raise ValueError(f"{path} lacks {missing}: it is truncated or not a run result; write it again with "
                         "`sparsing track`")
    if not obj["checkpoints"]:
        raise ValueError(f"{path} holds no checkpoint records; track the run again")
    return obj


def _resolve(path: Path, runs_dir: Path) -> RunResult:
    """Read ``path`` (a full result or an alias) into a :class:`RunResult`."""
    if not path.is_file():
        here = sorted(p.stem for p in path.parent.glob("*.json")) if path.parent.is_dir() else []
        hint = f"; {path.parent.name}/ holds {here}" if here else f"; is runs_dir ({runs_dir}) right?"
        raise FileNotFoundError(f"run result {path} not found{hint}")
    obj = _read_json(path, "run result")
    if obj.get("format") == ALIAS_FORMAT:
        missing = [k for k in ("sweep", "run", "same_as") if k not in obj]
        if missing:
            raise ValueError(f"alias {path} lacks {missing}; an alias is {{\"format\": \"{ALIAS_FORMAT}\", "
                             "\"sweep\": ..., \"run\": ..., \"same_as\": \"<sweep>/<run>.json\"}")
        target = runs_dir / obj["same_as"]
        if not target.is_file():
            raise FileNotFoundError(f"alias {path} points to {obj['same_as']}, which is not in {runs_dir}; "
                                    "ship the full result beside it")
        full = _read_json(target, "run result")
        if full.get("format") == ALIAS_FORMAT:
            raise ValueError(f"alias {path} points to {obj['same_as']}, another alias; point it to the full result")
        return RunResult(obj["sweep"], obj["run"], target, _check_full(full, target),
                         alias_of=obj["same_as"].removesuffix(".json"))
    full = _check_full(obj, path)
    return RunResult(path.parent.name, path.stem, path, full)


def load_run(spec: str | os.PathLike, runs_dir: str | os.PathLike | None = None) -> RunResult:
    """One run: a ``.json`` path, or ``"<sweep>/<run>"`` under ``runs_dir`` (default ``data/runs``).
    An alias's target is looked up under ``runs_dir`` (for a path: the folder above its sweep)."""
    if str(spec).endswith(".json"):
        path = Path(spec)
        root = Path(runs_dir) if runs_dir is not None else path.parent.parent
    else:
        root = Path(runs_dir) if runs_dir is not None else RUNS_DIR
        path = root / f"{spec}.json"
    return _resolve(path, root)


#: orders of :func:`load_sweep`
ORDERS = {
    "size": lambda r: (r.activation, r.n_params, r.width_depth_ratio, r.name),
    "width_depth": lambda r: (r.activation, r.width_depth_ratio, r.n_params, r.name),
    "name": lambda r: r.name,
}


def load_sweep(sweep: str, runs_dir: str | os.PathLike | None = None, order: str = "size") -> dict[str, RunResult]:
    """Every run of one sweep, ``{run name: RunResult}``, ordered by activation, then by ``order``:
    ``"size"`` (non-embedding parameters), ``"width_depth"`` (hidden/layers) or ``"name"``."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {sorted(ORDERS)}, got {order!r}")
    runs_dir = Path(runs_dir) if runs_dir is not None else RUNS_DIR
    folder = runs_dir / sweep
    if not folder.is_dir():
        have = sorted(p.name for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.is_dir() else []
        raise FileNotFoundError(f"sweep folder {folder} not found" +
                                (f"; {runs_dir} holds the sweeps {have}" if have else
                                 f"; {runs_dir} does not exist (pass runs_dir, e.g. '../data/runs' from notebooks/)"))
    found = [_resolve(p, runs_dir) for p in sorted(folder.glob("*.json"))]
    if not found:
        raise ValueError(f"sweep folder {folder} holds no .json run results")
    return {r.name: r for r in sorted(found, key=ORDERS[order])}


def load_runs(runs_dir: str | os.PathLike | None = None, sweeps: Iterable[str] | None = None,
              distinct: bool = False) -> list[RunResult]:
    """Every entry of every sweep (or of ``sweeps``); ``distinct=True`` drops the aliases, so each
    trained run appears once."""
    runs_dir = Path(runs_dir) if runs_dir is not None else RUNS_DIR
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"runs folder {runs_dir} not found (cwd {Path.cwd()}); pass runs_dir")
    names = list(sweeps) if sweeps is not None else sorted(p.name for p in runs_dir.iterdir() if p.is_dir())
    out = [r for s in names for r in load_sweep(s, runs_dir).values()]
    return [r for r in out if not r.is_alias] if distinct else out


# ---------------------------------------------------------------------------
# writing: a full result once, aliases elsewhere (scripts/run_sweeps.py)
# ---------------------------------------------------------------------------
def write_alias(path: str | os.PathLike, sweep: str, run: str, same_as: str) -> Path:
    """Write an alias file (atomic): this sweep entry is the result ``same_as`` (``"<sweep>/<run>.json"``)."""
    from .jsonio import atomic_write_json

    return atomic_write_json(path, {"format": ALIAS_FORMAT, "sweep": sweep, "run": run, "same_as": same_as})


def publish(payload: Mapping, sweeps: Mapping[str, str], results_dir: str | os.PathLike) -> list[Path]:
    """Ship one tracked run into every sweep it belongs to: the full result under the first sweep
    of ``sweeps`` (``{sweep: name of the run there}``), an alias under each other. Returns the paths."""
    from .jsonio import atomic_write_json

    if not sweeps:
        raise ValueError("the run belongs to no sweep: give {sweep: name in that sweep}")
    if payload.get("format") != RUN_FORMAT:
        raise ValueError(f"the payload has format {payload.get('format')!r}, expected {RUN_FORMAT!r}")
    results_dir = Path(results_dir)
    (home, name), *others = sweeps.items()
    full = results_dir / home / f"{name}.json"
    paths = [atomic_write_json(full, {**payload, "sweep": home, "run": name}, indent=None)]
    for sweep, alias in others:
        paths.append(write_alias(results_dir / sweep / f"{alias}.json", sweep, alias, f"{home}/{name}.json"))
    return paths


# ---------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------
def _mean_epochs(ck: dict) -> float:
    ep = ck.get("epochs") or {}
    return float(np.mean(list(ep.values()))) if ep else float("nan")


def checkpoint_frame(runs: Iterable[RunResult]):
    """One row per (run, checkpoint): the run's place and shape, ``tokens``, ``D`` (billions),
    ``tokens_per_param`` (``D/N``), ``stage``, losses, ``epochs`` (mean over domains),
    ``activation_ratio``, ``ppl_ratio``, ``in_search``."""
    import pandas as pd

    rows = []
    for r in runs:
        for i, c in enumerate(r.checkpoints):
            rows.append({
                "sweep": r.sweep, "run": r.name, "activation": r.activation, "scale": r.scale,
                "n_params": r.n_params, "width_depth_ratio": r.width_depth_ratio, "seed": r.config["seed"],
                "train_fraction": r.config["train_fraction"], "index": i, "tokens": c["tokens"],
                "D": c["tokens"] / TOKENS_PER_UNIT, "tokens_per_param": c["tokens"] / r.n_params, "stage": c["stage"],
                "train_loss": c.get("train_loss"), "heldout_loss": c.get("heldout_loss"), "epochs": _mean_epochs(c),
                "activation_ratio": c["activation_ratio"], "ppl_ratio": c["ppl_ratio"], "in_search": c["in_search"]})
    return pd.DataFrame(rows)


def _last_stable(r: RunResult) -> dict:
    pre = [c for c in r.checkpoints if c["stage"] in PRE_DECAY]
    return (pre or r.checkpoints)[-1]


def _summary(r: RunResult) -> dict:
    ck = r.checkpoints
    last, fin = _last_stable(r), ck[-1]
    pre = [c for c in ck if c["stage"] in PRE_DECAY] or ck
    low = min(pre, key=lambda c: c["activation_ratio"])
    thr = r.data.get("throughput") or {}
    epoch1 = r.tokens_per_epoch
    at_epoch1 = value_at_tokens(r, epoch1, "activation_ratio") if pre[0]["tokens"] <= epoch1 <= pre[-1]["tokens"] \
        else float("nan")
    return {
        "sweep": r.sweep, "run": r.name, "alias_of": r.alias_of, "activation": r.activation, "scale": r.scale,
        "n_params": r.n_params, "hidden_size": r.config["hidden_size"], "num_layers": r.config["num_layers"],
        "d_ff": r.data["plan"]["d_ff"], "width_depth_ratio": r.width_depth_ratio, "seed": r.config["seed"],
        "train_fraction": r.config["train_fraction"], "total_tokens": fin["tokens"],
        "tokens_per_param": fin["tokens"] / r.n_params, "epochs": _mean_epochs(fin),
        "cett": r.data["tracking"]["cett"], "A_min": low["activation_ratio"], "tokens_at_min": low["tokens"],
        "A_last_stable": last["activation_ratio"], "A_final": fin["activation_ratio"],
        "rise_from_min": last["activation_ratio"] - low["activation_ratio"], "tokens_per_epoch": epoch1,
        "A_at_epoch1": at_epoch1,
        "rise_before_epoch1": at_epoch1 - low["activation_ratio"] if epoch1 >= low["tokens"] else float("nan"),
        "heldout_loss_last_stable": last.get("heldout_loss"), "heldout_loss_final": fin.get("heldout_loss"),
        "tokens_per_s": thr.get("tokens_per_s"), "mfu": thr.get("mfu"), "wall_seconds": thr.get("wall_seconds"),
    }


def run_table(runs: Iterable[RunResult]):
    """One row per run: shape, tokens, epochs, the CETT of Algorithm 1, the activation ratio at its
    lowest pre-decay checkpoint (``A_min``), at the last stable one and at the end, the rise from the
    lowest to the last stable one, the ratio when the first epoch ends (``A_at_epoch1``, interpolated;
    empty when that is outside the pre-decay checkpoints) and the rise from the lowest point until
    then (empty when the first epoch ends before the lowest point), held-out losses,
    and the measured training speed."""
    import pandas as pd

    return pd.DataFrame([_summary(r) for r in runs])


def loss_curve_frame(runs: Iterable[RunResult]):
    """The logged training loss of every run (at most 256 log-spaced steps): ``run, activation,
    scale, tokens, loss, lr``."""
    import pandas as pd

    frames = []
    for r in runs:
        lc = r.data.get("loss_curve")
        if not lc:
            raise ValueError(f"{r.key} has no loss curve (its log.jsonl was missing when it was tracked)")
        frames.append(pd.DataFrame({"tokens": lc["tokens"], "loss": lc["loss"], "lr": lc["lr"]})
                      .assign(run=r.name, activation=r.activation, scale=r.scale, n_params=r.n_params))
    return pd.concat(frames, ignore_index=True)


def value_at_tokens(run: RunResult, tokens: float, column: str = "heldout_loss",
                    stages: Sequence[str] = PRE_DECAY) -> float:
    """A checkpoint quantity at ``tokens``, interpolated linearly in log(tokens) between the run's
    checkpoints of ``stages`` (to compare runs of slightly different length at equal data)."""
    pts = [c for c in run.checkpoints if c["stage"] in stages]
    t = np.array([c["tokens"] for c in pts], dtype=float)
    if not len(t) or not t[0] <= tokens <= t[-1]:
        span = f"{t[0]:.4g}-{t[-1]:.4g}" if len(t) else "none"
        raise ValueError(f"{run.key}: {tokens:.4g} tokens lie outside its {'/'.join(stages)} checkpoints ({span}); "
                         "no extrapolation")
    return float(np.interp(np.log(tokens), np.log(t), [float(c[column]) for c in pts]))


def compare_at_tokens(runs: Sequence[RunResult], column: str = "heldout_loss", tokens: float | None = None):
    """``column`` of every run at one token count (:func:`value_at_tokens`); ``tokens=None`` takes the
    largest count all runs reached before their decay stage. Columns: ``run, activation, scale,
    n_params, width_depth_ratio, tokens, value``."""
    import pandas as pd

    runs = list(runs)
    if tokens is None:
        tokens = min(_last_stable(r)["tokens"] for r in runs)
    return pd.DataFrame([{"run": r.name, "activation": r.activation, "scale": r.scale, "n_params": r.n_params,
                          "width_depth_ratio": r.width_depth_ratio, "tokens": tokens,
                          "value": value_at_tokens(r, tokens, column)} for r in runs])


# ---------------------------------------------------------------------------
# series for the fitting code
# ---------------------------------------------------------------------------
def checkpoint_series(run: RunResult, column: str = "activation_ratio", *, stages: Sequence[str] = PRE_DECAY,
                      min_tokens_per_param: float = 0.0, segment: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """``(D in billions of tokens, values)`` of the run's checkpoints in ``stages`` with at least
    ``min_tokens_per_param`` tokens per non-embedding parameter.

    ``segment``: ``"all"``; ``"falling"``: the checkpoints up to and including the lowest value;
    ``"rising"``: from the lowest value on (the part of a U-shaped curve that runs in the
    direction of Eq. 4, or of Eq. 5).
    """
    unknown = sorted(set(stages) - set(STAGES))
    if unknown or not stages:
        raise ValueError(f"stages must be a non-empty selection of {STAGES}, got {list(stages)}")
    if segment not in SEGMENTS:
        raise ValueError(f"segment must be one of {SEGMENTS}, got {segment!r}")
    pts = [c for c in run.checkpoints if c["stage"] in stages and c["tokens"] >= min_tokens_per_param * run.n_params]
    if not pts:
        raise ValueError(f"{run.key}: no checkpoint in stages {list(stages)} with >= {min_tokens_per_param:g} "
                         f"tokens per parameter (its last has {run.checkpoints[-1]['tokens'] / run.n_params:.0f})")
    if any(c.get(column) is None for c in pts):
        raise ValueError(f"{run.key}: some checkpoints have no {column!r}")
    D = np.array([c["tokens"] for c in pts], dtype=float) / TOKENS_PER_UNIT
    y = np.array([c[column] for c in pts], dtype=float)
    i = int(np.argmin(y))
    keep = {"all": slice(None), "falling": slice(0, i + 1), "rising": slice(i, None)}[segment]
    return D[keep], y[keep]


def activation_series(run: RunResult, **kw) -> ActivationSeries:
    """The run's activation-vs-data series (``D`` in billions, PPL-1% activation ratio) for
    :mod:`sparsing_utils.fitting`; keywords as :func:`checkpoint_series`."""
    D, A = checkpoint_series(run, "activation_ratio", **kw)
    return ActivationSeries(run.name, run.activation, run.scale, D, A)


def fit_activation_laws(runs: Iterable[RunResult], *, n_bootstrap: int = 200, seed: int = 0,
                        bootstrap: str = "residual", **series_kw) -> dict:
    """The paper's law per run (Eq. 4 for ReLU, Eq. 5 for SiLU) on :func:`activation_series`
    (keywords: ``stages``, ``min_tokens_per_param``, ``segment``), with bootstrap intervals for ``A0``.
    Returns ``{run name: LawFit}``."""
    from .fitting import fit_law

    out = {}
    for r in runs:
        s = activation_series(r, **series_kw)
        out[r.name] = fit_law(s.D, s.A, s.law, n_bootstrap=n_bootstrap, seed=seed, bootstrap=bootstrap)
    return out


def limit_table(runs: Iterable[RunResult], fits: Mapping):
    """One row per run with a fit: the law's limit (``A0`` of Eqs. 4/5, ``L0`` of the loss law) and
    its bootstrap interval (``<limit>_lo``, ``<limit>_hi``), the fit's points, range (``D/N``),
    RMSE and coefficients on a bound, beside the measured ratios (``A_min``, ``A_last_stable``,
    ``A_final``)."""
    import pandas as pd

    rows = []
    for r in runs:
        if r.name not in fits:
            continue
        f = fits[r.name]
        lim = f.spec.limit_name
        lo, hi = f.limit_ci or (np.nan, np.nan)
        s = _summary(r)
        rows.append({k: s[k] for k in ("sweep", "run", "activation", "scale", "n_params", "width_depth_ratio")} | {
            "law": f.spec.reference, "n_points": f.n_points, "DN_first": float(f.D[0]) * TOKENS_PER_UNIT / r.n_params,
            "DN_last": float(f.D[-1]) * TOKENS_PER_UNIT / r.n_params, lim: f.params[lim], f"{lim}_lo": lo,
            f"{lim}_hi": hi, "rmse": f.rmse, "at_bound": ", ".join(f.at_bound)} | {
            k: s[k] for k in ("A_min", "A_last_stable", "A_final")})
    return pd.DataFrame(rows)


def limit_points(table, source: str, value: str = "A0", sd: float | None = None):
    """Rows for a figure of limits across scales (Fig. 7): ``activation, source, n_params, value,
    lo, hi`` from any table with ``activation``, ``n_params`` and ``value`` columns. The interval is
    ``value`` +- ``sd`` when given, else the table's ``<value>_lo``/``<value>_hi`` (empty if none)."""
    import pandas as pd

    missing = [c for c in ("activation", "n_params", value) if c not in table]
    if missing:
        raise ValueError(f"the table lacks {missing}; it has {list(table.columns)}")
    v = table[value].astype(float)
    if sd is not None:
        lo, hi = v - sd, v + sd
    elif f"{value}_lo" in table:
        lo, hi = table[f"{value}_lo"].astype(float), table[f"{value}_hi"].astype(float)
    else:
        lo = hi = pd.Series(np.nan, index=table.index)
    return pd.DataFrame({"activation": table["activation"], "source": source, "n_params": table["n_params"].astype(float),
                         "value": v, "lo": lo, "hi": hi}).reset_index(drop=True)


def fit_loss_limits(runs: Iterable[RunResult], *, column: str = "heldout_loss", min_tokens_per_param: float = 0.0,
                    n_bootstrap: int = 200, seed: int = 0) -> dict:
    """Fig. 6 / Fig. 12: ``L(D) = L0 + k D^-beta`` fitted to each run's pre-decay ``column``
    (held-out loss by default) from ``min_tokens_per_param`` on. Returns ``{run name: LawFit}``."""
    from .analysis import fit_limit_loss

    out = {}
    for r in runs:
        D, L = checkpoint_series(r, column, min_tokens_per_param=min_tokens_per_param)
        out[r.name] = fit_limit_loss(D, L, n_bootstrap=n_bootstrap, seed=seed)
    return out


# ---------------------------------------------------------------------------
# noise: runs that differ only in their seed
# ---------------------------------------------------------------------------
_NOT_CONFIG = ("seed", "name", "corpus")


def _model_config(r: RunResult) -> dict:
    """The run's config without seed/name/corpus, through TrainConfig (so runs trained before issue 10,
    whose dense configs say num_experts 1 / experts_top_k 1 and lack the MoE-only fields, compare
    equal to the same dense config written today)."""
    from .training import TrainConfig

    cfg = TrainConfig.from_dict(r.config)
    d = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_CONFIG}
    if not cfg.is_moe:
        for k in ("num_experts", "experts_top_k", "moe_style", "router_aux_loss_coef"):
            d.pop(k)
    return d


def _check_seed_group(runs: Sequence[RunResult]) -> None:
    if len(runs) < 2:
        raise ValueError(f"a seed spread needs at least 2 runs, got {len(runs)}")
    base = _model_config(runs[0])
    for r in runs[1:]:
        other = _model_config(r)
        diff = sorted(k for k in base.keys() | other.keys() if base.get(k) != other.get(k))
        if diff:
            raise ValueError(f"{r.key} differs from {runs[0].key} in {diff}, not only in the seed; "
                             "a seed spread compares repeats of one config")
    seeds = [r.config["seed"] for r in runs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"the runs repeat a seed ({seeds}); give each seed once (drop aliases)")


SPREAD_QUANTITIES = ("A_min", "A_last_stable", "A_final", "rise_from_min", "rise_before_epoch1",
                     "heldout_loss_last_stable", "heldout_loss_final", "cett")


def seed_spread(runs: Sequence[RunResult], quantities: Sequence[str] = SPREAD_QUANTITIES):
    """The spread of one config over its seeds (the noise floor of every comparison between runs):
    one row per quantity of :func:`run_table` with ``mean``, ``std`` (sample, ddof 1), ``min``,
    ``max``, ``n`` and the values by seed."""
    import pandas as pd

    runs = list(runs)
    _check_seed_group(runs)
    t = run_table(runs).set_index("seed")
    rows = []
    for q in quantities:
        v = t[q].astype(float)
        rows.append({"quantity": q, "mean": v.mean(), "std": v.std(ddof=1), "min": v.min(), "max": v.max(),
                     "n": len(v), **{f"seed{s}": float(x) for s, x in v.items()}})
    return pd.DataFrame(rows).set_index("quantity")


def seed_band(runs: Sequence[RunResult], column: str = "activation_ratio"):
    """Per checkpoint, the spread of ``column`` over the seeds: ``tokens, stage, mean, std, min, max``
    (the runs share their checkpoint positions, having the same config)."""
    import pandas as pd

    runs = list(runs)
    _check_seed_group(runs)
    vals = np.array([[c[column] for c in r.checkpoints] for r in runs], dtype=float)  # [seeds, checkpoints]
    ck = runs[0].checkpoints
    return pd.DataFrame({"tokens": [c["tokens"] for c in ck], "stage": [c["stage"] for c in ck],
                         "mean": vals.mean(0), "std": vals.std(0, ddof=1), "min": vals.min(0), "max": vals.max(0)})


# ---------------------------------------------------------------------------
# activation patterns (Figs. 9, 10)
# ---------------------------------------------------------------------------
def pattern_checkpoint(run: RunResult, which: str = "last-stable") -> dict:
    """The pattern record of ``which``: ``"last-stable"`` (the last checkpoint before the decay),
    ``"final"`` or a checkpoint name."""
    pats = (run.data.get("patterns") or {}).get("checkpoints") or []
    if not pats:
        raise ValueError(f"{run.key} has no activation patterns; track it with `sparsing track`")
    if which == "final":
        return pats[-1]
    if which == "last-stable":
        pre = [p for p in pats if p["stage"] in PRE_DECAY]
        if pre:
            return pre[-1]
    else:
        for p in pats:
            if p["name"] == which:
                return p
    raise ValueError(f"{run.key} has no pattern for {which!r}; it has {[p['name'] for p in pats]} "
                     "('last-stable', 'final' or one of these names)")


def _domain(run: RunResult, pat: dict, domain: str) -> dict:
    if domain not in pat["domains"]:
        raise ValueError(f"{run.key} has no pattern for domain {domain!r}; it has {sorted(pat['domains'])}")
    return pat["domains"][domain]


def neuron_frequency_frame(runs: Iterable[RunResult], which: str = "last-stable", domains: Sequence[str] | None = None):
    """Fig. 9: one row per (run, domain, layer, neuron) with its activation frequency (the share of
    held-out tokens on which the neuron is activated under the run's PPL-1% thresholds)."""
    import pandas as pd

    frames = []
    for r in runs:
        pat = pattern_checkpoint(r, which)
        for d in domains or sorted(pat["domains"]):
            freq = np.asarray(_domain(r, pat, d)["neuron_frequency"], dtype=float)  # [layers, d_ff]
            layer = np.repeat(np.arange(freq.shape[0]), freq.shape[1])
            frames.append(pd.DataFrame({"layer": layer, "frequency": freq.ravel()}).assign(
                run=r.name, activation=r.activation, scale=r.scale, n_params=r.n_params, domain=d))
    return pd.concat(frames, ignore_index=True)


def pattern_table(runs: Iterable[RunResult], which: str = "last-stable", quantiles: Sequence[float] = (0.1, 0.5, 0.9)):
    """Per (run, domain): activation ratio and dead-neuron share (activated on < 0.1% of tokens) of
    the pattern, and quantiles of the per-neuron activation frequency."""
    import pandas as pd

    rows = []
    for r in runs:
        pat = pattern_checkpoint(r, which)
        for d in sorted(pat["domains"]):
            dom = pat["domains"][d]
            freq = np.asarray(dom["neuron_frequency"], dtype=float).ravel()
            rows.append({"run": r.name, "activation": r.activation, "scale": r.scale, "n_params": r.n_params,
                         "checkpoint": pat["name"], "stage": pat["stage"], "domain": d, "n_tokens": dom["n_tokens"],
                         "n_neurons": freq.size, "activation_ratio": dom["activation_ratio"],
                         "dead_share": dom["dead_share"], "dead_neurons": round(dom["dead_share"] * freq.size),
                         **{f"q{round(100 * q)}": float(np.quantile(freq, q)) for q in quantiles}})
    return pd.DataFrame(rows)


def token_ratios(run: RunResult, domain: str, which: str = "last-stable", by: str = "position"):
    """Per-token activation ratios (mean over layers) on the run's fixed token set of ``domain``.

    ``by="position"``: one value per held-out position (a NumPy array); ``by="vocabulary"``: the
    mean per vocabulary token id (a pandas Series indexed by id), as the paper's Fig. 10; this needs
    the token ids, which results record from ``patterns.token_ids`` on.
    """
    tar = pattern_checkpoint(run, which).get("token_activation_ratio") or {}
    if domain not in tar:
        raise ValueError(f"{run.key} has no per-token ratios for domain {domain!r}; it has {sorted(tar)}")
    values = np.asarray(tar[domain], dtype=float)
    if by == "position":
        return values
    if by != "vocabulary":
        raise ValueError(f"by must be 'position' or 'vocabulary', got {by!r}")
    ids = ((run.data.get("patterns") or {}).get("token_ids") or {}).get(domain)
    if ids is None:
        raise ValueError(f"{run.key} records no token ids of its token set (tracked before `track` wrote "
                         "patterns.token_ids): compare by='position', or track the run again")
    import pandas as pd

    if len(ids) != len(values):
        raise ValueError(f"{run.key}: {len(ids)} token ids for {len(values)} per-token ratios in domain {domain!r}")
    return pd.Series(values).groupby(np.asarray(ids)).mean().rename_axis("token_id")


def _same_token_set(a: RunResult, b: RunResult, domain: str) -> None:
    pa, pb = a.data.get("patterns") or {}, b.data.get("patterns") or {}
    ca, cb = a.data.get("corpus") or {}, b.data.get("corpus") or {}
    checks = {"block length": (pa.get("block_len"), pb.get("block_len")),
              "token set size": (pa.get("token_set_per_domain"), pb.get("token_set_per_domain")),
              "held-out split": (ca.get("heldout_tokens"), cb.get("heldout_tokens")),
              "corpus builder": ((ca.get("builder") or {}).get("args"), (cb.get("builder") or {}).get("args"))}
    ia, ib = (pa.get("token_ids") or {}).get(domain), (pb.get("token_ids") or {}).get(domain)
    if ia is not None and ib is not None:
        checks["token ids"] = (ia, ib)
    bad = [k for k, (x, y) in checks.items() if x != y]
    if bad:
        raise ValueError(f"{a.key} and {b.key} were measured on different token sets ({', '.join(bad)} differ); "
                         "per-token ratios can only be paired on the same held-out tokens")


def token_ratio_pair(a: RunResult, b: RunResult, domain: str, which: str = "last-stable",
                     by: str = "position") -> dict:
    """Fig. 10: the per-token activation ratios of two runs on the same tokens, and their Pearson
    correlation. Returns ``{"x", "y", "r", "n", "domain", "a", "b", "by"}`` (``x`` from ``a``)."""
    _same_token_set(a, b, domain)
    x, y = token_ratios(a, domain, which, by), token_ratios(b, domain, which, by)
    if by == "vocabulary":
        x, y = x.align(y, join="inner")
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) != len(y) or len(x) < 3:
        raise ValueError(f"{a.key} and {b.key}: {len(x)} and {len(y)} per-token ratios in {domain!r}; need equal "
                         "lengths of at least 3")
    return {"x": x, "y": y, "r": float(np.corrcoef(x, y)[0, 1]), "n": len(x), "domain": domain,
            "a": a.name, "b": b.name, "by": by}


# ---------------------------------------------------------------------------
# Pareto points of the final checkpoint (Figs. 2 and 3 on our own runs)
# ---------------------------------------------------------------------------
def pareto_frame(runs: Iterable[RunResult]):
    """The ``pareto`` points of each run that has them (``sparsing track --pareto``): one row per
    sparse pass of the final checkpoint, columns run, activation, rule (``cett``, or ``experts`` for
    an MoE run's routed-experts points), value, activation_ratio, ppl, ppl_ratio (and
    activation_ratio_ran for MoE runs), ordered by run and activation ratio. For Fig. 2 also
    ``neurons`` (FFN neurons of a layer: ``d_ff``, an MoE's ``num_experts * d_ff``),
    ``active_neurons`` (activated per token and layer: activation_ratio x neurons) and ``top_k``
    (the experts per token the run was trained with; 0 for dense runs). Runs without points are
    left out; none at all is an error naming how to get them."""
    import pandas as pd

    rows = []
    for r in runs:
        par = r.data.get("pareto")
        if not par:
            continue
        experts = int(r.config.get("num_experts") or 0)
        moe = experts >= 2  # dense configs say 0 (or 1, before issue 10)
        neurons = int(r.data["plan"]["d_ff"]) * (experts if moe else 1)
        top_k = int(r.config["experts_top_k"]) if moe else 0
        for row in par["rows"]:
            rows.append({"run": r.name, "activation": r.activation, "checkpoint": par["name"], **row,
                         "neurons": neurons, "active_neurons": row["activation_ratio"] * neurons, "top_k": top_k})
    if not rows:
        raise ValueError("no run has Pareto points: track the run with `sparsing track ... --pareto 0.05,0.1,0.2`")
    return pd.DataFrame(rows).sort_values(["run", "rule", "activation_ratio"], kind="stable").reset_index(drop=True)

