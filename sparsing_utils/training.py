"""Small-model pre-training for the scaling studies (Luo et al. 2024, Sec. 4; PAPER.md Sec. 2-3).

One config dataclass, :class:`TrainConfig`, saved with every run. The model is a Llama-style
decoder built by transformers (``LlamaForCausalLM``, SDPA attention, gated FFN with ``hidden_act``
relu or silu, any width, depth and ``d_ff``). Training: AdamW (fused on CUDA), a
warmup-stable-decay schedule, gradient accumulation, bf16 autocast on CUDA (float32 on CPU),
optional ``torch.compile``, fixed seeds, data order a pure function of ``(seed, step, rank,
world)`` (:mod:`sparsing_utils.shards`), checkpoints log-spaced in tokens
(:mod:`sparsing_utils.checkpoints`), a JSONL log and exact resume. Several GPUs: start the same
entry point under ``torchrun`` (DDP; ``WORLD_SIZE``/``LOCAL_RANK`` are read from the environment).

Accounting (stated once, used everywhere):

* **non-embedding parameters** ``N``: every parameter except the token embedding and the LM head
  (attention and FFN matrices, and the RMSNorm weights):
  ``N = L (2 d^2 + 2 d n_kv h + 3 d d_ff + 2 d) + d`` (``h`` head dim, ``n_kv`` key/value heads).
* **FLOPs per token** (training, forward + backward; the PaLM paper's appendix B):
  ``6 N_matmul + 12 L d T``, with ``N_matmul`` the weights of every matrix product: attention
  and FFN matrices *and the LM head* (``d V``), not the norms or the embedding lookup; ``12 L d T``
  is the attention scores and values (``T`` the sequence length, causal masking not discounted).
* **MFU** = FLOPs per token x tokens/s / (peak x devices). Default peak: 989.4e12 FLOP/s, the
  dense bf16 tensor rate of one H200 SXM from NVIDIA's datasheet (1,979 TFLOPS is quoted with 2:4
  sparsity; dense is half).
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import math
import os
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "DECAY_SHAPES",
    "H200_BF16_DENSE_FLOPS",
    "RunPlan",
    "TrainConfig",
    "Trainer",
    "build_model",
    "checkpoint_steps",
    "code_version",
    "flops_per_token",
    "load_run_config",
    "make_plan",
    "non_embedding_params",
    "train",
]

H200_BF16_DENSE_FLOPS = 989.4e12  # NVIDIA H200 SXM datasheet: bf16 tensor 1,979 TFLOPS with sparsity -> dense half

ACTIVATIONS = {"relu": "relu", "silu": "silu"}  # config name -> transformers `hidden_act` (gated FFN)

DECAY_SHAPES: dict[str, Callable[[float], float]] = {  # progress x in (0, 1] -> factor from 1 down to 0
    "linear": lambda x: 1.0 - x,
    "cosine": lambda x: 0.5 * (1.0 + math.cos(math.pi * x)),
    "1-sqrt": lambda x: 1.0 - math.sqrt(x),
}

DTYPES = {"float32": None, "bfloat16": torch.bfloat16}  # autocast dtype; "auto": bf16 on CUDA, fp32 on CPU

# Fields that may change when a run is resumed (they do not change what is computed, only how).
RUNTIME_FIELDS = frozenset({"corpus", "compile", "micro_batch_size", "log_every", "peak_flops", "name"})


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as ``config.json``; :meth:`from_dict` refuses
    unknown keys). Shapes are checked by :meth:`validate` before any work."""

    # -- model: transformers LlamaForCausalLM ------------------------------------------------
    activation: str = "relu"            # relu | silu (gated FFN: act(W_gate x) * W_up x)
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None     # None: = num_heads (no grouped-query attention)
    d_ff: int | None = None             # give d_ff or ffn_ratio (None and None: ratio 8/3)
    ffn_ratio: float | None = None
    ffn_multiple: int = 16              # d_ff from a ratio is rounded to a multiple of this
    tie_embeddings: bool = True
    vocab_size: int | None = None       # None: the corpus tokenizer's, padded to vocab_multiple
    vocab_multiple: int = 64
    init_std: float = 0.02
    rms_norm_eps: float = 1e-6
    num_experts: int = 1                # issue 10 (MoE): only the dense model (1) exists yet
    experts_top_k: int = 1
    # -- data ----------------------------------------------------------------------------------
    corpus: str = "corpus"              # folder written by scripts/build_corpus.py
    domain_weights: dict | None = None  # domain -> weight; None: proportional to training tokens
    train_fraction: float = 1.0         # use the first fraction of each domain (repetition study)
    seq_len: int = 512
    heldout_tokens: int = 65536         # per domain, for the held-out loss at every checkpoint
    # -- batch and duration --------------------------------------------------------------------
    global_batch_tokens: int = 131072
    micro_batch_size: int | None = None  # sequences per process per forward; None: no accumulation
    total_tokens: int | None = None      # give total_tokens or tokens_per_param
    tokens_per_param: float | None = None  # x non-embedding parameters, rounded up to whole steps
    # -- optimizer (AdamW) ---------------------------------------------------------------------
    lr: float = 3e-3
    betas: tuple = (0.9, 0.95)
    weight_decay: float = 0.1
    adam_eps: float = 1e-8
    grad_clip: float = 1.0              # 0: off
    # -- schedule: warmup-stable-decay ---------------------------------------------------------
    warmup_fraction: float = 0.01
    decay_fraction: float = 0.1         # the last fraction of steps decays to min_lr_ratio * lr
    decay_shape: str = "linear"
    min_lr_ratio: float = 0.1
    # -- checkpoints and logging ---------------------------------------------------------------
    n_checkpoints: int = 24             # log-spaced in tokens, + the last stable step and the final
    first_checkpoint_fraction: float = 0.005
    keep_resume_states: int = 1         # optimizer/RNG files kept for the newest k checkpoints
    log_every: int = 10
    # -- runtime -------------------------------------------------------------------------------
    seed: int = 0
    dtype: str = "auto"
    compile: bool = False
    peak_flops: float = H200_BF16_DENSE_FLOPS  # per device, for MFU
    name: str = ""

    # ---------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            hints = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
            msg = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
            raise ValueError(f"unknown config field(s) {msg}; known fields: {sorted(known)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"config file {path} is not valid JSON: {err}") from None
        return cls.from_dict(d.get("config", d) if isinstance(d, dict) else d)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    # -- derived shapes ------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_dim(self) -> int:
        if self.d_ff is not None:
            return int(self.d_ff)
        ratio = 8.0 / 3.0 if self.ffn_ratio is None else float(self.ffn_ratio)
        m = max(1, int(self.ffn_multiple))
        return max(m, round(ratio * self.hidden_size / m) * m)

    def validate(self, world_size: int = 1) -> None:
        """Raise ``ValueError`` listing every problem (``NotImplementedError`` for MoE, issue 10)."""
        if self.num_experts != 1 or self.experts_top_k != 1:
            if not (isinstance(self.num_experts, int) and self.num_experts >= 1):
                raise ValueError(f"num_experts must be an integer >= 1, got {self.num_experts!r}")
            raise NotImplementedError(
                f"mixture-of-experts models (num_experts={self.num_experts}, experts_top_k={self.experts_top_k}) "
                "are not implemented yet (issue 10); use num_experts=1, experts_top_k=1 (dense)")
        errors: list[str] = []

        def need(ok: bool, msg: str) -> None:
            if not ok:
                errors.append(msg)

        def positive_int(name: str) -> bool:
            v = getattr(self, name)
            ok = isinstance(v, int) and not isinstance(v, bool) and v >= 1
            need(ok, f"{name} must be a positive integer, got {v!r}")
            return ok

        need(self.activation in ACTIVATIONS,
             f"unknown activation {self.activation!r}: use one of {sorted(ACTIVATIONS)}")
        checked = [positive_int(n) for n in ("hidden_size", "num_layers", "num_heads", "seq_len", "global_batch_tokens",
                                             "n_checkpoints", "log_every", "keep_resume_states", "vocab_multiple",
                                             "ffn_multiple")]  # every field checked, so every problem is listed
        shapes_ok = all(checked)
        if self.num_kv_heads is not None:
            shapes_ok &= positive_int("num_kv_heads")
        if shapes_ok:
            need(self.hidden_size % self.num_heads == 0,
                 f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
            need(self.num_heads % self.kv_heads == 0,
                 f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.kv_heads}")
            if self.hidden_size % self.num_heads == 0:
                need(self.head_dim % 2 == 0, f"head dimension {self.head_dim} (= hidden_size / num_heads) is odd; "
                                             "rotary embeddings need an even one")
        need(self.d_ff is None or self.ffn_ratio is None, "give d_ff or ffn_ratio, not both")
        need(self.d_ff is None or (isinstance(self.d_ff, int) and self.d_ff >= 1), f"d_ff must be >= 1, got {self.d_ff!r}")
        need(self.ffn_ratio is None or self.ffn_ratio > 0, f"ffn_ratio must be > 0, got {self.ffn_ratio!r}")
        need(self.vocab_size is None or (isinstance(self.vocab_size, int) and 2 <= self.vocab_size),
             f"vocab_size must be None (from the corpus) or >= 2, got {self.vocab_size!r}")
        need(self.init_std > 0 and self.rms_norm_eps > 0, "init_std and rms_norm_eps must be > 0")
        need(0 < self.train_fraction <= 1, f"train_fraction must be in (0, 1], got {self.train_fraction}")
        need(isinstance(self.heldout_tokens, int) and self.heldout_tokens >= 0,
             f"heldout_tokens must be an integer >= 0, got {self.heldout_tokens!r}")
        if shapes_ok:
            need(self.global_batch_tokens % self.seq_len == 0,
                 f"global_batch_tokens {self.global_batch_tokens} is not a multiple of seq_len {self.seq_len}")
            seqs = self.global_batch_tokens // self.seq_len
            need(seqs % world_size == 0, f"{seqs} sequences per global batch do not split over {world_size} processes")
            if self.micro_batch_size is not None:
                ok = isinstance(self.micro_batch_size, int) and self.micro_batch_size >= 1
                need(ok, f"micro_batch_size must be a positive integer or null, got {self.micro_batch_size!r}")
                if ok and seqs % world_size == 0:
                    per = seqs // world_size
                    need(per % self.micro_batch_size == 0,
                         f"gradient accumulation is not integral: {per} sequences per process "
                         f"({seqs} per batch / {world_size} processes) are not a multiple of micro_batch_size "
                         f"{self.micro_batch_size}")
        need((self.total_tokens is None) != (self.tokens_per_param is None),
             "give exactly one of total_tokens and tokens_per_param")
        if self.total_tokens is not None and shapes_ok:
            need(isinstance(self.total_tokens, int) and self.total_tokens > 0
                 and self.total_tokens % self.global_batch_tokens == 0,
                 f"total_tokens {self.total_tokens} is not a positive multiple of global_batch_tokens "
                 f"{self.global_batch_tokens} (whole steps)")
        need(self.tokens_per_param is None or self.tokens_per_param > 0, "tokens_per_param must be > 0")
        need(self.lr > 0 and math.isfinite(self.lr), f"lr must be > 0, got {self.lr}")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"betas must be two numbers in [0, 1), got {self.betas}")
        need(self.weight_decay >= 0 and self.grad_clip >= 0 and self.adam_eps > 0,
             "weight_decay and grad_clip must be >= 0, adam_eps > 0")
        need(0 <= self.warmup_fraction < 1 and 0 <= self.decay_fraction < 1
             and self.warmup_fraction + self.decay_fraction < 1,
             f"warmup_fraction ({self.warmup_fraction}) and decay_fraction ({self.decay_fraction}) must be in "
             "[0, 1) and leave a stable stage between them")
        need(self.decay_shape in DECAY_SHAPES, f"unknown decay_shape {self.decay_shape!r}: use one of {sorted(DECAY_SHAPES)}")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(isinstance(self.n_checkpoints, int) and self.n_checkpoints >= 20,
             f"n_checkpoints must be >= 20 (the activation curves need them), got {self.n_checkpoints}")
        need(0 < self.first_checkpoint_fraction < 1,
             f"first_checkpoint_fraction must be in (0, 1), got {self.first_checkpoint_fraction}")
        need(self.dtype == "auto" or self.dtype in DTYPES, f"unknown dtype {self.dtype!r}: use auto, float32 or bfloat16")
        need(self.peak_flops > 0, "peak_flops must be > 0")
        need(self.domain_weights is None or isinstance(self.domain_weights, Mapping),
             "domain_weights must be an object {domain: weight} or null")
        if errors:
            raise ValueError("invalid training config:\n  - " + "\n  - ".join(errors))


def non_embedding_params(cfg: TrainConfig) -> int:
    """Parameters other than the token embedding and the LM head (module docstring)."""
    d, L = cfg.hidden_size, cfg.num_layers
    kv = cfg.kv_heads * cfg.head_dim
    return L * (2 * d * d + 2 * d * kv + 3 * d * cfg.ffn_dim + 2 * d) + d


def matmul_params(cfg: TrainConfig, vocab_size: int) -> int:
    """Weights that enter a matrix product per token: attention, FFN and the LM head (no norms)."""
    d, L = cfg.hidden_size, cfg.num_layers
    kv = cfg.kv_heads * cfg.head_dim
    return L * (2 * d * d + 2 * d * kv + 3 * d * cfg.ffn_dim) + d * vocab_size


def flops_per_token(cfg: TrainConfig, vocab_size: int) -> float:
    """Training FLOPs per token: ``6 N_matmul + 12 L d T`` (PaLM, appendix B; module docstring)."""
    attention_dim = cfg.num_heads * cfg.head_dim
    return 6.0 * matmul_params(cfg, vocab_size) + 12.0 * cfg.num_layers * attention_dim * cfg.seq_len


def checkpoint_steps(total_steps: int, n: int, first_fraction: float, extra: tuple[int, ...] = ()) -> list[int]:
    """Step counts of the checkpoints: at least ``n`` distinct ones log-spaced from
    ``first_fraction * total_steps`` up to (not counting) the final step, then the final one, plus
    ``extra`` (e.g. the last stable step)."""
    if total_steps <= n:
        raise ValueError(f"{total_steps} training steps cannot hold {n} checkpoints before the final one: train "
                         "longer or use a smaller global batch")
    s0 = min(max(1, round(first_fraction * total_steps)), total_steps - n)
    k = n + 1
    while True:
        pts = np.unique(np.round(np.geomspace(s0, total_steps, k)).astype(np.int64))
        if len(pts) >= n + 1:  # the last point is the final step
            break
        k += max(1, (n + 1 - len(pts)) // 2)
    keep = {int(p) for p in pts} | {int(e) for e in extra if 1 <= e <= total_steps}
    return sorted(keep)


@dataclass
class RunPlan:
    """What a config means on a corpus and a number of processes: sizes, steps, schedule."""

    vocab_size: int               # the model's (the corpus's, padded)
    corpus_vocab_size: int
    d_ff: int
    head_dim: int
    kv_heads: int
    non_embedding_params: int
    embedding_params: int
    flops_per_token: float
    batch_seqs: int
    world_size: int
    micro_batch_size: int
    grad_accum: int
    total_tokens: int
    total_steps: int
    warmup_steps: int
    decay_start: int              # first step index of the decay stage
    checkpoint_steps: list[int] = field(default_factory=list)
    lr: float = 0.0
    min_lr_ratio: float = 0.0
    decay_shape: str = "linear"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def lr_at(self, step: int) -> float:
        """Learning rate of step index ``step`` (0-based): linear warmup, constant, then decay."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if step < self.decay_start:
            return self.lr
        x = (step - self.decay_start + 1) / max(1, self.total_steps - self.decay_start)
        return self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * DECAY_SHAPES[self.decay_shape](min(1.0, x)))

    def stage_at(self, step: int) -> str:
        """Stage of step index ``step``: warmup, stable or decay."""
        if step < self.warmup_steps:
            return "warmup"
        return "stable" if step < self.decay_start else "decay"

    def checkpoint_stage(self, steps_done: int) -> str:
        """Stage of a checkpoint taken after ``steps_done`` steps (that of its last step)."""
        return self.stage_at(steps_done - 1)


def make_plan(cfg: TrainConfig, corpus_vocab_size: int, world_size: int = 1) -> RunPlan:
    """Validate ``cfg`` and derive the :class:`RunPlan` (no model is built)."""
    cfg.validate(world_size)
    if cfg.vocab_size is not None:
        if cfg.vocab_size < corpus_vocab_size:
            raise ValueError(f"vocab_size {cfg.vocab_size} is smaller than the corpus tokenizer's "
                             f"{corpus_vocab_size}; leave it null to take the corpus's")
        vocab = cfg.vocab_size
    else:
        vocab = -(-corpus_vocab_size // cfg.vocab_multiple) * cfg.vocab_multiple
    n = non_embedding_params(cfg)
    seqs = cfg.global_batch_tokens // cfg.seq_len
    per_rank = seqs // world_size
    micro = per_rank if cfg.micro_batch_size is None else cfg.micro_batch_size
    if cfg.total_tokens is not None:
        steps = cfg.total_tokens // cfg.global_batch_tokens
    else:
        steps = math.ceil(cfg.tokens_per_param * n / cfg.global_batch_tokens)
    warmup = round(cfg.warmup_fraction * steps)
    decay_start = steps - round(cfg.decay_fraction * steps)
    if decay_start <= warmup:
        raise ValueError(f"{steps} steps leave no stable stage between warmup ({warmup} steps) and decay "
                         f"(from step {decay_start}): train longer or shorten warmup/decay")
    extra = (decay_start,) if decay_start < steps else ()
    ckpts = checkpoint_steps(steps, cfg.n_checkpoints, cfg.first_checkpoint_fraction, extra)
    emb = vocab * cfg.hidden_size * (1 if cfg.tie_embeddings else 2)
    return RunPlan(vocab_size=vocab, corpus_vocab_size=corpus_vocab_size, d_ff=cfg.ffn_dim, head_dim=cfg.head_dim,
                   kv_heads=cfg.kv_heads, non_embedding_params=n, embedding_params=emb,
                   flops_per_token=flops_per_token(cfg, vocab), batch_seqs=seqs, world_size=world_size,
                   micro_batch_size=micro, grad_accum=per_rank // micro, total_tokens=steps * cfg.global_batch_tokens,
                   total_steps=steps, warmup_steps=warmup, decay_start=decay_start, checkpoint_steps=ckpts,
                   lr=cfg.lr, min_lr_ratio=cfg.min_lr_ratio, decay_shape=cfg.decay_shape)


def build_model(cfg: TrainConfig, plan: RunPlan, *, eos_id: int | None = None):
    """A freshly initialised ``LlamaForCausalLM`` (seeded by ``cfg.seed``; float32; SDPA)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig(
        vocab_size=plan.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=plan.d_ff,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=plan.kv_heads,
        hidden_act=ACTIVATIONS[cfg.activation], max_position_embeddings=cfg.seq_len,
        initializer_range=cfg.init_std, rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        use_cache=False, bos_token_id=None, eos_token_id=eos_id, pad_token_id=None, attn_implementation="sdpa",
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(hf)


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
        if compile:
            for layer in model.model.layers:
                layer.compile()
            self.head_loss = torch.compile(_head_loss)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens [batch, seq_len + 1]
        hidden = self.model.model(input_ids=tokens[:, :-1], use_cache=False).last_hidden_state  # [b, T, d]
        return self.head_loss(hidden, self.model.lm_head.weight, tokens[:, 1:])


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


def code_version() -> dict:
    """Package version, git commit (if the package sits in a git checkout) and a hash of its sources."""
    from . import __version__

    pkg = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(pkg.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    out = {"package": __version__, "source_sha256": h.hexdigest()[:16], "git_commit": None, "git_dirty": None}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        r = subprocess.run(["git", "-C", str(pkg), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                           check=False)
        if r.returncode == 0:
            out["git_commit"] = r.stdout.strip()
            s = subprocess.run(["git", "-C", str(pkg), "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, timeout=5, check=False)
            out["git_dirty"] = bool(s.stdout.strip()) if s.returncode == 0 else None
    return out


def load_run_config(run_dir: str | os.PathLike) -> tuple[TrainConfig, dict]:
    """A run folder's :class:`TrainConfig` and the whole ``config.json`` (plan, corpus, versions)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run folder (no config.json); "
                                "make one with `sparsing train --config FILE --out DIR`")
    d = json.loads(path.read_text())
    return TrainConfig.from_dict(d["config"]), d


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
    from .checkpoints import list_checkpoints, prune_resume_files, remove_partial, write_checkpoint
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
