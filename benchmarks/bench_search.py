"""Side-by-side benchmark: the official PPL-p% search (``official_reference.py``) against the
project's :func:`sparsing_utils.search.search_ppl_p` (modes ``memory`` and ``stream``), on the
same model and the same tokens, in one run (issue 4).

For each method: wall time, forward-pass equivalents (wall time / one plain forward of the same
blocks, measured in this run: warm-up, then the median of a few, CUDA-synchronised), peak memory
(CUDA: ``torch.cuda.max_memory_allocated`` reset before each method, reported above the
baseline of weights and inputs; CPU: peak RSS above the baseline, through Linux's resettable
``VmHWM``), the CETT found, the activation ratio, the achieved PPL ratio and the speed-up of the
project over the reference. Then the *equal accuracy* check at the reference's CETT: the
project's exact thresholds (``probe.thresholds_for(c)``) against the reference's, each measured
with one sparse pass and with one independent fp32 CETT evaluator.

Models (``--model``):

``smollm2``    the embedded SmolLM2-135M (``sparsing_utils.models.load_model``) on ``--text``
               (default ``pydoc``), float32 on CPU.
``llama836m``  a random-initialised ``LlamaForCausalLM`` (hidden 2048, 16 layers, d_ff 5632,
               32/4 heads, vocabulary 32000; 836M parameters), bf16 on CUDA, 8 x 2048 tokens.
``llama-tiny`` a tiny random Llama (hidden 64, 2 layers, d_ff 172, vocabulary 512) for a quick
               CPU smoke test.

Tokens for the random models (``--data``): the PPL of a random model on *random* ids hardly
reacts to sparsification (the targets are unpredictable, so truncating FFN neurons mostly adds
noise), so the PPL-1% target may be unreachable and the search meaningless. The default is therefore ``--data self``: the token blocks are sampled from
the random model itself (temperature 1, no top-k/top-p, from one random token per block, fixed
seed). The dense model is then the true distribution of its data, and the PPL ratio of a
sparsified model is ``exp(KL)`` >= 1 in expectation, growing with the CETT. With the
LlamaConfig default ``initializer_range`` 0.02 and hidden 2048 the logits have a standard
deviation of ~0.9, which makes PPL-1% reachable (checked on CPU with the 836M width cut to
4 layers: PPL ratio 1.010 at c = 0.1, 1.049 at 0.2; ``--init-std`` changes the scale).
``--data random`` uses uniform random ids (seeded);
``--gen-len L`` samples segments of ``L`` tokens and concatenates them into blocks (cheaper
generation on long blocks, slightly less self-consistent). ``--fixed-cett C`` additionally
times, for every method, the thresholds at one given CETT plus one sparse pass, which is
meaningful whatever the data.

Usage::

    python benchmarks/bench_search.py --model smollm2 --tokens 1024 --block-len 256 --out r.json
    python benchmarks/bench_search.py --model llama836m --device cuda --fixed-cett 0.2
    python benchmarks/bench_search.py --model llama-tiny --outer-tol 1e-3   # smoke test
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from types import SimpleNamespace

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import official_reference as ref

from sparsing_utils.jsonio import atomic_write_json
from sparsing_utils.probe import SparsityProbe
from sparsing_utils.rules import CETTRule
from sparsing_utils.search import search_ppl_p

MODELS = {
    # name: (hidden, layers, d_ff, heads, kv heads, vocab)
    "llama836m": (2048, 16, 5632, 32, 4, 32000),
    "llama-tiny": (64, 2, 172, 4, 2, 512),
    "smollm2-shape": (576, 30, 1536, 9, 3, 49152),  # SmolLM2-135M's shape, random weights (no GGUF needed)
}
INIT_STD = {"llama836m": 0.02, "llama-tiny": 0.1, "smollm2-shape": 0.04}  # logits std ~0.9 (see the module doc)
DEFAULTS = {  # tokens, block_len
    "smollm2": (1024, 256),
    "llama836m": (16384, 2048),
    "llama-tiny": (512, 128),
    "smollm2-shape": (16384, 2048),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# Models and tokens
# ---------------------------------------------------------------------------------------


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _dtype(name: str, device: torch.device, model: str) -> torch.dtype:
    if name == "auto":
        if model != "smollm2" and device.type == "cuda":
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[name]


def random_llama(name: str, *, init_std: float, seed: int, dtype: torch.dtype, device: torch.device,
                 max_len: int):
    """A random-initialised LlamaForCausalLM of a named shape (initialised in float32 on the CPU
    with a fixed seed, so the weights do not depend on the device, then cast and moved)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, d_ff, heads, kv, vocab = MODELS[name]
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=d_ff,
                      num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                      max_position_embeddings=max(2048, max_len), initializer_range=init_std,
                      hidden_act="silu", tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model = model.to(dtype=dtype).to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    return model, {"name": name, "hidden": hidden, "layers": layers, "d_ff": d_ff, "heads": heads,
                   "kv_heads": kv, "vocab": vocab, "init_std": init_std, "seed": seed, "parameters": n_params}


