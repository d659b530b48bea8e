"""How a small model is trained (Luo et al. 2024, Sec. 4): the :class:`Trainer` and :func:`train`.

What is trained is :mod:`sparsing_utils.training` (:class:`~sparsing_utils.training.TrainConfig`,
the plan and schedule, the model builder, the accounting). Here: AdamW (fused on CUDA), the
warmup-stable-decay learning rate of the plan, gradient accumulation, bf16 autocast on CUDA
(float32 on CPU), optional ``torch.compile`` of regions, fixed seeds, data order a pure function
of ``(seed, step, rank, world)`` (:mod:`sparsing_utils.shards`), checkpoints written at the
plan's steps (:mod:`sparsing_utils.checkpoints`), a JSONL log and exact resume. Several GPUs:
start the same entry point under ``torchrun`` (DDP; ``WORLD_SIZE``/``LOCAL_RANK`` are read from
the environment).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .training import (
    DTYPES,
    RUNTIME_FIELDS,
    RunPlan,
    TrainConfig,
    build_model,
    code_version,
    load_run_config,
    make_plan,
)

__all__ = ["DistEnv", "NextTokenLoss", "Trainer", "init_distributed", "train"]


# ---------------------------------------------------------------------------------------------
# The loss: next-token cross-entropy of packed sequences (compiled by regions)
# ---------------------------------------------------------------------------------------------


def _head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the LM head: ``hidden [b, T, d]``, ``weight [vocab, d]``, ``targets [b, T]``."""
    logits = F.linear(hidden, weight)  # [b, T, vocab]
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


class NextTokenLoss(nn.Module):
    """Mean next-token cross-entropy of packed causal sequences ``[batch, seq_len + 1]``. No
    attention mask tensor is passed, so SDPA takes its causal (flash) path.

    ``compile=True`` compiles regions, not the whole model: each decoder layer (one graph shared
    by all layers) and the LM head with the loss. The causal mask is then decided outside the
    compiled graphs, where transformers can skip it (under a whole-model compile some versions
    build an explicit mask, which keeps SDPA off its flash kernel).
    """

    def __init__(self, model: nn.Module, *, compile: bool = False):
        super().__init__()
        self.model = model
        self.head_loss = _head_loss
        # MoE models in training mode add router_aux_loss_coef x the load-balancing loss (Switch Transformer)
        self.aux_coef = float(getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0) \
            if getattr(model.config, "num_experts_per_tok", None) else 0.0
        if compile:
            for layer in model.model.layers:
                layer.compile()
            self.head_loss = torch.compile(_head_loss)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens [batch, seq_len + 1]
        aux = self.aux_coef > 0 and self.model.training
        out = self.model.model(input_ids=tokens[:, :-1], use_cache=False, **({"output_router_logits": True} if aux else {}))
        loss = self.head_loss(out.last_hidden_state, self.model.lm_head.weight, tokens[:, 1:])  # hidden [b, T, d]
        if aux:
            from transformers.models.mixtral.modeling_mixtral import (
                load_balancing_loss_func,
            )

            c = self.model.config
            n = getattr(c, "num_local_experts", None) or c.num_experts
            loss = loss + self.aux_coef * load_balancing_loss_func(out.router_logits, n, c.num_experts_per_tok)
        return loss



# ---------------------------------------------------------------------------------------------
# Processes and devices
# ---------------------------------------------------------------------------------------------


