"""Sparsity through training: Algorithm 1 over a run's checkpoints, and activation patterns.

``track(run_dir)`` (the ``sparsing track`` command) reads a run folder written by
:func:`sparsing_utils.trainer.train` and writes the run's shipped result
(``data/runs/<sweep>/<run>.json``):

* **Algorithm 1** (PAPER.md Sec. 1): ONE CETT ``c`` for the list of the run's *stable-stage*
  checkpoints, searched so that their mean PPL ratio is ``1 + p/100``
  (``su.search_checkpoints`` over one ``su.SparsityProbe`` per checkpoint, all on the same
  held-out blocks). The list is the stable stage because the paper's activation curves use
  checkpoints before the decay, and warmup checkpoints are barely trained models whose PPL
  response to truncation would pull ``c`` away from the curve being fitted. Every other
  checkpoint (warmup, decay, the final one) is then measured at that same ``c``.
* **per checkpoint**: tokens, stage, training and held-out loss, dense/sparse PPL, activation
  ratio, per-layer ratios and CETT, thresholds; for an MoE run also ``activation_ratio_ran`` and
  ``layer_activation_ratio_ran`` (over the neurons of the experts that ran for each token, as
  :class:`~sparsing_utils.results.PPLPResult` has them; ``activation_ratio`` counts over all expert
  neurons). The pattern frequencies count over all expert neurons.
* **patterns** (Fig. 9 and 10) for chosen checkpoints (default: the last stable one and the
  final one), under their PPL-p% thresholds: per-neuron activation frequency per layer on held-out
  prose and on held-out code separately, the dead-neuron share (activated on < 0.1% of tokens, the
  paper's definition) and per-token activation ratios on a fixed token set (the first held-out
  tokens of each domain: the same tokens for every run that shares the corpus and block length),
  whose token ids are recorded once (``patterns.token_ids``: per domain, a list of ints) so that
  ratios can also be averaged per vocabulary token, as the paper's Fig. 10 does.
* **pareto** (optional, ``pareto=[c, ...]``; Fig. 2 and 3 on our own runs): on the final checkpoint, one
  sparse pass per CETT target (exact thresholds) and, for an MoE run, one per number of routed experts
  ``k = 1..E`` (every neuron of the experts that ran kept: ``pareto_sweep(probe, "experts", ...)``), each
  with its PPL ratio and activation ratio, on the search's held-out blocks.
* the config, plan, corpus summary, code versions and the throughput/MFU summary of ``log.jsonl``.

Floats are rounded (4 significant digits for frequencies and per-token ratios) so a run's JSON
stays well under 2 MB.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["DEAD_FREQUENCY", "pattern_statistics", "throughput_summary", "track"]

DEAD_FREQUENCY = 1e-3  # a neuron activated on fewer than 0.1% of tokens is dead (the paper's definition)
FORMAT = "sparsing-run/1"


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}") if math.isfinite(x) else x


def _sigs(values, digits: int = 4) -> list:
    return [_sig(float(v), digits) for v in values]


def throughput_summary(run_dir: str | os.PathLike, *, skip_fraction: float = 0.1) -> dict:
    """Speed of a run from its ``log.jsonl``: median tokens/s and MFU over the logged intervals
    after the first ``skip_fraction`` of steps (compilation and warmup), wall time of the training
    segments (a resumed run has several), GPU-seconds (wall x processes) and a loss curve of at
    most 256 points."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    train = [r for r in records if r.get("event") == "train"]
    if not train:
        return {}
    last = max(r["step"] for r in train)
    steady = [r for r in train if r["step"] > skip_fraction * last] or train
    segments, wall, world, device = [], 0.0, 1, None
    for r in records:
        if r.get("event") in ("start", "resume"):
            segments.append([r["time"], r["time"]])
            world, device = r.get("world_size", world), r.get("device", device)
        elif "time" in r and segments:
            segments[-1][1] = r["time"]
    wall = sum(b - a for a, b in segments)
    idx = sorted({round(i) for i in torch.logspace(0, math.log10(len(train)), 256).tolist()})
    curve = [train[i - 1] for i in idx if 1 <= i <= len(train)]
    return {
        "tokens_per_s": _sig(statistics.median(r["tokens_per_s"] for r in steady), 5),
        "mfu": _sig(statistics.median(r["mfu"] for r in steady), 4),
        "wall_seconds": round(wall, 1),
        "gpu_seconds": round(wall * world, 1) if device and device != "cpu" else 0.0,
        "world_size": world,
        "device": device,
        "segments": len(segments),
        "steps_logged": len(train),
        "loss_curve": {"tokens": [r["tokens"] for r in curve], "loss": _sigs([r["loss"] for r in curve], 5),
                       "lr": _sigs([r["lr"] for r in curve], 4)},
    }