@torch.no_grad()
def self_generated_ids(model, n_blocks: int, block_len: int, *, seed: int, gen_len: int | None,
                       batch_size: int) -> torch.Tensor:
    """``[n_blocks, block_len]`` token ids sampled from ``model`` itself (temperature 1, no
    top-k/top-p), each segment of ``gen_len`` tokens started from one random token."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    seg = block_len if not gen_len else min(gen_len, block_len)
    per_block = math.ceil(block_len / seg)
    n_seg = n_blocks * per_block
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, vocab, (n_seg, 1), generator=g)
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    out = []
    for i in range(0, n_seg, batch_size):
        s = starts[i:i + batch_size].to(device)
        ids = model.generate(s, attention_mask=torch.ones_like(s), max_new_tokens=seg - 1, min_new_tokens=seg - 1,
                             do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0,
                             use_cache=True)
        out.append(ids[:, :seg].cpu())
    segs = torch.cat(out)  # [n_seg, seg]
    return segs.reshape(n_blocks, per_block * seg)[:, :block_len].contiguous()


def make_ids(model, args, n_blocks: int, block_len: int, vocab: int) -> torch.Tensor:
    """Token ids of a random model: loaded (``--load-ids``), uniform random or self-sampled;
    saved with ``--save-ids`` (so another script or run can reuse the same blocks)."""
    if getattr(args, "load_ids", None):
        ids = torch.load(args.load_ids)
        if tuple(ids.shape) != (n_blocks, block_len) or int(ids.max()) >= vocab:
            raise SystemExit(f"{args.load_ids}: ids of shape {tuple(ids.shape)}, want ({n_blocks}, {block_len}) "
                             f"below {vocab}")
        log(f"token ids loaded from {args.load_ids}")
        return ids.long()
    if args.data == "random":
        g = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, vocab, (n_blocks, block_len), generator=g)
    else:
        log(f"sampling {n_blocks} x {block_len} tokens from the random model (--data self)")
        ids = self_generated_ids(model, n_blocks, block_len, seed=args.seed, gen_len=args.gen_len,
                                 batch_size=args.gen_batch or n_blocks)
    if getattr(args, "save_ids", None):
        torch.save(ids.cpu(), args.save_ids)
        log(f"token ids saved to {args.save_ids}")
    return ids


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """Options that choose the model and its tokens (shared with bench_distributed.py)."""
    ap.add_argument("--model", choices=["smollm2", "llama836m", "llama-tiny", "smollm2-shape"], default="smollm2")
    ap.add_argument("--text", default="pydoc", help="text source for smollm2 (default pydoc)")
    ap.add_argument("--tokens", type=int, default=None,
                    help="token budget (default: 1024 smollm2, 16384 llama836m and smollm2-shape, 512 llama-tiny)")
    ap.add_argument("--block-len", type=int, default=None,
                    help="tokens per block (default: 256 smollm2, 2048 llama836m and smollm2-shape, 128 llama-tiny)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="blocks per forward, for every method (default: the project's: 32768 tokens on CUDA, "
                         "4096 on CPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto: bf16 for the random models on CUDA, else float32")
    ap.add_argument("--data", choices=["self", "random"], default="self",
                    help="tokens of the random models: sampled from the model itself (default) or uniform random")
    ap.add_argument("--gen-len", type=int, default=None, help="--data self: length of each sampled segment")
    ap.add_argument("--gen-batch", type=int, default=None, help="--data self: segments sampled at once")
    ap.add_argument("--save-ids", default=None, help="save the random model's token ids (torch.save)")
    ap.add_argument("--load-ids", default=None, help="load the random model's token ids instead of making them")
    ap.add_argument("--init-std", type=float, default=None,
                    help="initializer_range of the random models (default 0.02 llama836m, 0.04 smollm2-shape, "
                         "0.1 llama-tiny)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def build(args):
    """``(model, blocks, info)`` for the requested configuration."""
    device = _device(args.device)
    dtype = _dtype(args.dtype, device, args.model)
    tokens, block_len = DEFAULTS[args.model]
    tokens = args.tokens or tokens
    block_len = args.block_len or block_len
    n_blocks = max(1, tokens // block_len)
    info = {"model": args.model, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "tokens": n_blocks * block_len, "block_len": block_len, "n_blocks": n_blocks}
    if args.model == "smollm2":
        from sparsing_utils.blocks import make_blocks
        from sparsing_utils.models import load_model

        loaded = load_model("smollm2", dtype=info["dtype"], device=str(device))
        blocks = make_blocks(loaded.tokenizer, args.text, tokens=n_blocks * block_len, block_len=block_len)
        info.update({"text": args.text, "model_info": loaded.describe()})
        return loaded.model, blocks, info
    init_std = args.init_std if args.init_std is not None else INIT_STD[args.model]
    model, minfo = random_llama(args.model, init_std=init_std, seed=args.seed, dtype=dtype, device=device,
                                max_len=block_len)
    info["model_info"] = minfo
    t0 = time.perf_counter()
    ids = make_ids(model, args, n_blocks, block_len, minfo["vocab"])
    info.update({"data": args.data, "gen_len": args.gen_len, "data_seconds": time.perf_counter() - t0,
                 "ids_file": args.load_ids})
    blocks = SimpleNamespace(input_ids=ids, attention_mask=torch.ones_like(ids))
    return model, blocks, info


# ---------------------------------------------------------------------------------------
# Measurement helpers
# ---------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_bytes(key: str) -> int | None:
    """A memory line of Linux ``/proc/self/status`` in bytes (``VmRSS``: resident now, ``VmHWM``:
    its high-water mark); ``None`` where there is no such file or line."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) * 1024  # the file says kB
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of a code section above the memory in use when it starts.

    CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: Linux ``VmHWM`` after
    writing 5 to ``/proc/self/clear_refs`` (resets the RSS high-water mark); ``None`` elsewhere.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda allocated" if device.type == "cuda" else "cpu rss"
        self.peak = self.baseline = None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.baseline = _proc_status_bytes("VmRSS")
            except OSError:
                self.baseline = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self.baseline is not None:
            self.peak = _proc_status_bytes("VmHWM")
        return False

    def report(self) -> dict:
        if self.peak is None or self.baseline is None:
            return {"kind": self.kind, "peak_bytes": None, "above_baseline_bytes": None}
        return {"kind": self.kind, "peak_bytes": int(self.peak), "baseline_bytes": int(self.baseline),
                "above_baseline_bytes": int(max(0, self.peak - self.baseline))}