@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistEnv:
    """Read torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``); start the process
    group (NCCL on CUDA, gloo on CPU) when there are several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local % max(1, torch.cuda.device_count()))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():  # NCCL bound to this process's GPU (barriers then use the right one)
            kw = {"device_id": dev} if dev.type == "cuda" else {}
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", **kw)
    return DistEnv(rank=rank, local_rank=local, world=world, device=dev)


class _HostToDevice:
    """Copies host batches to the device through a ring of pinned buffers (asynchronous on CUDA;
    a buffer is reused only once its previous copy has finished)."""

    def __init__(self, device: torch.device, slots: int = 3):
        self.device, self.cuda = device, device.type == "cuda"
        self.bufs: list[torch.Tensor | None] = [None] * slots
        self.events: list = [None] * slots
        self.i = 0

    def __call__(self, arr: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(arr)
        if not self.cuda:
            return t.to(self.device)
        i = self.i
        self.i = (i + 1) % len(self.bufs)
        if self.events[i] is not None:
            self.events[i].synchronize()
        if self.bufs[i] is None or self.bufs[i].shape != t.shape:
            self.bufs[i] = torch.empty(t.shape, dtype=t.dtype).pin_memory()
        self.bufs[i].copy_(t)
        out = self.bufs[i].to(self.device, non_blocking=True)
        self.events[i] = torch.cuda.Event()
        self.events[i].record()
        return out


# ---------------------------------------------------------------------------------------------
# The trainer: one optimisation step at a time (the loop, checkpoints and logs are in `train`)
# ---------------------------------------------------------------------------------------------


class Trainer:
    """Model, optimizer and data of one run on one process (DDP-wrapped under torchrun)."""

    def __init__(self, cfg: TrainConfig, corpus, env: DistEnv | None = None, *, plan: RunPlan | None = None):
        from .shards import PackedSampler

        self.cfg, self.corpus = cfg, corpus
        self.env = env or DistEnv()
        self.plan = plan or make_plan(cfg, corpus.vocab_size, self.env.world)
        dev = self.env.device
        if dev.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for whatever runs in float32
        amp = DTYPES["bfloat16" if cfg.dtype == "auto" and dev.type == "cuda" else
                     ("float32" if cfg.dtype == "auto" else cfg.dtype)]
        self.autocast = (lambda: torch.autocast(dev.type, dtype=amp)) if amp is not None else contextlib.nullcontext
        self.amp_dtype = "float32" if amp is None else str(amp).replace("torch.", "")
        self.model = build_model(cfg, self.plan, eos_id=corpus.eos_id).to(dev)
        self.loss_module = NextTokenLoss(self.model, compile=cfg.compile)
        fwd: nn.Module = self.loss_module
        self.ddp = None
        if self.env.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp = DDP(fwd, device_ids=[dev.index] if dev.type == "cuda" else None, gradient_as_bucket_view=True)
            fwd = self.ddp
        self.forward = fwd
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        extra = {"fused": True} if dev.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps, **extra)
        self.sampler = PackedSampler(corpus, seq_len=cfg.seq_len, batch_seqs=self.plan.batch_seqs, seed=cfg.seed,
                                     weights=cfg.domain_weights, train_fraction=cfg.train_fraction)
        self.h2d = _HostToDevice(dev)
        self.params = [p for p in self.model.parameters()]

    def step(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step (step index ``step``): returns this process's mean loss and the
        gradient norm before clipping, as device tensors (no host synchronisation)."""
        lr = self.plan.lr_at(step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        tokens = self.h2d(self.sampler.batch(step, self.env.rank, self.env.world))  # [per_rank, T + 1]
        m, accum = self.plan.micro_batch_size, self.plan.grad_accum
        total = torch.zeros((), device=self.env.device)
        for k in range(accum):
            sync = self.ddp is None or k == accum - 1
            with (contextlib.nullcontext() if sync else self.ddp.no_sync()):
                with self.autocast():
                    loss = self.forward(tokens[k * m:(k + 1) * m])
                (loss / accum).backward()
            total += loss.detach().float()
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None]))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / accum, norm

    @torch.no_grad()
    def heldout_loss(self, blocks: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Mean next-token loss on fixed held-out blocks ``[n, seq_len + 1]`` per domain (uncompiled)."""
        self.model.eval()
        out = {}
        # compiled regions would compile a second (no-grad) graph for this; eager is fast enough here
        eager = (torch.compiler.set_stance("force_eager") if self.cfg.compile and hasattr(torch.compiler, "set_stance")
                 else contextlib.nullcontext())
        try:
            bs = max(1, self.plan.micro_batch_size)
            with eager:
                for domain, ids in blocks.items():
                    nll = torch.zeros((), dtype=torch.float64, device=self.env.device)
                    for i in range(0, ids.shape[0], bs):
                        batch = ids[i:i + bs].to(self.env.device)
                        with self.autocast():
                            nll += self.loss_module(batch).double() * batch.shape[0]
                    out[domain] = float(nll) / ids.shape[0]
        finally:
            self.model.train()
        return out

    def optimizer_state(self) -> dict:
        return self.optimizer.state_dict()

    def rng_state(self) -> dict:
        state = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and self.env.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.env.device)
        return state

    def restore(self, ckpt, trainer_state: dict, optimizer_state: dict) -> None:
        from .checkpoints import load_weights

        load_weights(self.model, ckpt)
        self.optimizer.load_state_dict(optimizer_state)
        torch.set_rng_state(trainer_state["rng"]["torch"])
        if "cuda" in trainer_state["rng"] and self.env.device.type == "cuda":
            torch.cuda.set_rng_state(trainer_state["rng"]["cuda"], self.env.device)



# ---------------------------------------------------------------------------------------------
# Run folders, logs and the loop
# ---------------------------------------------------------------------------------------------


def _config_differences(a: TrainConfig, b: TrainConfig) -> list[str]:
    da, db = a.to_dict(), b.to_dict()
    return [f"{k}: {da[k]!r} -> {db[k]!r}" for k in da if k not in RUNTIME_FIELDS and da[k] != db[k]]


class _Log:
    """``log.jsonl``: one JSON object per line, flushed at once (main process only)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (a resumed run redoes them)."""
        if not (self.enabled and self.path.is_file()):
            return
        keep = [ln for ln in self.path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record, allow_nan=False) + "\n")


def _prepare_run_dir(out: Path, cfg: TrainConfig, resume: bool) -> TrainConfig:
    """Check the run folder before any work: refuse to overwrite, or check a resumed run's config."""
    if resume:
        if not out.exists():
            raise FileNotFoundError(f"--resume: run folder {out} does not exist; drop --resume to start it")
        saved, _ = load_run_config(out)
        diff = _config_differences(saved, cfg)
        if diff:
            raise ValueError(f"--resume: the config differs from the run's saved config.json in: {'; '.join(diff)}. "
                             "Resume with the same config (or start a new run folder)")
        return dataclasses.replace(saved, **{k: getattr(cfg, k) for k in RUNTIME_FIELDS})
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"run folder {out} exists and is not empty: pass --resume to continue it, or "
                              "choose another --out (nothing is overwritten)")
    return cfg