@torch.no_grad()
def pattern_statistics(model, blocks, thresholds: Sequence[float], *, token_set: int, batch_size: int = 8) -> dict:
    """One sparse pass under PPL-p% thresholds: per-neuron activation counts ``[layers, d_ff]``
    and the per-token activation ratio (mean over layers) of the first ``token_set`` tokens."""
    import sparsing_utils as su

    sites = su.find_ffn_sites(model)
    dev = next(model.parameters()).device
    counts = [torch.zeros(s.d_ff, dtype=torch.float64, device=dev) for s in sites]  # [d_ff] per layer
    n_tok = blocks.input_ids.numel()
    per_token = torch.zeros(len(sites), n_tok, device=dev)  # [layers, tokens]
    state = {"start": 0, "stop": 0}

    def record(site, keep):  # keep [batch, seq, d_ff]
        counts[site.index] += keep.sum(dim=(0, 1), dtype=torch.float64)
        per_token[site.index, state["start"]:state["stop"]] = keep.float().mean(dim=-1).flatten()

    with su.apply_rule(model, su.CETTRule(list(thresholds)), sites=sites, record=record, check_finite=False):
        for ids, _ in blocks.batches(batch_size):
            state["start"], state["stop"] = state["stop"], state["stop"] + ids.numel()
            model(input_ids=ids.to(dev), use_cache=False)
    freq = torch.stack([c / n_tok for c in counts]).cpu()  # [layers, d_ff]
    return {"n_tokens": n_tok, "frequency": freq, "token_ratio": per_token.mean(dim=0)[:token_set].cpu()}


def _pattern_record(model, blocks_by_domain: dict, thresholds, token_set: int, batch_size: int) -> dict:
    domains, all_counts, all_tokens = {}, None, 0
    token_ratio = {}
    for d, blocks in blocks_by_domain.items():
        st = pattern_statistics(model, blocks, thresholds, token_set=token_set, batch_size=batch_size)
        freq = st["frequency"]
        dead = freq < DEAD_FREQUENCY
        domains[d] = {"n_tokens": st["n_tokens"], "activation_ratio": _sig(float(freq.mean()), 5),
                      "dead_share": _sig(float(dead.float().mean()), 4),
                      "layer_dead_share": _sigs(dead.float().mean(dim=1)),
                      "neuron_frequency": [_sigs(row) for row in freq]}
        token_ratio[d] = _sigs(st["token_ratio"], 3)
        counts = freq * st["n_tokens"]
        all_counts = counts if all_counts is None else all_counts + counts
        all_tokens += st["n_tokens"]
    return {"domains": domains, "dead_share_all": _sig(float((all_counts / all_tokens < DEAD_FREQUENCY).float().mean()), 4),
            "token_activation_ratio": token_ratio}


def _choose_mode(mode: str, device: torch.device, n_probes: int, tokens: int, cfg, plan: dict) -> str:
    if mode != "auto":
        return mode
    need = n_probes * tokens * plan["d_ff"] * cfg.num_layers * 4 * 1.1  # stored float32 activations
    budget = (16 if device.type == "cuda" else 2) * 2**30
    return "memory" if need <= budget else "stream"


def _pareto_record(probe, cett_targets: Sequence[float]) -> dict:
    """Fig. 2/3 points of one checkpoint: a sparse pass per CETT target and, for MoE models, per
    number of routed experts ``k = 1..E`` (the fewest experts of any MoE layer)."""
    import pandas as pd

    from .moe import moe_layers
    from .pareto import pareto_sweep

    frames = [pareto_sweep(probe, "cett", list(cett_targets))]
    layers = moe_layers(probe.sites)
    if layers:
        frames.append(pareto_sweep(probe, "experts", list(range(1, min(m.num_experts for m in layers) + 1))))
    rows = pd.concat(frames, ignore_index=True).to_dict("records")
    return {"name": probe.name, "ppl_dense": _sig(probe.dense.ppl, 7),
            "rows": [{k: (v if isinstance(v, str) else _sig(float(v), 7)) for k, v in r.items()
                      if not (isinstance(v, float) and math.isnan(v))} for r in rows]}