@torch.no_grad()
def plain_forward(model, blocks, batch_size: int) -> None:
    device = next(model.parameters()).device
    ids, mask = blocks.input_ids, blocks.attention_mask
    for i in range(0, ids.shape[0], batch_size):
        out = model(input_ids=ids[i:i + batch_size].to(device), attention_mask=mask[i:i + batch_size].to(device),
                    use_cache=False)
        del out


def time_forward(model, blocks, batch_size: int, *, warmup: int = 2, repeats: int = 5) -> dict:
    """One plain forward over all blocks (same batching as the searches): warm-up, then the
    median of ``repeats`` synchronised timings."""
    device = next(model.parameters()).device
    for _ in range(warmup):
        plain_forward(model, blocks, batch_size)
    times = []
    with PeakMemory(device) as mem:
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            plain_forward(model, blocks, batch_size)
            sync(device)
            times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "all_s": times, "memory": mem.report()}


def code_version() -> dict:
    """Which code ran: the git commit and the hashes of the files that define the two searches
    (the working tree may hold uncommitted edits of ``sparsing_utils``)."""
    import hashlib
    import subprocess

    import sparsing_utils.cett
    import sparsing_utils.probe
    import sparsing_utils.search

    out = {}
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_HERE, capture_output=True, text=True,
                                           timeout=10, check=False).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    for mod in (sparsing_utils.probe, sparsing_utils.search, sparsing_utils.cett, ref):
        with open(mod.__file__, "rb") as f:
            out[os.path.basename(mod.__file__) + "_sha256"] = hashlib.sha256(f.read()).hexdigest()[:16]
    return out