def train(cfg: TrainConfig, out: str | os.PathLike, *, resume: bool = False, device: str = "auto",
          progress: bool = True, stop_after_steps: int | None = None) -> Path:
    """Train a run into ``out`` (``config.json``, ``log.jsonl``, ``checkpoints/``); returns ``out``.

    ``resume``: continue from the latest complete checkpoint (losses are those of an uninterrupted
    run). ``stop_after_steps``: return after that many steps without writing anything more (a
    kill, for tests). Under torchrun every process calls this; only rank 0 writes.
    """
    from .checkpoints import (
        list_checkpoints,
        prune_resume_files,
        remove_partial,
        write_checkpoint,
    )
    from .shards import open_corpus

    out = Path(out)
    env = init_distributed(device)
    cfg.validate(env.world)
    cfg = _prepare_run_dir(out, cfg, resume)
    _barrier(env)  # every process has checked the folder before the main one writes into it
    corpus = open_corpus(cfg.corpus)
    plan = make_plan(cfg, corpus.vocab_size, env.world)
    start_step, ckpt = 0, None
    if resume:
        if env.main:
            remove_partial(out)
        done = list_checkpoints(out)  # checks every checkpoint: a corrupt one is an error, nothing is changed
        if done:
            ckpt = done[-1]
            if not ckpt.resumable:
                raise ValueError(f"checkpoint {ckpt.path} has no optimizer/trainer state to resume from")
            start_step = ckpt.step
    heldout = {}
    if cfg.heldout_tokens > 0 and env.main:
        for d in sorted(corpus.heldout):
            n = min(cfg.heldout_tokens, len(corpus.heldout[d])) // (cfg.seq_len + 1) * (cfg.seq_len + 1)
            if n:
                heldout[d] = corpus.heldout_blocks({d: n}, cfg.seq_len + 1).input_ids
    trainer = Trainer(cfg, corpus, env, plan=plan)
    log = _Log(out / "log.jsonl", env.main)
    if ckpt is not None:
        trainer.restore(ckpt, torch.load(ckpt.path / "trainer_state.pt", weights_only=False),
                        torch.load(ckpt.path / "optimizer.pt", weights_only=False, map_location=env.device))
    if env.main:
        from .jsonio import atomic_write_json

        out.mkdir(parents=True, exist_ok=True)
        (out / "checkpoints").mkdir(exist_ok=True)
        if not resume or not (out / "config.json").is_file():
            atomic_write_json(out / "config.json", {
                "config": cfg.to_dict(), "plan": plan.to_dict(), "corpus": corpus.summary(),
                "mixture": trainer.sampler.mixture, "code_version": code_version(),
                "torch": torch.__version__, "transformers": _transformers_version(), "device": _device_name(env),
                "world_size": env.world, "amp_dtype": trainer.amp_dtype})
        log.truncate_after(start_step)
        log.write({"event": "resume" if start_step else "start", "step": start_step,
                   "tokens": start_step * cfg.global_batch_tokens, "world_size": env.world,
                   "device": _device_name(env), "time": time.time()})
    ckpt_steps = set(plan.checkpoint_steps)
    bar = None
    if progress and env.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=plan.total_tokens, initial=start_step * cfg.global_batch_tokens, unit="tok",
                   unit_scale=True, desc=cfg.name or out.name, dynamic_ncols=True)
    loss_sum = torch.zeros((), device=env.device)
    n_in_interval, last_loss = 0, float("nan")
    t0 = time.perf_counter()
    interval_start_step = start_step
    try:
        for step in range(start_step, plan.total_steps):
            loss, norm = trainer.step(step)
            loss_sum += loss
            n_in_interval += 1
            done_steps = step + 1
            is_ckpt = done_steps in ckpt_steps
            if done_steps % cfg.log_every == 0 or is_ckpt or done_steps == plan.total_steps:
                if env.world > 1:
                    import torch.distributed as dist

                    dist.all_reduce(loss_sum)
                    loss_sum /= env.world
                last_loss = float(loss_sum) / n_in_interval  # the only host synchronisation
                elapsed = max(time.perf_counter() - t0, 1e-9)
                tok_s = (done_steps - interval_start_step) * cfg.global_batch_tokens / elapsed
                mfu = plan.flops_per_token * tok_s / (cfg.peak_flops * env.world)
                log.write({"event": "train", "step": done_steps, "tokens": done_steps * cfg.global_batch_tokens,
                           "loss": last_loss, "lr": plan.lr_at(step), "grad_norm": float(norm),
                           "tokens_per_s": tok_s, "mfu": mfu, "seconds": elapsed, "stage": plan.stage_at(step),
                           "time": time.time()})
                if bar is not None:
                    bar.update((done_steps - interval_start_step) * cfg.global_batch_tokens)
                    bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tok_s:.3g}", mfu=f"{mfu:.1%}")
                loss_sum.zero_()
                n_in_interval, interval_start_step = 0, done_steps
            if is_ckpt and env.main:
                held = trainer.heldout_loss(heldout) if heldout else {}
                mix = trainer.sampler.mixture
                total_w = sum(mix.get(d, 0.0) for d in held)
                held_mean = (sum(mix.get(d, 0.0) * v for d, v in held.items()) / total_w) if total_w else None
                state = {"step": done_steps, "tokens": done_steps * cfg.global_batch_tokens, "lr": plan.lr_at(step),
                         "stage": plan.checkpoint_stage(done_steps), "train_loss": last_loss,
                         "heldout_loss": held_mean, "heldout_loss_by_domain": held,
                         "epochs": trainer.sampler.epochs(done_steps), "time": time.time()}
                write_checkpoint(out, trainer.model, state, optimizer=trainer.optimizer_state(),
                                 trainer_state={"step": done_steps, "rng": trainer.rng_state(), "world_size": env.world,
                                                "data": {"scheme": "PackedSampler", "next_step": done_steps}})
                prune_resume_files(out, cfg.keep_resume_states)
                log.write({"event": "checkpoint", **{k: v for k, v in state.items() if k != "time"}})
            if is_ckpt or (done_steps % cfg.log_every == 0):
                t0 = time.perf_counter()  # throughput excludes held-out evaluation and checkpoint writing
            if stop_after_steps is not None and done_steps >= stop_after_steps:
                break
        else:
            log.write({"event": "end", "step": plan.total_steps, "tokens": plan.total_tokens, "time": time.time()})
    finally:
        if bar is not None:
            bar.close()
    _barrier(env)  # no process leaves while the main one still writes the last checkpoint
    return out


def _barrier(env: DistEnv) -> None:
    if env.world > 1:
        import torch.distributed as dist

        dist.barrier()


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _device_name(env: DistEnv) -> str:
    if env.device.type == "cuda":
        return torch.cuda.get_device_name(env.device)
    return "cpu"
