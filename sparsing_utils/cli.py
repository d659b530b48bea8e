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

    # -- sparsing fit -------------------------------------------------------
    fit = sub.add_parser("fit", help="fit an activation-vs-data law (Eq. 4/5 or an alternative) to a series")
    fit.add_argument("--input", required=True, help='series JSON: {"token_passed": [...], "activation_ratio": [...]}')
    fit.add_argument("--law", required=True, choices=["relu", "silu", "log", "sigmoid"])
    fit.add_argument("--out", required=True, help="where to write fit.json (written atomically)")
    fit.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the A0 interval")
    fit.add_argument("--seed", type=int, default=0)
    fit.set_defaults(func=_cmd_fit)
    return parser


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
    except (ValueError, FileNotFoundError) as err:
        print(f"sparsing {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