def one_forward(model, blocks, batch_size: int) -> float:
    """One synchronised plain forward (seconds): run before and after every method, so that the
    forward-pass equivalents follow the load of a shared CPU through the run."""
    device = next(model.parameters()).device
    sync(device)
    t0 = time.perf_counter()
    plain_forward(model, blocks, batch_size)
    sync(device)
    return time.perf_counter() - t0


def _fmt_bytes(b) -> str:
    if b is None:
        return "n/a"
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


# ---------------------------------------------------------------------------------------
# The methods
# ---------------------------------------------------------------------------------------


def run_reference(model, blocks, args, batch_size: int, fwd_s: float) -> dict:
    device = next(model.parameters()).device
    log(f"reference: official search, p={args.p}, outer tolerance {args.outer_tol:g}, "
        f"{args.candidates} candidates")
    before = one_forward(model, blocks, batch_size)
    with PeakMemory(device) as mem:
        sync(device)
        t0 = time.perf_counter()
        res = ref.reference_ppl_p(model, blocks, args.p, outer_tol=args.outer_tol, batch_size=batch_size,
                                  num_candidates=args.candidates, quantile=args.quantile,
                                  faithful_defects=not args.fix_defects, log=log)
        sync(device)
        wall = time.perf_counter() - t0
    out = {"method": "reference", "wall_s": wall, "forward_equivalents": wall / fwd_s, "memory": mem.report(),
           "cett": res.cett, "activation_ratio": res.activation_ratio, "ppl_ratio": res.ppl_ratio,
           "ppl_dense": res.ppl_dense, "ppl_sparse": res.ppl_sparse, "converged": True,
           "forward_passes": res.forward_passes, "message": f"{res.outer_steps} outer steps",
           "forward_bracket_s": [before, one_forward(model, blocks, batch_size)], "result": res.to_dict()}
    log(f"reference: c={res.cett:.6f} activation {res.activation_ratio:.4f} PPL ratio {res.ppl_ratio:.5f} "
        f"in {wall:.1f} s ({out['forward_equivalents']:.0f} forward passes)")
    return out


