"""Command line: ``sparsing measure`` (PPL-p% sparsity), ``sparsing fit`` (the laws), ``sparsing train``
(pre-training small models), ``sparsing track`` (Algorithm 1 over a run's checkpoints) and
``sparsing evaluate`` (benchmarks of a dense or sparsified model through lm-evaluation-harness).

Thin wrappers over the package functions; every option maps to a keyword argument.
"""
from __future__ import annotations

import argparse
import json
import sys


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsing",
        description="PPL-p%% activation sparsity and the Sparsing Law (Luo et al., arXiv 2411.02335).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    # -- sparsing measure ---------------------------------------------------
    m = sub.add_parser("measure", help="PPL-p%% activation sparsity of a model on a text (Sec. 3.1)")
    m.add_argument("--model", default="smollm2",
                   help="'smollm2' (embedded default), a hub id, a local model folder or a .gguf file")
    m.add_argument("--text", default="pydoc",
                   help="built-in source (pydoc = English prose, stdlib = Python code), a .txt/.jsonl file, "
                        "or hf:NAME[:CONFIG][:SPLIT]")
    m.add_argument("--tokens", type=int, default=8192, help="token budget (whole blocks)")
    m.add_argument("--block-len", type=int, default=512, help="tokens per block")
    m.add_argument("--p", type=float, nargs="+", default=[1.0, 5.0, 10.0], help="PPL increase targets in %%")
    m.add_argument("--out", required=True, help="result JSON (written atomically)")
    m.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16, float16")
    m.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    m.add_argument("--batch-size", type=int, default=None, help="blocks per forward (default: by device)")
    m.add_argument("--mode", choices=["memory", "stream"], default="memory",
                   help="memory: keep activations (fast); stream: bounded memory")
    m.add_argument("--calibrate-on-split", action="store_true",
                   help="calibrate thresholds on the first half of the text, measure PPL on the second")
    m.add_argument("--tol", type=float, default=1e-3,
                   help="tolerance on the PPL ratio (1e-3 = 0.1 point, in (0, p/100)); smaller pins the activation "
                        "ratio more precisely (the table's +- column) at the cost of more sparse passes")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--quiet", action="store_true", help="no progress bars")
    m.set_defaults(func=_cmd_measure)

    # -- sparsing fit -------------------------------------------------------
    fit = sub.add_parser("fit", help="fit an activation-vs-data law (Eq. 4/5 or an alternative) to a series")
    fit.add_argument("--input", required=True, help='series JSON: {"token_passed": [...], "activation_ratio": [...]}')
    fit.add_argument("--law", required=True, choices=["relu", "silu", "log", "sigmoid"])
    fit.add_argument("--out", required=True, help="where to write fit.json (written atomically)")
    fit.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the A0 interval")
    fit.add_argument("--seed", type=int, default=0)
    fit.set_defaults(func=_cmd_fit)

    # -- sparsing train -----------------------------------------------------
    tr = sub.add_parser("train", help="pre-train a small Llama-style model (one run; torchrun for several GPUs)")
    tr.add_argument("--config", required=True, help="TrainConfig JSON (see configs/ and the README, 'Training lab')")
    tr.add_argument("--out", required=True, help="run folder (refused if it exists, unless --resume)")
    tr.add_argument("--resume", action="store_true", help="continue from the run's latest complete checkpoint")
    tr.add_argument("--corpus", default=None, help="corpus folder (overrides the config's 'corpus')")
    tr.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda")
    tr.add_argument("--compile", dest="compile", action="store_true", default=None,
                    help="torch.compile the decoder layers and the loss (overrides the config)")
    tr.add_argument("--no-compile", dest="compile", action="store_false", help="run eagerly (overrides the config)")
    tr.add_argument("--dry-run", action="store_true", help="check the config and corpus, print the plan, write nothing")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(func=_cmd_train)

    # -- sparsing track -----------------------------------------------------
    tk = sub.add_parser("track", help="PPL-p%% sparsity through training (Algorithm 1) and activation patterns of a run")
    tk.add_argument("--run", required=True, help="run folder written by `sparsing train`")
    tk.add_argument("--p", type=float, default=1.0, help="PPL increase target in %% (default 1)")
    tk.add_argument("--out", required=True, help="result JSON (data/runs/<sweep>/<run>.json; written atomically)")
    tk.add_argument("--tokens", type=int, default=32768, help="held-out tokens for the search (split by the mixture)")
    tk.add_argument("--pattern-tokens", type=int, default=16384, help="held-out tokens per domain for Fig. 9 frequencies")
    tk.add_argument("--token-set", type=int, default=1024, help="tokens per domain with per-token ratios (Fig. 10)")
    tk.add_argument("--block-len", type=int, default=None, help="tokens per block (default: min(seq_len, 512))")
    tk.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    tk.add_argument("--mode", choices=["auto", "memory", "stream"], default="auto",
                    help="memory: keep activations; stream: bounded memory; auto: memory when it fits")
    tk.add_argument("--corpus", default=None, help="corpus folder (default: the run's)")
    tk.add_argument("--sweep", default=None, help="sweep name recorded in the result")
    tk.add_argument("--tol", type=float, default=1e-3, help="tolerance on the mean PPL ratio")
    tk.add_argument("--pareto", default="", help="comma-separated CETT targets: Pareto points of the final checkpoint "
                                                 "(and, for MoE runs, every number of routed experts; Fig. 2, 3)")
    tk.add_argument("--quiet", action="store_true", help="no progress bars")
    tk.set_defaults(func=_cmd_track)

    # -- sparsing evaluate ----------------------------------------------------
    ev = sub.add_parser("evaluate", help="benchmarks of a dense or PPL-p%% sparsified model via lm-evaluation-harness "
                                         "(Tables 1, 4-6)")
    ev.add_argument("--model", default="smollm2",
                    help="'smollm2' (embedded default), a hub id, a local model folder or a .gguf file")
    ev.add_argument("--sparsity", default=None,
                    help="PPL-p%% result JSON written by `sparsing measure` (absent: the dense model)")
    ev.add_argument("--p", type=float, default=None, help="which of the result's p values to evaluate (with --sparsity)")
    ev.add_argument("--tasks", default="piqa,siqa,hellaswag,winogrande,copa,boolq,lambada",
                    help="comma-separated tasks: the offline ones (with --data-dir) or lm-eval's hub task names")
    ev.add_argument("--data-dir", default=None,
                    help="folder of the offline evaluation data (../shared/data); absent: lm-eval's hub datasets")
    ev.add_argument("--limit", type=int, default=None, help="the first N items of each task (default: all)")
    ev.add_argument("--out", required=True, help="eval.json (written atomically)")
    ev.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
    ev.add_argument("--bootstrap-iters", type=int, default=1000,
                    help="bootstrap resamples for standard errors without a closed form (LAMBADA perplexity)")
    ev.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16, float16")
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    ev.add_argument("--verbose", action="store_true", help="lm-eval's own log messages")
    ev.set_defaults(func=_cmd_evaluate)
    return parser