def check_pareto_targets(pareto: Sequence[float]) -> list[float]:
    """CETT targets for :func:`track`'s Pareto points, checked before any work."""
    out = [float(c) for c in pareto]
    bad = [c for c in out if not (0.0 < c < 1.0) or not math.isfinite(c)]
    if bad:
        raise ValueError(f"Pareto CETT targets must lie in (0, 1), got {bad}: pass e.g. 0.02,0.05,0.1,0.2,0.4")
    return sorted(set(out))


def track(run_dir: str | os.PathLike, *, p: float = 1.0, out: str | os.PathLike | None = None,
          tokens: int = 32768, device: str = "auto", mode: str = "auto", corpus: str | None = None,
          block_len: int | None = None, pattern_tokens: int = 16384, token_set: int = 1024,
          search_stages: Sequence[str] = ("stable",), pattern_checkpoints: Sequence[str] = ("last-stable", "final"),
          tol: float = 1e-3, sweep: str | None = None, pareto: Sequence[float] = (), progress: bool = True) -> dict:
    """Algorithm 1 and activation patterns of a run (module docstring); writes ``out`` atomically.

    ``tokens``: held-out tokens for the search, split over domains by the run's mixture;
    ``pattern_tokens``/``token_set``: held-out tokens per domain for the frequencies and for the
    per-token ratios; ``pattern_checkpoints``: checkpoint names or ``last-stable``/``final``;
    ``pareto``: CETT targets of the final checkpoint's Pareto points (empty: none).
    """
    import sparsing_utils as su

    from .checkpoints import list_checkpoints, load_checkpoint_model
    from .jsonio import atomic_write_json
    from .measure import check_search_options
    from .shards import open_corpus
    from .training import code_version, load_run_config

    start = time.perf_counter()
    run_dir = Path(run_dir)
    check_search_options([p], tol)
    pareto = check_pareto_targets(pareto)
    cfg, saved = load_run_config(run_dir)
    ckpts = list_checkpoints(run_dir)  # every checkpoint is checked here: a corrupt one stops us before any work
    if not ckpts:
        raise ValueError(f"run {run_dir} has no complete checkpoint yet (training stopped before the first); "
                         "train it further (`sparsing train ... --resume`) before tracking")
    unknown = sorted(set(search_stages) - {"warmup", "stable", "decay"})
    if unknown:
        raise ValueError(f"unknown search stage(s) {unknown}: use warmup, stable, decay")
    searched = [c for c in ckpts if c.stage in search_stages] or [ckpts[-1]]
    stable = [c for c in ckpts if c.stage in ("warmup", "stable")]
    aliases = {"final": ckpts[-1], "last-stable": (stable or ckpts)[-1]}
    by_name = {c.name: c for c in ckpts}
    chosen = []
    for name in pattern_checkpoints:
        if name not in aliases and name not in by_name:
            raise ValueError(f"pattern checkpoint {name!r} is not 'final', 'last-stable' or one of {list(by_name)}")
        ck = aliases.get(name) or by_name[name]
        if ck.name not in {x.name for x in chosen}:
            chosen.append(ck)
    corp = open_corpus(corpus or cfg.corpus)
    plan = saved["plan"]
    if corp.vocab_size != plan["corpus_vocab_size"]:
        raise ValueError(f"corpus {corp.path} has vocabulary {corp.vocab_size}, the run was trained on "
                         f"{plan['corpus_vocab_size']}: pass the run's corpus (--corpus)")
    block_len = int(block_len or min(cfg.seq_len, 512))
    mixture = saved.get("mixture") or {d: 1.0 / len(corp.heldout) for d in corp.heldout}
    split = {d: max(block_len, round(tokens * w / block_len) * block_len)
             for d, w in sorted(mixture.items()) if w > 0 and d in corp.heldout}
    if not split:
        raise ValueError(f"corpus {corp.path} has no held-out split for the run's domains {sorted(mixture)}")
    blocks = corp.heldout_blocks(split, block_len)
    pattern_blocks = {d: corp.heldout_blocks({d: pattern_tokens}, block_len) for d in sorted(corp.heldout)}
    if token_set > pattern_tokens:
        raise ValueError(f"token_set ({token_set}) must not exceed pattern_tokens ({pattern_tokens})")

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    mode = _choose_mode(mode, dev, len(searched), blocks.n_tokens, cfg, plan)

    def probe(ck):
        return su.SparsityProbe(load_checkpoint_model(ck, device=dev), blocks, mode=mode, name=ck.name,
                                progress=progress)

    probes = {ck.name: probe(ck) for ck in searched}
    result = su.search_checkpoints([probes[c.name] for c in searched], p, tol=tol)
    c = float(result.cett)
    measured = {name: r for name, r in zip(result.names, result.checkpoints)}
    records, patterns, pareto_rec = [], [], None
    for ck in ckpts:
        pr = probes.get(ck.name) or probe(ck)
        if ck.name in measured:
            r = measured[ck.name]
            rec = {"ppl_dense": r.ppl_dense, "ppl_sparse": r.ppl_sparse, "ppl_ratio": r.ppl_ratio,
                   "activation_ratio": r.activation_ratio, "layer_activation_ratio": r.layer_activation_ratio,
                   "layer_cett": r.layer_cett, "thresholds": r.thresholds,
                   "activation_ratio_ran": r.activation_ratio_ran,
                   "layer_activation_ratio_ran": r.layer_activation_ratio_ran}
        else:
            eps, cett = pr.thresholds_for(c)
            s = pr.sparse_pass(su.CETTRule(eps), per_token=False)
            rec = {"ppl_dense": pr.dense.ppl, "ppl_sparse": s.ppl, "ppl_ratio": s.ppl / pr.dense.ppl,
                   "activation_ratio": s.activation_ratio, "layer_activation_ratio": s.layer_active.tolist(),
                   "layer_cett": cett.tolist(), "thresholds": eps.tolist(),
                   "activation_ratio_ran": s.activation_ratio_ran,
                   "layer_activation_ratio_ran": None if s.layer_active_ran is None else s.layer_active_ran.tolist()}
        st = ck.state
        records.append({
            "name": ck.name, "tokens": ck.tokens, "step": ck.step, "stage": ck.stage,
            "in_search": ck.name in measured, "train_loss": st.get("train_loss"), "heldout_loss": st.get("heldout_loss"),
            "heldout_loss_by_domain": st.get("heldout_loss_by_domain"), "epochs": st.get("epochs"), "lr": st.get("lr"),
            **{k: (_sigs(v, 6) if isinstance(v, list) else _sig(float(v), 7)) for k, v in rec.items() if v is not None}})
        if ck.name in {x.name for x in chosen}:
            bs = max(1, pr.batch_size)
            patterns.append({"name": ck.name, "tokens": ck.tokens, "stage": ck.stage, "thresholds": rec["thresholds"],
                             **_pattern_record(pr.model, pattern_blocks, rec["thresholds"], token_set, bs)})
        if pareto and ck is ckpts[-1]:
            pareto_rec = _pareto_record(pr, pareto)
        if ck.name not in probes:
            pr.release()
            del pr
    for pr in probes.values():
        pr.release()
    summary = throughput_summary(run_dir)
    payload = {
        "format": FORMAT, "run": cfg.name or run_dir.name, "sweep": sweep,
        "config": saved["config"], "plan": plan, "corpus": saved.get("corpus"), "mixture": saved.get("mixture"),
        "code_version": {"training": saved.get("code_version"), "tracking": code_version()},
        "training_env": {k: saved.get(k) for k in ("torch", "transformers", "device", "world_size", "amp_dtype")},
        "throughput": {k: v for k, v in summary.items() if k != "loss_curve"},
        "loss_curve": summary.get("loss_curve"),
        "tracking": {"p": float(p), "cett": c, "mean_ppl_ratio": float(result.mean_ppl_ratio),
                     "converged": bool(result.converged), "message": result.message, "tol": tol,
                     "search_stages": list(search_stages), "search_checkpoints": list(result.names),
                     "text": {"block_len": block_len, "tokens_by_domain": {d: n // block_len * block_len
                                                                            for d, n in split.items()},
                              "n_tokens": blocks.n_tokens, "source": "held-out splits, first blocks"},
                     "mode": mode, "device": str(dev), "seconds": round(time.perf_counter() - start, 1)},
        "checkpoints": records,
        "patterns": {"block_len": block_len, "tokens_per_domain": pattern_tokens, "token_set_per_domain": token_set,
                     "dead_frequency": DEAD_FREQUENCY,
                     "token_ids": {d: b.input_ids.flatten()[:token_set].tolist() for d, b in pattern_blocks.items()},
                     "checkpoints": patterns},
    }
    if pareto_rec is not None:
        payload["pareto"] = pareto_rec
    if out is not None:
        atomic_write_json(out, payload, indent=None)
    return payload
