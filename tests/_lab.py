"""Helpers of the training-lab tests: a tiny learnable corpus and a tiny run config (odd sizes).

The corpus: two domains of a noisy affine recurrence over an odd vocabulary (97 ids),
``x_{t+1} = (5 x_t + 7) mod 97`` with a different offset per domain and 10% random restarts,
so a two-layer model learns it within a few dozen steps.
"""
from __future__ import annotations

import numpy as np

VOCAB = 97
EOS = 0


def recurrence(n: int, seed: int, offset: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    restart = rng.random(n) < 0.1
    fresh = rng.integers(1, VOCAB, n)
    out = np.empty(n, dtype=np.int64)
    x = 3
    for i in range(n):
        x = int(fresh[i]) if restart[i] else (5 * x + offset) % VOCAB
        out[i] = x
    return out


def write_tiny_corpus(path, *, prose: int = 20000, code: int = 9000, heldout: int = 3000):
    from sparsing_utils.shards import write_corpus

    return write_corpus(path, train={"prose": recurrence(prose, 1, 7), "code": recurrence(code, 2, 11)},
                        heldout={"prose": recurrence(heldout, 3, 7), "code": recurrence(heldout, 4, 11)},
                        vocab_size=VOCAB, eos_id=EOS)


def tiny_config(corpus, **kw):
    """hidden 24 (3 heads of 8, 1 kv head), 2 layers, d_ff 37, sequences of 16, 8 per batch in
    micro-batches of 4 (2 accumulation steps), 40 steps, 20 log-spaced checkpoints + 2."""
    from sparsing_utils.training import TrainConfig

    base = {"hidden_size": 24, "num_layers": 2, "num_heads": 3, "num_kv_heads": 1, "d_ff": 37, "vocab_multiple": 1,
                "seq_len": 16, "global_batch_tokens": 16 * 8, "micro_batch_size": 4, "total_tokens": 16 * 8 * 40,
                "corpus": str(corpus), "heldout_tokens": 17 * 16, "log_every": 1, "n_checkpoints": 20, "lr": 1e-2,
                "warmup_fraction": 0.05, "decay_fraction": 0.1, "seed": 3, "name": "tiny"}
    base.update(kw)
    return TrainConfig(**base)