def _cmd_measure(args: argparse.Namespace) -> int:
    from .jsonio import check_writable
    from .measure import check_search_options, measure_sparsity

    check_search_options(args.p, args.tol)  # fail before loading anything
    check_writable(args.out)
    report = measure_sparsity(
        args.model, args.text, tokens=args.tokens, p=args.p, block_len=args.block_len, dtype=args.dtype,
        device=args.device, batch_size=args.batch_size, mode=args.mode,
        calibrate_on_split=args.calibrate_on_split, seed=args.seed, tol=args.tol, progress=not args.quiet,
    )
    report.save(args.out)
    print(f"model {report.model.get('spec')} | text {args.text} | {report.text.get('n_tokens', args.tokens)} tokens "
          f"| dense PPL {report.ppl_dense:.4f} | {report.seconds:.1f} s")
    print(report.table())
    print(f"written: {args.out}")
    return 0


def _cmd_fit(args: argparse.Namespace) -> int:
    from .fitting import fit_series_file
    from .jsonio import check_writable

    check_writable(args.out)  # before reading and fitting: a bad --out fails at once, in words
    result = fit_series_file(args.input, law=args.law, out=args.out, n_bootstrap=args.bootstrap, seed=args.seed)
    print(result.summary())
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    from .shards import open_corpus
    from .trainer import train
    from .training import TrainConfig, make_plan

    cfg = TrainConfig.from_json(args.config)
    if args.corpus:
        cfg = dataclasses.replace(cfg, corpus=args.corpus)
    if args.compile is not None:
        cfg = dataclasses.replace(cfg, compile=args.compile)
    if not cfg.name:
        cfg = dataclasses.replace(cfg, name=Path(args.out).name)
    if args.dry_run:
        import os

        corpus = open_corpus(cfg.corpus)
        plan = make_plan(cfg, corpus.vocab_size, int(os.environ.get("WORLD_SIZE", "1")))
        print(json.dumps({"config": cfg.to_dict(), "plan": plan.to_dict(), "corpus": corpus.summary()}, indent=1))
        return 0
    try:
        train(cfg, args.out, resume=args.resume, device=args.device, progress=not args.quiet)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    print(f"run written: {args.out}")
    return 0