def run_project(model, blocks, args, mode: str, batch_size: int, fwd_s: float, keep: bool = False):
    device = next(model.parameters()).device
    log(f"project: search_ppl_p, mode {mode}, p={args.p}")
    before = one_forward(model, blocks, batch_size)
    with PeakMemory(device) as mem:
        sync(device)
        t0 = time.perf_counter()
        probe = SparsityProbe(model, blocks, mode=mode, batch_size=batch_size, name=args.model)
        res = search_ppl_p(probe, args.p, tol=args.tol)
        sync(device)
        wall = time.perf_counter() - t0
    passes = probe.dense_passes + probe.sparse_passes
    out = {"method": f"project ({mode})", "wall_s": wall, "forward_equivalents": wall / fwd_s,
           "memory": mem.report(), "cett": res.cett, "activation_ratio": res.activation_ratio,
           "ppl_ratio": res.ppl_ratio, "ppl_dense": res.ppl_dense, "ppl_sparse": res.ppl_sparse,
           "converged": res.converged, "message": res.message, "forward_passes": passes,
           "dense_passes": probe.dense_passes, "sparse_passes": probe.sparse_passes,
           "cett_evaluations": getattr(probe, "cett_evaluations", None),
           "forward_bracket_s": [before, one_forward(model, blocks, batch_size)], "result": res.to_dict()}
    log(f"project ({mode}): c={res.cett:.6f} activation {res.activation_ratio:.4f} PPL ratio {res.ppl_ratio:.5f} "
        f"in {wall:.1f} s ({out['forward_equivalents']:.1f} forward passes; {probe.dense_passes} dense + "
        f"{probe.sparse_passes} sparse){'' if res.converged else ' NOT CONVERGED: ' + res.message}")
    if not keep:
        probe.release()
        del probe
        return out, None
    return out, probe


def equal_accuracy(model, blocks, args, c: float, ref_thresholds, ref_act, ref_ppl_ratio,
                   probe: SparsityProbe, batch_size: int) -> dict:
    """At one CETT ``c``: project's exact thresholds vs the reference's, measured alike."""
    log(f"equal accuracy at c={c:.6f}")
    faithful = not args.fix_defects
    c_from = "reference" if ref_thresholds is not None else "project"
    if ref_thresholds is None:  # --skip-reference: the reference's thresholds for this c
        t, _, cap = ref.reference_thresholds(model, blocks, c, batch_size=batch_size, num_candidates=args.candidates,
                                             quantile=args.quantile, faithful_defects=faithful)
        del cap
        st = ref.sparse_pass(model, blocks, t, batch_size=batch_size, faithful_defects=faithful)
        dense = ref.dense_capture(model, blocks, batch_size=batch_size)
        ref_thresholds, ref_act = t, st.activation_ratio
        ref_ppl_ratio = math.exp(st.nll_sum / st.n_predicted - dense.mean_nll)
        del dense
    eps, own_cett = probe.thresholds_for(c)
    eps = [float(x) for x in eps]
    s_proj = probe.sparse_pass(CETTRule(eps), per_token=False)
    s_ref_prule = probe.sparse_pass(CETTRule(ref_thresholds), per_token=False)
    cap = ref.dense_capture(model, blocks, batch_size=batch_size)
    cett_proj = ref.capture_cett(model, cap, eps)
    cett_ref = ref.capture_cett(model, cap, ref_thresholds)
    del cap
    gc.collect()
    out = {
        "c": c,
        "c_from": c_from,
        "project": {"activation_ratio": s_proj.activation_ratio, "ppl_ratio": s_proj.ppl / probe.dense.ppl,
                    "max_abs_cett_error": max(abs(x - c) for x in cett_proj),
                    "max_abs_cett_error_own": max(abs(float(x) - c) for x in own_cett),
                    "layer_cett": cett_proj, "thresholds": eps},
        "reference": {"activation_ratio": ref_act, "ppl_ratio": ref_ppl_ratio,
                      "max_abs_cett_error": max(abs(x - c) for x in cett_ref), "layer_cett": cett_ref,
                      "thresholds": list(ref_thresholds),
                      "activation_ratio_project_rule": s_ref_prule.activation_ratio},
        "layer_threshold_rel_diff_max": max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(eps, ref_thresholds)),
    }
    out["activation_ratio_diff"] = out["project"]["activation_ratio"] - ref_act
    log(f"equal accuracy: activation project {s_proj.activation_ratio:.5f} vs reference {ref_act:.5f} "
        f"(diff {out['activation_ratio_diff']:+.5f}); max |CETT-c| project {out['project']['max_abs_cett_error']:.2e}"
        f", reference {out['reference']['max_abs_cett_error']:.2e}")
    return out


