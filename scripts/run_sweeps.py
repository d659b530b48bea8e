#!/usr/bin/env python
"""Run the training-lab sweeps on the GPUs of one machine, unattended.

Independent sweep members run side by side: ``--slots-per-gpu`` processes per GPU, each pinned
with ``CUDA_VISIBLE_DEVICES`` (one run on several GPUs is torchrun's job, not this script's).
Runs start in the priority order of ``configs/plan.json``; a run whose estimated wall time (the
plan's estimate x the median actual/estimated ratio of the runs finished so far) would end after
``--deadline-minutes`` is skipped rather than started. Every run is, in turn:

1. trained: ``python -m sparsing_utils.cli train --config ... --out WORK/runs/NAME --corpus ...``
   (retried once on failure: with ``--resume`` if the run folder exists, and without
   ``torch.compile`` if the log shows a compiler error);
2. tracked at once: ``sparsing track`` (Algorithm 1 and patterns) -> ``WORK/tracked/NAME.json``;
3. published: the full result to ``RESULTS/<first sweep>/<name there>.json`` and an alias file
   (``{"format": "sparsing-run-alias/1", ..., "same_as": "<first sweep>/<name>.json"}``) to every
   other sweep it belongs to, the layout of ``data/runs/``; ``RESULTS/../results.tar.gz`` is repacked
   (results + each run's config.json and log.jsonl), so a machine lost later loses only unfinished runs.

``WORK/status.json`` (rewritten atomically every few seconds) says where every run stands;
``scripts/gpu_status.sh`` prints it. CPU mode (``--device cpu``, for tests and dry runs) runs the
same steps without GPUs.

Usage::

    python3 scripts/run_sweeps.py --plan configs/plan.json --corpus /tmp/lab/corpus --work /tmp/lab \\
        --gpus 0,1,2,3 --slots-per-gpu 2 --deadline-minutes 18
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMPILER_ERRORS = ("torch._dynamo", "InductorError", "BackendCompilerFailed", "torch._inductor")


def atomic_json(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(payload, fh, indent=1)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def last_train_record(run_dir: Path) -> dict:
    """The last 'train' record of a run's log (read from the end of the file)."""
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return {}
    with open(path, "rb") as fh:
        fh.seek(0, 2)
        fh.seek(max(0, fh.tell() - 8192))
        lines = fh.read().decode(errors="replace").splitlines()
    for ln in reversed(lines):
        try:
            r = json.loads(ln)
        except json.JSONDecodeError:
            continue
        if r.get("event") == "train":
            return r
    return {}


class Run:
    def __init__(self, entry: dict, args):
        self.entry, self.args = entry, args
        self.name = entry["run"]
        self.dir = args.work / "runs" / self.name
        self.log = args.work / "logs" / f"{self.name}.log"
        self.tracked = args.work / "tracked" / f"{self.name}.json"
        self.state, self.gpu, self.proc = "queued", None, None
        self.attempts, self.compile, self.share = 0, not args.no_compile, 1
        self.started = self.train_end = self.finished = None
        self.note = ""

    # -- commands -----------------------------------------------------------------------------
    def _env(self) -> dict:
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
               "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
        env["CUDA_VISIBLE_DEVICES"] = "" if self.args.device == "cpu" else str(self.gpu)
        env.setdefault("OMP_NUM_THREADS", str(self.args.threads))
        env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(self.args.compile_threads))  # many compile at once
        return env

    def _spawn(self, cmd: list[str]) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as fh:
            fh.write(f"\n$ {' '.join(cmd)}\n")
            fh.flush()
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=self._env(), cwd=REPO,
                                         start_new_session=True)

    def start_training(self, gpu) -> None:
        self.gpu, self.state, self.attempts = gpu, "training", self.attempts + 1
        self.started = self.started or time.time()
        cmd = [self.args.python, "-m", "sparsing_utils.cli", "train", "--config", str(REPO / self.entry["config"]),
               "--out", str(self.dir), "--corpus", str(self.args.corpus), "--device", self.args.device, "--quiet"]
        if (self.dir / "config.json").is_file():
            cmd.append("--resume")
        elif self.dir.exists():
            shutil.rmtree(self.dir)  # died before writing anything: start clean
        if not self.compile:
            cmd.append("--no-compile")
        self._spawn(cmd)

    def start_tracking(self) -> None:
        self.state, self.train_end = "tracking", time.time()
        self._spawn([self.args.python, "-m", "sparsing_utils.cli", "track", "--run", str(self.dir), "--p",
                     str(self.args.p), "--out", str(self.tracked), "--tokens", str(self.args.track_tokens),
                     "--pattern-tokens", str(self.args.pattern_tokens), "--token-set", str(self.args.token_set),
                     "--device", self.args.device, "--sweep", next(iter(self.entry["sweeps"])), "--quiet"]
                    + (["--pareto", self.args.pareto] if self.args.pareto else []))

    def publish(self) -> None:
        """Ship the tracked result into every sweep it belongs to (under that sweep's name for it): the
        full file once, in the first sweep of the plan entry, and a small alias file in each other
        (``sparsing_utils.runs.publish``), so ``data/runs/`` holds no duplicate."""
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        from sparsing_utils.runs import publish

        publish(json.loads(self.tracked.read_text()), self.entry["sweeps"], self.args.results)
        self.state, self.finished = "done", time.time()

    # -- status -------------------------------------------------------------------------------
    def status(self) -> dict:
        rec = last_train_record(self.dir) if self.state in ("training", "tracking", "done", "failed") else {}
        return {"run": self.name, "state": self.state, "gpu": self.gpu, "attempts": self.attempts,
                "compile": self.compile, "est_seconds": self.entry["est_seconds"], "started": self.started,
                "train_end": self.train_end, "finished": self.finished, "tokens": rec.get("tokens", 0),
                "total_tokens": self.entry["total_tokens"], "tokens_per_s": rec.get("tokens_per_s"),
                "mfu": rec.get("mfu"), "loss": rec.get("loss"), "note": self.note, "log": str(self.log)}


