#!/usr/bin/env python
"""Add the token ids of the Fig. 10 token set to run results written before `track` recorded them.

The per-token activation ratios of a result (``patterns.checkpoints[*].token_ratio``) are measured
on the first ``patterns.token_set_per_domain`` held-out tokens of each domain; newer results also
hold their ids (``patterns.token_ids``), so that ratios can be averaged per vocabulary token
(``runs.token_ratios(..., by="vocabulary")``, Fig. 10). For older results this script takes the ids
from a ``scripts/heldout_token_ids.py`` file read from a corpus, **only** where the corpus is the
result's own: the same summary (train and held-out tokens per domain, unique tokens, builder
arguments, sources), block length and token-set size. It records where the ids came from in
``patterns.token_ids_source``; a result that already has ids must hold the same ones.

    python scripts/attach_token_ids.py --ids token_ids.json data/runs/*/*.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsing_utils.jsonio import atomic_write_json

SAME = ("vocab_size", "train_tokens", "heldout_tokens", "unique_tokens", "builder", "sources")


def attach(result_path: Path, ids: dict) -> str:
    """Attach the ids to one result file; returns what was done (or raises ValueError why not)."""
    r = json.loads(result_path.read_text())
    if r.get("format") != "sparsing-run/1":
        return "skipped (not a run result: an alias or another file)"
    corpus, pat = r.get("corpus") or {}, r.get("patterns") or {}
    differ = [k for k in SAME if corpus.get(k) != ids["corpus"].get(k)]
    if differ:
        raise ValueError(f"{result_path}: its corpus differs from the ids' corpus in {differ}; read the ids from "
                         "the corpus the run was tracked on (scripts/heldout_token_ids.py --corpus ...)")
    if (pat.get("block_len"), pat.get("token_set_per_domain")) != (ids["block_len"], ids["token_set_per_domain"]):
        raise ValueError(f"{result_path}: token set of {pat.get('token_set_per_domain')} tokens in blocks of "
                         f"{pat.get('block_len')}, the ids file has {ids['token_set_per_domain']} in blocks of "
                         f"{ids['block_len']}: run heldout_token_ids.py with --token-set/--block-len of the result")
    if pat.get("token_ids") is not None:
        if pat["token_ids"] != ids["token_ids"]:
            raise ValueError(f"{result_path}: recorded token ids differ from the corpus' ids")
        return "already has the same ids (recorded by track)"
    pat["token_ids"] = ids["token_ids"]
    pat["token_ids_source"] = ("recovered after tracking: scripts/heldout_token_ids.py on a rebuild of the same "
                               "corpus (identical summary), attached by scripts/attach_token_ids.py")
    atomic_write_json(result_path, r)
    return "ids attached"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ids", required=True, type=Path, help="output of scripts/heldout_token_ids.py")
    ap.add_argument("results", nargs="+", type=Path)
    args = ap.parse_args(argv)
    ids = json.loads(args.ids.read_text())
    if ids.get("format") != "sparsing-token-set/1":
        ap.error(f"{args.ids} is not a heldout_token_ids.py output (format sparsing-token-set/1)")
    for path in args.results:
        print(f"{path}: {attach(path, ids)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