def fixed_cett(model, blocks, args, modes, batch_size: int, fwd_s: float) -> list[dict]:
    """Thresholds at one given CETT plus one sparse pass, for every method."""
    c = args.fixed_cett
    device = next(model.parameters()).device
    faithful = not args.fix_defects
    rows = []
    if not args.skip_reference:
        log(f"fixed CETT {c}: reference")
        with PeakMemory(device) as mem:
            sync(device)
            t0 = time.perf_counter()
            ev = ref.evaluate_cett(model, blocks, c, batch_size=batch_size, num_candidates=args.candidates,
                                   quantile=args.quantile, faithful_defects=faithful)
            sync(device)
            wall = time.perf_counter() - t0
        rows.append({"method": "reference", "c": c, "wall_s": wall, "forward_equivalents": wall / fwd_s,
                     "memory": mem.report(), "activation_ratio": ev.activation_ratio, "ppl_ratio": ev.ppl_ratio,
                     "max_abs_cett_error": max(abs(x - c) for x in ev.layer_cett), "forward_passes": 2,
                     "seconds_breakdown": ev.seconds, "thresholds": ev.thresholds})
    for mode in modes:
        log(f"fixed CETT {c}: project ({mode})")
        with PeakMemory(device) as mem:
            sync(device)
            t0 = time.perf_counter()
            probe = SparsityProbe(model, blocks, mode=mode, batch_size=batch_size, name=args.model)
            probe.prepare()
            eps, cett = probe.thresholds_for(c)
            st = probe.sparse_pass(CETTRule(eps), per_token=False)
            sync(device)
            wall = time.perf_counter() - t0
        rows.append({"method": f"project ({mode})", "c": c, "wall_s": wall, "forward_equivalents": wall / fwd_s,
                     "memory": mem.report(), "activation_ratio": st.activation_ratio,
                     "ppl_ratio": st.ppl / probe.dense.ppl,
                     "max_abs_cett_error": float((cett.double() - c).abs().max()),
                     "forward_passes": probe.dense_passes + probe.sparse_passes,
                     "thresholds": [float(x) for x in eps]})
        probe.release()
        del probe
        gc.collect()
    ref_row = rows[0] if rows and rows[0]["method"] == "reference" else None
    for r in rows:
        r["speedup_vs_reference"] = (ref_row["wall_s"] / r["wall_s"]) if ref_row else None
        log(f"fixed CETT {c}: {r['method']}: {r['wall_s']:.2f} s ({r['forward_equivalents']:.1f} fwd), activation "
            f"{r['activation_ratio']:.4f}, PPL ratio {r['ppl_ratio']:.5f}, max |CETT-c| {r['max_abs_cett_error']:.1e}")
    return rows


# ---------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------