def pack(args) -> None:
    """results.tar.gz beside the results folder: results/<sweep>/*.json + runs/<run>/{config.json,log.jsonl}."""
    target = args.results.parent / "results.tar.gz"
    fd, tmp = tempfile.mkstemp(prefix=".results.", suffix=".tar.gz", dir=target.parent)
    os.close(fd)
    with tarfile.open(tmp, "w:gz") as tar:
        if args.results.is_dir():
            tar.add(args.results, arcname="results")
        for run in sorted((args.work / "runs").glob("*")):
            for f in ("config.json", "log.jsonl"):
                if (run / f).is_file():
                    tar.add(run / f, arcname=f"runs/{run.name}/{f}")
        if (args.work / "status.json").is_file():
            tar.add(args.work / "status.json", arcname="status.json")
    os.chmod(tmp, 0o644)
    os.replace(tmp, target)


def simulate(entries: list[dict], gpus: list, args) -> int:
    """The scheduler's decisions on the plan's estimates: each run spends ``--fixed-seconds`` off the
    GPU (half before training, half after) and the rest training, sharing its GPU equally with the
    other runs training there (processor sharing: no gain, no loss from running side by side)."""
    dt, now = 1.0, 0.0
    deadline = 60 * args.deadline_minutes if args.deadline_minutes else float("inf")
    queue = list(entries)
    active: list[dict] = []  # {"entry", "gpu", "pre", "gpu_left", "post", "start"}
    timeline = []
    while queue or active:
        for e in list(queue):
            load = {g: sum(1 for a in active if a["gpu"] == g) for g in gpus}
            free = [g for g in gpus if load[g] < args.slots_per_gpu]
            if not free:
                break
            g = min(free, key=lambda x: load[x])
            if now + e["est_seconds"] > deadline:
                queue.remove(e)
                timeline.append((e["run"], None, None, None))
                continue
            if now + e["est_seconds"] * (load[g] + 1) > deadline:
                continue
            queue.remove(e)
            fixed = min(args.fixed_seconds, e["est_seconds"])
            active.append({"entry": e, "gpu": g, "pre": fixed / 2, "gpu_left": e["est_seconds"] - fixed,
                           "post": fixed / 2, "start": now})
        for a in list(active):
            if a["pre"] > 0:
                a["pre"] -= dt
            elif a["gpu_left"] > 0:
                a["gpu_left"] -= dt / sum(1 for b in active if b["gpu"] == a["gpu"] and b["pre"] <= 0 < b["gpu_left"])
            else:
                a["post"] -= dt
                if a["post"] <= 0:
                    active.remove(a)
                    timeline.append((a["entry"]["run"], a["gpu"], a["start"], now))
        now += dt
    print(f"{'run':18} {'gpu':>3} {'start min':>9} {'end min':>7}")
    for run, gpu, start, end in sorted(timeline, key=lambda t: (t[2] is None, t[2] or 0)):
        print(f"{run:18} {'' if gpu is None else gpu!s:>3} " +
              (f"{start / 60:9.1f} {end / 60:7.1f}" if start is not None else "  skipped (would miss the deadline)"))
    done = [t for t in timeline if t[3] is not None]
    print(f"predicted: {len(done)} of {len(entries)} runs in {max((t[3] for t in done), default=0) / 60:.1f} min "
          f"on {len(gpus)} GPUs x {args.slots_per_gpu} slots")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", type=Path, default=REPO / "configs" / "plan.json")
    ap.add_argument("--corpus", type=Path, default=None, help="the shard corpus (required unless --simulate)")
    ap.add_argument("--work", type=Path, default=None, help="runs/, logs/, tracked/, status.json go here "
                                                             "(required unless --simulate)")
    ap.add_argument("--results", type=Path, default=None, help="default: WORK/results")
    ap.add_argument("--gpus", default=None, help="comma-separated GPU ids (default: all that torch sees)")
    ap.add_argument("--slots-per-gpu", type=int, default=2)
    ap.add_argument("--deadline-minutes", type=float, default=None, help="start no run that would end later")
    ap.add_argument("--only", default=None, help="comma-separated run names (default: all in the plan)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--p", type=float, default=1.0)
    ap.add_argument("--track-tokens", type=int, default=32768)
    ap.add_argument("--pattern-tokens", type=int, default=16384)
    ap.add_argument("--token-set", type=int, default=1024)
    ap.add_argument("--pareto", default="", help="CETT targets for `sparsing track --pareto` (default: none)")
    ap.add_argument("--threads", type=int, default=4, help="OMP_NUM_THREADS of each process")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--poll", type=float, default=3.0)
    ap.add_argument("--simulate", action="store_true",
                    help="print the predicted timeline from the plan's estimates (no work, no GPU needed)")
    ap.add_argument("--fixed-seconds", type=float, default=120.0,
                    help="--simulate: seconds of each estimate spent off the GPU (compiling, tracking)")
    args = ap.parse_args(argv)
    if not args.simulate and (args.corpus is None or args.work is None):
        ap.error("--corpus and --work are required (unless --simulate)")
    args.results = args.results or (args.work / "results" if args.work else None)
    plan = json.loads(args.plan.read_text())
    entries = sorted(plan["runs"], key=lambda r: r["priority"])
    if args.only:
        keep = set(args.only.split(","))
        unknown = keep - {e["run"] for e in entries}
        if unknown:
            raise SystemExit(f"--only names runs that are not in {args.plan}: {sorted(unknown)}")
        entries = [e for e in entries if e["run"] in keep]
    if args.device == "cpu":
        gpus = ["cpu"]
    elif args.simulate:
        gpus = [int(g) for g in (args.gpus or "0,1,2,3").split(",")]
    elif args.gpus:
        gpus = [int(g) for g in args.gpus.split(",")]
    else:
        import torch

        gpus = list(range(torch.cuda.device_count()))
        if not gpus:
            raise SystemExit("no GPU visible: pass --device cpu for a CPU run")
    args.compile_threads = max(1, (os.cpu_count() or 1) // max(1, len(gpus) * args.slots_per_gpu))
    if args.simulate:
        return simulate(entries, gpus, args)
    args.work.mkdir(parents=True, exist_ok=True)
    runs = [Run(e, args) for e in entries]
    for r in runs:  # a result from an earlier pass of this script is kept
        if all((args.results / s / f"{a}.json").is_file() for s, a in r.entry["sweeps"].items()):
            r.state, r.note = "done", "result existed"
    t0 = time.time()
    deadline = t0 + 60 * args.deadline_minutes if args.deadline_minutes else None
    ratios: list[float] = []

    def write_status():
        atomic_json(args.work / "status.json", {
            "started": t0, "now": time.time(), "deadline": deadline, "gpus": gpus, "slots_per_gpu": args.slots_per_gpu,
            "calibration": statistics.median(ratios) if ratios else None, "runs": [r.status() for r in runs]})

    while True:
        active = [r for r in runs if r.state in ("training", "tracking")]
        for r in active:
            rc = r.proc.poll()
            if rc is None:
                continue
            if rc != 0:
                text = r.log.read_text(errors="replace")[-20000:] if r.log.is_file() else ""
                if r.state == "training" and r.attempts < 2:
                    if any(s in text for s in COMPILER_ERRORS):
                        r.compile = False
                    r.note = f"attempt {r.attempts} failed (exit {rc}); retrying"
                    r.start_training(r.gpu)
                else:
                    r.state, r.finished, r.note = "failed", time.time(), f"{r.state} failed (exit {rc}); see {r.log}"
            elif r.state == "training":
                r.start_tracking()
            else:
                r.publish()
                ratios.append((r.finished - r.started) / (r.entry["est_seconds"] * r.share))
                pack(args)
        # start queued runs while slots are free, in priority order
        for r in [q for q in runs if q.state == "queued"]:
            load = {g: sum(1 for a in runs if a.state in ("training", "tracking") and a.gpu == g) for g in gpus}
            free = [g for g in gpus if load[g] < args.slots_per_gpu]
            if not free:
                break
            gpu = min(free, key=lambda g: load[g])
            share = load[gpu] + 1  # runs sharing the GPU at the start: a crude slowdown factor
            est = r.entry["est_seconds"] * (statistics.median(ratios) if ratios else 1.0)
            if deadline is not None and time.time() + est > deadline:
                r.state, r.note = "skipped", f"estimated {est:.0f} s (alone) would end after the deadline"
                continue
            if deadline is not None and time.time() + est * share > deadline:
                r.note = "waits for a GPU of its own (shared, it would miss the deadline)"
                continue  # a later, shorter run may fit now; this one may fit once a GPU is free
            r.share = share
            r.note = ""
            r.start_training(gpu)
        write_status()
        if not any(r.state in ("queued", "training", "tracking") for r in runs):
            break
        time.sleep(args.poll)
    pack(args)
    write_status()
    done = sum(r.state == "done" for r in runs)
    print(f"finished: {done} done, {sum(r.state == 'failed' for r in runs)} failed, "
          f"{sum(r.state == 'skipped' for r in runs)} skipped in {time.time() - t0:.0f} s")
    return 0 if done else 1


if __name__ == "__main__":
    raise SystemExit(main())
