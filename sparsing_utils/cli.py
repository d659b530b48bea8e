"""Command line: ``sparsing measure`` (PPL-p% sparsity) and ``sparsing fit`` (the laws).

Thin wrappers over the package functions; every option maps to a keyword argument.
"""
from __future__ import annotations

import argparse
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
    m.add_argument("--tol", type=float, default=1e-3, help="tolerance on the PPL ratio (1e-3 = 0.1 point)")
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
    return parser


def _cmd_measure(args: argparse.Namespace) -> int:
    from .jsonio import check_writable
    from .measure import check_p_values, measure_sparsity

    check_p_values(args.p)  # fail before loading anything
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

    result = fit_series_file(args.input, law=args.law, out=args.out, n_bootstrap=args.bootstrap, seed=args.seed)
    print(result.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, OSError, FloatingPointError) as err:
        print(f"sparsing {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