def search_table(rows: list[dict], target: float) -> str:
    head = ("| method | wall s | fwd-eq | passes | peak mem | CETT | act. ratio | PPL ratio | |PPL err| pp "
            "| speed-up |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    ref_row = next((r for r in rows if r["method"] == "reference"), None)
    for r in rows:
        sp = f"{ref_row['wall_s'] / r['wall_s']:.1f}x" if ref_row else "n/a"
        note = "" if r.get("converged", True) else " (not converged)"
        lines.append(
            f"| {r['method']}{note} | {r['wall_s']:.2f} | {r['forward_equivalents']:.1f} | {r['forward_passes']} "
            f"| {_fmt_bytes(r['memory'].get('above_baseline_bytes'))} | {r['cett']:.5f} | {r['activation_ratio']:.4f} "
            f"| {r['ppl_ratio']:.5f} | {100 * abs(r['ppl_ratio'] - target):.3f} | {sp} |")
    return "\n".join(lines)


def accuracy_table(eq: dict) -> str:
    p, r = eq["project"], eq["reference"]
    return "\n".join([
        f"Equal accuracy at the {eq.get('c_from', 'reference')}'s CETT c = {eq['c']:.6f}:",
        "",
        "| thresholds | act. ratio | PPL ratio | max per-layer abs(CETT - c) |",
        "|---|---:|---:|---:|",
        (f"| project `thresholds_for(c)` | {p['activation_ratio']:.5f} | {p['ppl_ratio']:.5f} | "
         f"{p['max_abs_cett_error']:.2e} |"),
        (f"| reference (65,536-candidate bisection) | {r['activation_ratio']:.5f} | {r['ppl_ratio']:.5f} | "
         f"{r['max_abs_cett_error']:.2e} |"),
        (f"| difference (project - reference) | {eq['activation_ratio_diff']:+.5f} | "
         f"{p['ppl_ratio'] - r['ppl_ratio']:+.5f} | |"),
    ])


def fixed_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    lines = [f"Fixed CETT c = {rows[0]['c']} (thresholds + one sparse pass):", "",
             "| method | wall s | fwd-eq | passes | peak mem | act. ratio | PPL ratio | max abs(CETT - c) | speed-up |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        sp = f"{r['speedup_vs_reference']:.1f}x" if r.get("speedup_vs_reference") else "n/a"
        lines.append(f"| {r['method']} | {r['wall_s']:.2f} | {r['forward_equivalents']:.1f} | {r['forward_passes']} | "
                     f"{_fmt_bytes(r['memory'].get('above_baseline_bytes'))} | {r['activation_ratio']:.4f} | "
                     f"{r['ppl_ratio']:.5f} | {r['max_abs_cett_error']:.1e} | {sp} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--p", type=float, default=1.0, help="PPL-p%% target (default 1)")
    ap.add_argument("--tol", type=float, default=1e-3, help="project's tolerance on the PPL ratio (default 1e-3)")
    ap.add_argument("--outer-tol", type=float, default=1e-6, help="reference's outer bisection width (default 1e-6)")
    ap.add_argument("--candidates", type=int, default=ref.NUM_CANDIDATES)
    ap.add_argument("--quantile", choices=["exact", "strided"], default="exact",
                    help="reference's 0.99 quantile: exact, or the official strided subsample")
    ap.add_argument("--fix-defects", action="store_true",
                    help="reference without the official defects (rule mismatch, wrap-around)")
    ap.add_argument("--modes", default="memory,stream", help="project modes to run (comma-separated)")
    ap.add_argument("--skip-reference", action="store_true", help="do not run the reference search")
    ap.add_argument("--skip-search", action="store_true", help="only the --fixed-cett comparison")
    ap.add_argument("--fixed-cett", type=float, default=None,
                    help="also time, for every method, the thresholds at this CETT plus one sparse pass")
    ap.add_argument("--repeats", type=int, default=5, help="timed plain forwards (median)")
    ap.add_argument("--out", default=None, help="write all results as JSON (atomically)")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in ("memory", "stream"):
            raise SystemExit(f"unknown mode {m!r}: use memory and/or stream")
    started = time.perf_counter()
    model, blocks, info = build(args)
    device = next(model.parameters()).device
    block_len = blocks.input_ids.shape[1]
    batch_size = args.batch_size or max(1, (32768 if device.type == "cuda" else 4096) // block_len)
    info.update({"batch_size": batch_size, "p": args.p, "tol": args.tol, "outer_tol": args.outer_tol,
                 "candidates": args.candidates, "quantile": args.quantile, "faithful_defects": not args.fix_defects,
                 "torch": torch.__version__, "threads": torch.get_num_threads(), "host": platform.node(),
                 "cpu_count": os.cpu_count(), "argv": sys.argv[1:], "code": code_version()})
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
    log(f"{args.model}: {info['n_blocks']} x {block_len} tokens on {device} ({info['dtype']}), batch {batch_size}")
    fwd = time_forward(model, blocks, batch_size, repeats=args.repeats)
    fwd_s = fwd["median_s"]
    log(f"one plain forward: {fwd_s * 1000:.1f} ms (median of {args.repeats})")
    target = 1 + args.p / 100
    results = {"config": info, "forward": fwd, "search": [], "equal_accuracy": None, "fixed_cett": []}

    def save():
        if args.out:
            results["seconds_total"] = time.perf_counter() - started
            atomic_write_json(args.out, json.loads(json.dumps(results, default=float)))

    probe_mem = None
    ref_out = None
    if not args.skip_search:
        if not args.skip_reference:
            ref_out = run_reference(model, blocks, args, batch_size, fwd_s)
            results["search"].append(ref_out)
            save()
        # stream first, so that the memory probe kept for the accuracy check is not in its peak
        for mode in sorted(modes, key=lambda m: m != "stream"):
            out, probe = run_project(model, blocks, args, mode, batch_size, fwd_s, keep=(mode == "memory"))
            results["search"].append(out)
            if probe is not None:
                probe_mem = probe
            save()
        results["search"].sort(key=lambda r: ["reference", "project (memory)", "project (stream)"].index(r["method"]))
        for r in results["search"]:
            r["speedup_vs_reference"] = ref_out["wall_s"] / r["wall_s"] if ref_out else None
        if probe_mem is None and modes:
            probe_mem = SparsityProbe(model, blocks, mode=modes[0], batch_size=batch_size, name=args.model)
        if probe_mem is not None:
            if ref_out is not None:
                c_eq = ref_out["cett"]
                rr = ref_out["result"]
                eq = equal_accuracy(model, blocks, args, c_eq, rr["thresholds"], rr["activation_ratio"],
                                    rr["ppl_ratio"], probe_mem, batch_size)
            else:
                c_eq = next(r["cett"] for r in results["search"] if r["method"].startswith("project"))
                eq = equal_accuracy(model, blocks, args, c_eq, None, None, None, probe_mem, batch_size)
            results["equal_accuracy"] = eq
            probe_mem.release()
            probe_mem = None
            save()
    if args.fixed_cett is not None:
        results["fixed_cett"] = fixed_cett(model, blocks, args, modes, batch_size, fwd_s)
        save()
    # forward-pass equivalents against the median of every plain forward timed in the run
    all_fwd = list(fwd["all_s"]) + [t for r in results["search"] for t in r.get("forward_bracket_s", [])]
    fwd_s = statistics.median(all_fwd)
    results["forward"]["run_median_s"] = fwd_s
    results["forward"]["run_all_s"] = all_fwd
    for r in results["search"] + results["fixed_cett"]:
        r["forward_equivalents"] = r["wall_s"] / fwd_s
    # ---- the tables, last -------------------------------------------------------------
    mem_kind = "CUDA max_memory_allocated" if device.type == "cuda" else "peak RSS (VmHWM)"
    print()
    print(f"## {args.model}: {info['n_blocks']} x {block_len} tokens, {device} {info['dtype']}, batch {batch_size}, "
          f"PPL-{args.p:g}%")
    print()
    print(f"One plain forward: {fwd_s * 1000:.1f} ms (median of the {len(all_fwd)} timed in this run: {args.repeats} "
          f"after warm-up, one before and after each search); peak memory = {mem_kind} above the weights and inputs; "
          "fwd-eq = wall time / one plain forward; speed-up = reference time / method time.")
    if device.type == "cpu":
        print(f"CPU timings ({torch.get_num_threads()} threads, {os.cpu_count()} cores, other jobs may share them) "
              "are noisy.")
    if results["search"]:
        print()
        print(search_table(results["search"], target))
    if results["equal_accuracy"]:
        print()
        print(accuracy_table(results["equal_accuracy"]))
    if results["fixed_cett"]:
        print()
        print(fixed_table(results["fixed_cett"]))
    save()
    return results


if __name__ == "__main__":
    main()