def _cmd_track(args: argparse.Namespace) -> int:
    from .measure import check_search_options
    from .tracking import check_pareto_targets, track

    check_search_options(args.p, args.tol)  # before reading the run
    try:
        pareto = check_pareto_targets([float(c) for c in args.pareto.split(",") if c.strip()])
    except ValueError as err:
        raise SystemExit(f"sparsing track: --pareto {args.pareto!r}: {err}") from None
    r = track(args.run, p=args.p, out=args.out, tokens=args.tokens, device=args.device, mode=args.mode,
              corpus=args.corpus, block_len=args.block_len, pattern_tokens=args.pattern_tokens,
              token_set=args.token_set, tol=args.tol, sweep=args.sweep, pareto=pareto, progress=not args.quiet)
    t = r["tracking"]
    print(f"run {r['run']} | PPL-{t['p']:g}%: CETT {t['cett']:.4f}, mean PPL ratio {t['mean_ppl_ratio']:.4f} over "
          f"{len(t['search_checkpoints'])} checkpoints | {t['seconds']:.1f} s")
    moe = any("activation_ratio_ran" in c for c in r["checkpoints"])  # MoE runs: also over the experts that ran
    print(f"{'tokens':>14} {'stage':>7} {'loss':>7} {'held-out':>8} {'act. ratio':>10} "
          + (f"{'ran ratio':>10} " if moe else "") + f"{'PPL ratio':>9}")
    for c in r["checkpoints"]:
        held = c["heldout_loss"] if c["heldout_loss"] is not None else float("nan")
        ran = f"{c['activation_ratio_ran']:>10.4f} " if moe else ""
        print(f"{c['tokens']:>14,} {c['stage']:>7} {c['train_loss']:>7.3f} {held:>8.3f} {c['activation_ratio']:>10.4f} "
              f"{ran}{c['ppl_ratio']:>9.4f}")
    if moe:
        print("act. ratio: over all expert neurons of each layer; ran ratio: over the neurons of the experts that "
              "ran for each token")
    print(f"written: {args.out}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise ValueError("`sparsing evaluate` needs lm-evaluation-harness: pip install 'sparsing-law[eval]' "
                         "(or pip install lm-eval==0.4.13)")
    from .evaluation import run_evaluation

    tasks = [t for t in args.tasks.split(",") if t.strip()]
    report = run_evaluation(args.model, tasks, data_dir=args.data_dir, sparsity_file=args.sparsity, p=args.p,
                            limit=args.limit, out=args.out, batch_size=args.batch_size,
                            bootstrap_iters=args.bootstrap_iters, dtype=args.dtype, device=args.device,
                            verbose=args.verbose)
    ratio = "" if report.sparsity is None else \
        f" (metric's activation ratio {report.sparsity['activation_ratio_measured']:.4f}" + (
            f", over the experts that ran {report.sparsity['activation_ratio_ran_measured']:.4f}"
            if "activation_ratio_ran_measured" in report.sparsity else "") + ")"
    print(f"model {report.model.get('spec')} | {report.setting}{ratio} | lm-eval {report.lm_eval_version} "
          f"| {report.seconds:.1f} s")
    print(report.table())
    print(f"written: {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, OSError, FloatingPointError, NotImplementedError) as err:
        print(f"sparsing {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
