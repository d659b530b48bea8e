#!/usr/bin/env python
"""Training speed of the lab's trainer (issue 8, "Speed"): tokens/s and MFU, side by side in one run.

Three measurements, each in fresh processes (so a compiler failure or an out-of-memory error stays
inside one row):

1. **per config** on one device, ``torch.compile`` off and on: the issue's reference sizes
   (6M, 20M, 81M, 193M non-embedding parameters, with our 8,192-token vocabulary) and any sweep
   config (a path to ``configs/...json``);
2. **scaling** of one run over 1/2/4 GPUs through ``torchrun`` (DDP; the same global batch, so
   one GPU accumulates gradients where four do not), printed as a ratio to one GPU;
3. **sharing**: N independent runs on one GPU at once (what the sweep scheduler does), their summed
   tokens/s against one alone.

Tokens are random (a synthetic corpus written once to a temporary folder, or ``--corpus``): speed
does not depend on them. Timing: ``--warmup`` steps first (compilation happens there), then
``--steps`` steps between two device synchronisations. MFU = FLOPs per token (6 N_matmul + 12 L d T,
``sparsing_utils.training``) x tokens/s / (989.4e12 x GPUs): H200 bf16 dense, NVIDIA's datasheet.

Usage::

    python benchmarks/bench_training.py --out bench.json                       # GPU: all of it
    python benchmarks/bench_training.py --configs 2m,configs/activation/relu-4m.json --compile on
    python benchmarks/bench_training.py --device cpu --out cpu.json            # tiny configs, CPU
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# name -> (hidden, layers, heads, d_ff, global batch tokens, micro batch sequences, seq_len)
CONFIGS = {
    "6m": (256, 8, 4, 704, 131072, 256, 512),
    "20m": (384, 12, 6, 1024, 131072, 256, 512),
    "81m": (640, 16, 10, 1728, 262144, 256, 512),  # 256: 41.6% MFU on an H200, 128: 38.8%
    "193m": (896, 20, 14, 2432, 262144, 128, 512),
    "tiny-a": (64, 2, 2, 176, 4096, 32, 128),
    "tiny-b": (96, 3, 3, 256, 4096, 16, 128),
}
GPU_DEFAULT = "6m,20m,81m,193m,configs/activation/relu-2m.json"
CPU_DEFAULT = "tiny-a,tiny-b"


def make_config(name: str, *, corpus: str, compile: bool, world: int = 1, global_tokens: int | None = None,
                micro: int | None = None):
    from sparsing_utils.training import TrainConfig

    if name.endswith(".json"):
        cfg = TrainConfig.from_json(REPO / name if not Path(name).is_absolute() else name)
        changes = {}
    else:
        d, layers, heads, d_ff, batch, mb, seq = CONFIGS[name]
        cfg = TrainConfig(hidden_size=d, num_layers=layers, num_heads=heads, d_ff=d_ff, seq_len=seq,
                          global_batch_tokens=batch, micro_batch_size=mb, total_tokens=batch * 100, name=name)
        changes = {}
    import dataclasses

    if global_tokens:
        changes["global_batch_tokens"] = global_tokens
        changes["total_tokens"], changes["tokens_per_param"] = global_tokens * 100, None
    if micro:
        changes["micro_batch_size"] = micro
    if cfg.micro_batch_size is not None and cfg.micro_batch_size * world > cfg.global_batch_tokens // cfg.seq_len:
        changes["micro_batch_size"] = cfg.global_batch_tokens // cfg.seq_len // world
    return dataclasses.replace(cfg, corpus=corpus, compile=compile, heldout_tokens=0, **changes)


def synthetic_corpus(folder: Path, vocab: int = 8192, tokens: int = 8_000_000) -> Path:
    import numpy as np

    from sparsing_utils.shards import write_corpus

    if (folder / "meta.json").is_file():
        return folder
    rng = np.random.default_rng(0)
    return write_corpus(folder, train={"prose": rng.integers(1, vocab, tokens), "code": rng.integers(1, vocab, tokens)},
                        heldout={"prose": rng.integers(1, vocab, 65536), "code": rng.integers(1, vocab, 65536)},
                        vocab_size=vocab, eos_id=0)


# ---------------------------------------------------------------------------------------------
# one measurement (this process; under torchrun: every rank)
# ---------------------------------------------------------------------------------------------

def worker(args) -> None:
    import torch

    from sparsing_utils.shards import open_corpus
    from sparsing_utils.trainer import Trainer, init_distributed
    from sparsing_utils.training import make_plan

    env = init_distributed(args.device)
    cfg = make_config(args.config, corpus=args.corpus, compile=args.compile == "on", world=env.world,
                      global_tokens=args.global_tokens, micro=args.micro)
    corpus = open_corpus(cfg.corpus)
    plan = make_plan(cfg, corpus.vocab_size, env.world)
    trainer = Trainer(cfg, corpus, env, plan=plan)
    cuda = env.device.type == "cuda"

    def sync(x=None):
        if x is not None:
            float(x)
        if cuda:
            torch.cuda.synchronize()
        if env.world > 1:
            import torch.distributed as dist

            dist.barrier()

    t0 = time.perf_counter()
    loss = None
    for s in range(args.warmup):
        loss, _ = trainer.step(s)
    sync(loss)
    warm = time.perf_counter() - t0
    if args.ready_dir:  # sharing: start timing when every process has warmed up
        Path(args.ready_dir, f"{os.getpid()}").touch()
        limit = time.time() + 600
        while len(list(Path(args.ready_dir).iterdir())) < args.ready_count and time.time() < limit:
            time.sleep(0.2)
    t1 = time.perf_counter()
    steps = 0
    while True:
        loss, _ = trainer.step(args.warmup + steps)
        steps += 1
        if args.seconds:
            if steps % 5 == 0:
                sync(loss)
                if time.perf_counter() - t1 >= args.seconds:
                    break
        elif steps >= args.steps:
            break
    sync(loss)
    dt = time.perf_counter() - t1
    tok_s = steps * cfg.global_batch_tokens / dt
    out = {"config": args.config, "compile": args.compile == "on", "world_size": env.world,
           "device": torch.cuda.get_device_name(env.device) if cuda else "cpu",
           "non_embedding_params": plan.non_embedding_params, "flops_per_token": plan.flops_per_token,
           "global_batch_tokens": cfg.global_batch_tokens, "micro_batch_size": plan.micro_batch_size,
           "grad_accum": plan.grad_accum, "steps": steps, "seconds": dt, "warmup_seconds": warm,
           "tokens_per_s": tok_s, "step_ms": 1000 * dt / steps,
           "mfu": plan.flops_per_token * tok_s / (cfg.peak_flops * env.world), "loss": float(loss),
           "peak_memory_gib": torch.cuda.max_memory_allocated(env.device) / 2**30 if cuda else None}
    if env.rank == 0:
        Path(args.result).write_text(json.dumps(out))
    if env.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------

def _run(cmd: list[str], env: dict, result: Path, timeout: float) -> dict:
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if r.returncode != 0 or not result.is_file():
        tail = (r.stderr or r.stdout)[-1500:]
        return {"error": f"exit {r.returncode}: {tail.strip().splitlines()[-1] if tail.strip() else ''}",
                "log_tail": tail, "wall_seconds": time.perf_counter() - t}
    out = json.loads(result.read_text())
    out["wall_seconds"] = time.perf_counter() - t
    return out


def _worker_cmd(args, config: str, compile: str, result: Path, *, nproc: int = 1, extra=()) -> list[str]:
    base = [str(Path(__file__).resolve()), "--worker", "--config", config, "--compile", compile, "--corpus",
            str(args.corpus), "--device", args.device, "--warmup", str(args.warmup), "--steps", str(args.steps),
            "--result", str(result), *extra]
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *base]
    return [sys.executable, *base]


def driver(args) -> int:
    import torch

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.device = "cuda" if cuda else "cpu"
    n_gpu = torch.cuda.device_count() if cuda else 0
    tmp = Path(tempfile.mkdtemp(prefix="bench_training_"))
    args.corpus = (Path(args.corpus) if args.corpus else
                   synthetic_corpus(tmp / "corpus", args.vocab, tokens=8_000_000 if cuda else 200_000))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "NVSHMEM_DISABLE_NVLS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if not cuda:
        env.setdefault("OMP_NUM_THREADS", str(args.threads))
    configs = (args.configs or (GPU_DEFAULT if cuda else CPU_DEFAULT)).split(",")
    compiles = {"both": ["off", "on"], "on": ["on"], "off": ["off"]}[args.compile or ("both" if cuda else "off")]
    report = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "gpus": n_gpu, "torch": torch.__version__,
              "peak_flops_per_device": 989.4e12, "warmup": args.warmup, "steps": args.steps,
              "per_config": [], "scaling": [], "sharing": []}
    one_env = {**env, "CUDA_VISIBLE_DEVICES": env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]} if cuda else env
    micros = [int(m) for m in args.micro_batch.split(",")] if args.micro_batch else [None]
    for i, name in enumerate(configs):
        for comp in compiles:
            for mb in micros:
                out = tmp / f"c{i}-{comp}-{mb}.json"
                res = _run(_worker_cmd(args, name, comp, out, extra=["--micro", str(mb)] if mb else []), one_env, out,
                           args.timeout)
                report["per_config"].append({"config": name, "compile": comp == "on", **res})
                print(_row(report["per_config"][-1]), flush=True)
    if not args.no_scaling:
        ks = [k for k in (int(x) for x in args.scaling.split(",")) if not cuda or k <= n_gpu]
        top = max(ks)
        name = args.scaling_config or ("81m" if cuda else "tiny-a")
        micro = CONFIGS[name][5] if name in CONFIGS else None
        gtok = (micro or 1) * top * (CONFIGS[name][6] if name in CONFIGS else 512)
        comp = "on" if "on" in compiles else "off"
        for k in ks:
            res = _run(_worker_cmd(args, name, comp, tmp / f"s{k}.json", nproc=k,
                                   extra=["--global-tokens", str(gtok), "--micro", str(micro)] if micro else []),
                       env, tmp / f"s{k}.json", args.timeout)
            report["scaling"].append({"config": name, "compile": comp == "on", "processes": k, **res})
        base = next((r["tokens_per_s"] for r in report["scaling"] if r["processes"] == 1 and "error" not in r), None)
        for r in report["scaling"]:
            r["speedup"] = r["tokens_per_s"] / base if base and "error" not in r else None
    if not args.no_share:
        name = args.share_config or ("configs/activation/relu-2m.json" if cuda else "tiny-a")
        comp = "on" if "on" in compiles else "off"
        for n in (int(x) for x in args.share.split(",")):
            ready = tmp / f"ready{n}"
            ready.mkdir()
            procs = []
            for j in range(n):
                res_path = tmp / f"share{n}-{j}.json"
                cmd = _worker_cmd(args, name, comp, res_path, extra=["--ready-dir", str(ready), "--ready-count", str(n),
                                                                     "--seconds", str(args.share_seconds)])
                procs.append((subprocess.Popen(cmd, env=one_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                               text=True), res_path))
            each = []
            for p, res_path in procs:
                _, err = p.communicate(timeout=args.timeout)
                each.append(json.loads(res_path.read_text()) if p.returncode == 0 and res_path.is_file()
                            else {"error": (err or "")[-500:]})
            ok = [e for e in each if "error" not in e]
            report["sharing"].append({"config": name, "compile": comp == "on", "runs": n,
                                      "tokens_per_s_each": [e.get("tokens_per_s") for e in each],
                                      "tokens_per_s_total": sum(e["tokens_per_s"] for e in ok) if ok else None,
                                      "errors": [e["error"] for e in each if "error" in e]})
        base = next((r["tokens_per_s_total"] for r in report["sharing"] if r["runs"] == 1), None)
        for r in report["sharing"]:
            r["vs_one"] = r["tokens_per_s_total"] / base if base and r["tokens_per_s_total"] else None
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(_table(report))
    errors = [r for r in report["per_config"] + report["scaling"] if "error" in r]
    return 1 if errors and len(errors) == len(report["per_config"]) + len(report["scaling"]) else 0


def _row(r: dict) -> str:
    if "error" in r:
        return f"{r['config']:38} compile={'on ' if r['compile'] else 'off'}  ERROR {r['error'][:80]}"
    return (f"{r['config']:38} compile={'on ' if r['compile'] else 'off'} N={r['non_embedding_params'] / 1e6:7.2f}M "
            f"mb {r.get('micro_batch_size') or '-':>4} {r['tokens_per_s'] / 1e6:8.3f}M tok/s  MFU {r['mfu']:6.1%}  step {r['step_ms']:7.1f} ms  "
            f"warmup {r['warmup_seconds']:5.1f} s  mem {r['peak_memory_gib'] or 0:5.1f} GiB")


def _table(rep: dict) -> str:
    lines = [f"\n== training speed on {rep['device']} (torch {rep['torch']}), MFU vs 989.4 TFLOP/s per device =="]
    lines += [_row(r) for r in rep["per_config"]]
    if rep["scaling"]:
        lines.append("-- one run over several processes (torchrun, DDP, same global batch) --")
        for r in rep["scaling"]:
            lines.append(f"{r['config']} x{r['processes']}: " + (f"ERROR {r['error'][:80]}" if "error" in r else
                         f"{r['tokens_per_s'] / 1e6:.3f}M tok/s, MFU {r['mfu']:.1%}, speedup {r['speedup'] or 0:.2f}x"))
    if rep["sharing"]:
        lines.append("-- independent runs sharing one device --")
        for r in rep["sharing"]:
            tot = r["tokens_per_s_total"]
            lines.append(f"{r['config']} x{r['runs']}: total " + (f"{tot / 1e6:.3f}M tok/s ({r['vs_one'] or 0:.2f}x one run)"
                                                                   if tot else "ERROR") +
                         (f"; errors: {r['errors']}" if r["errors"] else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default=None, help=f"names ({', '.join(CONFIGS)}) or config JSON paths; "
                                                    f"default GPU: {GPU_DEFAULT}; CPU: {CPU_DEFAULT}")
    ap.add_argument("--compile", choices=["on", "off", "both"], default=None, help="default: both on GPU, off on CPU")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--micro-batch", default=None,
                    help="sequences per micro-batch for the per-config rows, comma-separated to compare several "
                         "(default: each config's own); the global batch stays, so fewer means more accumulation")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--corpus", default=None, help="a shard corpus (default: synthetic random tokens)")
    ap.add_argument("--scaling", default="1,2,4", help="processes for the scaling of one run")
    ap.add_argument("--scaling-config", default=None, help="default: 81m on GPU, tiny-a on CPU")
    ap.add_argument("--no-scaling", action="store_true")
    ap.add_argument("--share", default="1,2,4", help="runs sharing one device")
    ap.add_argument("--share-config", default=None, help="default: configs/activation/relu-2m.json on GPU")
    ap.add_argument("--share-seconds", type=float, default=20.0)
    ap.add_argument("--no-share", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per process on CPU")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", default=None, help="write the report JSON here")
    # worker mode (internal)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--global-tokens", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--micro", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ready-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ready-count", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    return driver(args)


if __name__ == "__main__":
    raise SystemExit(main())
