"""What a small training run is, for the scaling studies (Luo et al. 2024, Sec. 4; PAPER.md Sec. 2-3).

One config dataclass, :class:`TrainConfig`, saved with every run and checked before any work.
The model is a Llama-style decoder built by transformers (``LlamaForCausalLM``, SDPA attention,
gated FFN with ``hidden_act`` relu or silu, any width, depth and ``d_ff``), or, with
``num_experts >= 2``, a Mixture-of-Experts decoder of the same shape whose FFN is ``num_experts``
gated experts of width ``d_ff``, each token routed to ``experts_top_k`` of them (:data:`MOE_STYLES`:
Mixtral or Qwen3-MoE; the paper's Fig. 2 compares such models with the dense one). :func:`make_plan`
derives what a config means on a corpus and a number of processes (:class:`RunPlan`): sizes,
steps, the warmup-stable-decay schedule and the checkpoint positions, log-spaced in tokens. How
a run is trained (the loop, DDP, compile, logs, exact resume) is :mod:`sparsing_utils.trainer`.

Accounting (stated once, used everywhere):

* **non-embedding parameters** ``N``: every parameter except the token embedding and the LM head
  (attention and FFN matrices, and the RMSNorm weights):
  ``N = L (2 d^2 + 2 d n_kv h + 3 d d_ff + 2 d) + d`` (``h`` head dim, ``n_kv`` key/value heads).
  MoE: ``3 d d_ff`` becomes ``E (3 d d_ff) + d E`` (all experts and the router; Qwen3-MoE adds
  its query/key norms, ``2 h`` per layer).
* **FLOPs per token** (training, forward + backward; the PaLM paper's appendix B):
  ``6 N_matmul + 12 L d T``, with ``N_matmul`` the weights of every matrix product: attention
  and FFN matrices *and the LM head* (``d V``), not the norms or the embedding lookup; ``12 L d T``
  is the attention scores and values (``T`` the sequence length, causal masking not discounted).
  MoE: only the ``k`` experts a token is routed to, plus the router (``k 3 d d_ff + d E``).
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "ACTIVATIONS",
    "DECAY_SHAPES",
    "H200_BF16_DENSE_FLOPS",
    "MOE_STYLES",
    "RunPlan",
    "TrainConfig",
    "build_model",
    "checkpoint_steps",
    "code_version",
    "flops_per_token",
    "load_run_config",
    "make_plan",
    "non_embedding_params",
]

H200_BF16_DENSE_FLOPS = 989.4e12  # NVIDIA H200 SXM datasheet: bf16 tensor 1,979 TFLOPS with sparsity -> dense half

ACTIVATIONS = {"relu": "relu", "silu": "silu"}  # config name -> transformers `hidden_act` (gated FFN)

DECAY_SHAPES: dict[str, Callable[[float], float]] = {  # progress x in (0, 1] -> factor from 1 down to 0
    "linear": lambda x: 1.0 - x,
    "cosine": lambda x: 0.5 * (1.0 + math.cos(math.pi * x)),
    "1-sqrt": lambda x: 1.0 - math.sqrt(x),
}

# MoE style -> (transformers config class, model class, config names of (experts, top-k, expert width)).
# Mixtral: softmax over the experts, top-k weights renormalised; Qwen3-MoE: the same routing
# (norm_topk_prob) with query/key RMSNorm in attention.
MOE_STYLES: dict[str, tuple[str, str, tuple[str, str, str], dict]] = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", ("num_local_experts", "num_experts_per_tok", "intermediate_size"),
                {}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", ("num_experts", "num_experts_per_tok", "moe_intermediate_size"),
                  {"norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []}),
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
    num_experts: int = 0                # 0: dense FFN; >= 2: MoE of that many experts of width d_ff
    experts_top_k: int = 0              # experts per token (MoE: 1..num_experts; dense: 0)
    moe_style: str = "mixtral"          # MoE only: mixtral | qwen3_moe (MOE_STYLES)
    router_aux_loss_coef: float = 0.01  # MoE only: x the load-balancing loss (Switch Transformer), 0: off
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
    def is_moe(self) -> bool:
        """An MoE model (``num_experts >= 2``). Dense: ``0/0``, or ``1/1`` as configs before issue 10 wrote it."""
        return self.num_experts >= 2

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
        """Raise ``ValueError`` listing every problem."""
        for name in ("num_experts", "experts_top_k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
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
        if self.is_moe:
            need(1 <= self.experts_top_k <= self.num_experts, f"experts_top_k must be in 1..num_experts="
                 f"{self.num_experts} for an MoE model, got {self.experts_top_k}")
            need(self.moe_style in MOE_STYLES, f"unknown moe_style {self.moe_style!r}: use one of {sorted(MOE_STYLES)}")
            need(self.router_aux_loss_coef >= 0, f"router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")
        else:
            need(self.experts_top_k == self.num_experts, f"num_experts={self.num_experts} is a dense model: experts_top_k "
                 f"must be {self.num_experts}, got {self.experts_top_k} (an MoE model needs num_experts >= 2)")
        need(self.domain_weights is None or isinstance(self.domain_weights, Mapping),
             "domain_weights must be an object {domain: weight} or null")
        if errors:
            raise ValueError("invalid training config:\n  - " + "\n  - ".join(errors))


def non_embedding_params(cfg: TrainConfig) -> int:
    """Parameters other than the token embedding and the LM head (module docstring)."""
    d, L = cfg.hidden_size, cfg.num_layers
    kv = cfg.kv_heads * cfg.head_dim
    if cfg.is_moe:
        qk_norms = 2 * cfg.head_dim if cfg.moe_style == "qwen3_moe" else 0
        return L * (2 * d * d + 2 * d * kv + cfg.num_experts * (3 * d * cfg.ffn_dim + d) + 2 * d + qk_norms) + d
    return L * (2 * d * d + 2 * d * kv + 3 * d * cfg.ffn_dim + 2 * d) + d


def matmul_params(cfg: TrainConfig, vocab_size: int) -> int:
    """Weights that enter a matrix product per token: attention, FFN and the LM head (no norms)."""
    d, L = cfg.hidden_size, cfg.num_layers
    kv = cfg.kv_heads * cfg.head_dim
    ffn = cfg.experts_top_k * 3 * d * cfg.ffn_dim + d * cfg.num_experts if cfg.is_moe else 3 * d * cfg.ffn_dim
    return L * (2 * d * d + 2 * d * kv + ffn) + d * vocab_size


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
    """A freshly initialised ``LlamaForCausalLM``, or for an MoE config the :data:`MOE_STYLES` model
    (seeded by ``cfg.seed``; float32; SDPA). MoE experts run transformers' grouped_mm kernel on CUDA
    and its eager loop on the CPU (whose grouped_mm needs 16-byte aligned widths)."""
    import transformers

    common = {
        "vocab_size": plan.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": plan.d_ff,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": plan.kv_heads, "hidden_act": ACTIVATIONS[cfg.activation],
        "max_position_embeddings": cfg.seq_len, "initializer_range": cfg.init_std, "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "use_cache": False, "bos_token_id": None, "eos_token_id": eos_id,
        "pad_token_id": None, "attn_implementation": "sdpa",
    }
    if cfg.is_moe:
        config_cls, model_cls, (n_name, k_name, width_name), extra = MOE_STYLES[cfg.moe_style]
        hf = getattr(transformers, config_cls)(**{
            **common, **extra, n_name: cfg.num_experts, k_name: cfg.experts_top_k, width_name: plan.d_ff,
            "head_dim": plan.head_dim, "router_aux_loss_coef": cfg.router_aux_loss_coef})
        hf._experts_implementation = "grouped_mm" if torch.cuda.is_available() else "eager"
        torch.manual_seed(cfg.seed)
        return getattr(transformers, model_cls)(hf)
    torch.manual_seed(cfg.seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))


# ---------------------------------------------------------------------------------------------
# A run folder's saved config, and the code that made it
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
