"""The MoE answers of one checkout, to compare two checkouts bit for bit (issue 10, MoE activations per expert).

For every layout of ``tests/test_moe.py`` (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3, the
module-list layout), memory and stream mode, blocks with and without padding: the PPL-1% search's c,
thresholds, both activation ratios, per-layer CETT and ratios, PPL ratio, the guide curve; in memory
mode also Top-k, FAT, routed-experts and CETT sparse passes (PPL, both ratios, per-token ratios) and
the FAT gate histogram. One thread. ``--compare`` prints every field that differs (none: bitwise equal).

Usage (``PYTHONPATH`` picks the checkout whose package runs)::

    PYTHONPATH=/path/to/base python benchmarks/moe_answers.py --out base.json
    PYTHONPATH=. python benchmarks/moe_answers.py --out new.json
    python benchmarks/moe_answers.py --compare base.json new.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def answers() -> dict:
    import torch

    sys.path.insert(0, os.path.join(_ROOT, "tests"))
    from test_moe import ALL_LAYOUTS, build, ids  # the tests' tiny models

    from sparsing_utils.probe import SparsityProbe
    from sparsing_utils.rules import CETTRule, FATRule, RoutedExpertsRule, TopKRule
    from sparsing_utils.search import search_ppl_p

    class Blocks:
        def __init__(self, input_ids, attention_mask):
            self.input_ids, self.attention_mask = input_ids, attention_mask

    torch.set_num_threads(1)
    out = {}
    for family in ALL_LAYOUTS:
        model = build(family)
        x = ids(batch=6, seq=33, seed=1)
        padded = torch.ones_like(x)
        padded[1, 20:] = 0
        padded[4, 7:] = 0
        for mode in ("memory", "stream"):
            for pad, mask in (("full", torch.ones_like(x)), ("pad", padded)):
                probe = SparsityProbe(model, Blocks(x, mask), mode=mode, batch_size=4)
                r = search_ppl_p(probe, 1.0)
                rec = {"cett": r.cett, "thresholds": [float(t) for t in r.thresholds], "act": r.activation_ratio,
                       "ran": r.activation_ratio_ran, "ppl_ratio": r.ppl_ratio, "layer_cett": list(map(float, r.layer_cett)),
                       "layer_act": list(map(float, r.layer_activation_ratio)), "curve": probe.curve.cett.tolist(),
                       "grid": probe.curve.eps.tolist(), "sparse": probe.sparse_passes, "dense": probe.dense_passes}
                if mode == "memory":
                    for name, rule in (("topk", TopKRule(0.2)), ("fat", FATRule(0.05)), ("experts", RoutedExpertsRule(1)),
                                       ("cett", CETTRule(r.thresholds))):
                        st = probe.sparse_pass(rule)
                        rec[name] = [st.ppl, st.activation_ratio, st.activation_ratio_ran, st.token_active.tolist()]
                    h = probe.gate_histogram(64)
                    rec["gate_hist"] = [h.counts.sum().item(), h.zeros.tolist(),
                                        h.quantiles(torch.tensor([0.3, 0.9])).tolist()]
                out[f"{family}/{mode}/{pad}"] = rec
                print(f"{family}/{mode}/{pad}: c {r.cett:.6f} ratio {r.activation_ratio:.5f} / "
                      f"{r.activation_ratio_ran:.5f}, PPL ratio {r.ppl_ratio:.6f}", file=sys.stderr)
    return out


def differences(a, b, path=""):
    """``[(path, a, b)]`` for every leaf that differs."""
    if isinstance(a, dict):
        return [d for k in sorted(set(a) | set(b)) for d in differences(a.get(k), b.get(k), f"{path}/{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [(path, a, b)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"))
    args = ap.parse_args(argv)
    if args.compare:
        loaded = []
        for path in args.compare:
            with open(path) as f:
                loaded.append(json.load(f))
        a, b = loaded
        diff = differences(a, b)
        for path, x, y in diff[:50]:
            print(f"{path}: {x} != {y}")
        print(f"{len(a)} configurations, {len(diff)} differing values" + (" (bitwise equal)" if not diff else ""))
        return 1 if diff else 0
    if not args.out:
        ap.error("--out or --compare")
    from sparsing_utils.jsonio import atomic_write_json

    atomic_write_json(args.out, answers())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
