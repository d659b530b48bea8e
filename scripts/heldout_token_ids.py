#!/usr/bin/env python
"""The token ids of the per-token token set of `sparsing track` (Fig. 10), read from a corpus.

`sparsing track` measures per-token activation ratios on the first ``--token-set`` tokens of each
domain's held-out split (blocks of ``--block-len``). Results written before it recorded the ids
(``patterns.token_ids``) can get them back from the same corpus: this script writes them with the
corpus summary, and ``scripts/attach_token_ids.py`` adds them to result files whose corpus summary
(train and held-out token counts per domain, builder arguments, sources) is the same.

    python scripts/heldout_token_ids.py --corpus /tmp/lab/corpus --token-set 2048 --out token_ids.json
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsing_utils.jsonio import atomic_write_json
from sparsing_utils.shards import open_corpus

FORMAT = "sparsing-token-set/1"


def token_set(corpus: str, token_set: int, block_len: int) -> dict:
    corp = open_corpus(corpus)
    if token_set < block_len or token_set % block_len:
        raise SystemExit(f"--token-set {token_set} must be a positive multiple of --block-len {block_len}")
    ids = {}
    for d in sorted(corp.heldout):
        blocks = corp.heldout_blocks({d: token_set}, block_len)  # what track's pattern blocks start with
        ids[d] = blocks.input_ids.flatten()[:token_set].tolist()
    summary = corp.summary()
    return {"format": FORMAT, "block_len": block_len, "token_set_per_domain": token_set,
            "corpus": {k: summary[k] for k in ("vocab_size", "eos_id", "train_tokens", "heldout_tokens",
                                               "unique_tokens", "builder", "sources")},
            "sha256": {d: hashlib.sha256(str(v).encode()).hexdigest() for d, v in ids.items()},
            "token_ids": ids}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True, help="corpus folder (scripts/build_corpus.py shards)")
    ap.add_argument("--token-set", type=int, default=2048, help="tokens per domain (track's --token-set)")
    ap.add_argument("--block-len", type=int, default=512, help="track's block length")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    payload = token_set(args.corpus, args.token_set, args.block_len)
    atomic_write_json(args.out, payload)
    print(f"{args.out}: " + ", ".join(f"{d} {len(v)} ids" for d, v in payload["token_ids"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
