"""A training run's checkpoints on disk: atomic writes, listing, checks and loading.

Layout (``runs/NAME/checkpoints/tokens-000000123456/``): ``model.safetensors`` (HF
``LlamaForCausalLM`` weights; a tied LM head is stored once, as the embedding),
``config.json`` (the HF ``LlamaConfig``, so ``LlamaForCausalLM.from_pretrained(dir)`` works),
``state.json`` (step, tokens, lr, stage, losses) and, for resuming, ``optimizer.pt`` and
``trainer_state.pt`` (RNG states, data position). A checkpoint is written under a temporary
name and renamed when complete, so a listed checkpoint is whole; older optimizer files are
pruned (never the weights).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "RESUME_FILES",
    "Checkpoint",
    "check_checkpoint",
    "checkpoint_name",
    "list_checkpoints",
    "load_checkpoint_model",
    "load_weights",
    "prune_resume_files",
    "write_checkpoint",
]

_NAME = re.compile(r"tokens-(\d{12})")
RESUME_FILES = ("optimizer.pt", "trainer_state.pt")
_TMP_PREFIX = ".tmp-"


def checkpoint_name(tokens: int) -> str:
    return f"tokens-{int(tokens):012d}"


@dataclass
class Checkpoint:
    path: Path
    tokens: int
    state: dict

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def stage(self) -> str:
        return str(self.state.get("stage", ""))

    @property
    def resumable(self) -> bool:
        return all((self.path / f).is_file() for f in RESUME_FILES)


def _check_safetensors(path: Path) -> None:
    """Raise ``ValueError`` unless ``path`` is a whole safetensors file (header parses and the
    data it describes ends exactly at the end of the file); reads only the header."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        n = struct.unpack("<Q", head)[0]
        if n > size - 8:
            raise ValueError(f"header of {n} bytes in a file of {size} bytes")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"unreadable header ({err})") from None
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise ValueError(f"the header describes {8 + n + end} bytes but the file holds {size} (truncated?)")


def check_checkpoint(path: Path) -> Checkpoint:
    """A checkpoint folder, checked without loading tensors: ``state.json``, ``config.json`` and a
    whole ``model.safetensors``. Raises ``ValueError`` naming the folder and the fix."""
    m = _NAME.fullmatch(path.name)
    if not m:
        raise ValueError(f"{path} is not a checkpoint folder name (tokens-<12 digits>)")
    for f in ("state.json", "config.json", "model.safetensors"):
        if not (path / f).is_file():
            raise ValueError(f"checkpoint {path} is corrupt: {f} is missing; delete the folder (training "
                             "--resume then continues from the checkpoint before it)")
    try:
        _check_safetensors(path / "model.safetensors")
        state = json.loads((path / "state.json").read_text())
    except (ValueError, OSError) as err:
        raise ValueError(f"checkpoint {path} is corrupt: model.safetensors or state.json cannot be read ({err}); "
                         "delete the folder (training --resume then continues from the checkpoint before it)") from None
    return Checkpoint(path=path, tokens=int(m.group(1)), state=state)


def list_checkpoints(run_dir: str | os.PathLike, *, check: bool = True) -> list[Checkpoint]:
    """Complete checkpoints of a run, by tokens (temporary folders of an interrupted write are skipped)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    out = []
    for p in sorted(folder.iterdir()):
        if p.is_dir() and _NAME.fullmatch(p.name):
            if check:
                out.append(check_checkpoint(p))
            else:
                out.append(Checkpoint(path=p, tokens=int(p.name[7:]), state=json.loads((p / "state.json").read_text())))
    return sorted(out, key=lambda c: c.tokens)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict to store: contiguous CPU tensors, a tied LM head left out (it is the embedding)."""
    sd = model.state_dict()
    tied = getattr(model.config, "tie_word_embeddings", False)
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items() if not (tied and k == "lm_head.weight")}


def write_checkpoint(run_dir: str | os.PathLike, model, state: dict, *, optimizer: dict | None = None,
                     trainer_state: dict | None = None) -> Path:
    """Write a checkpoint atomically: everything into ``checkpoints/.tmp-<name>``, fsync, rename."""
    from safetensors.torch import save_file

    folder = Path(run_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(state["tokens"])
    final = folder / name
    if final.exists():
        raise FileExistsError(f"checkpoint {final} already exists; refusing to overwrite it")
    tmp = folder / f"{_TMP_PREFIX}{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(_weights(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")
        if optimizer is not None:
            torch.save(optimizer, tmp / "optimizer.pt")
        if trainer_state is not None:
            torch.save(trainer_state, tmp / "trainer_state.pt")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def remove_partial(run_dir: str | os.PathLike) -> None:
    """Delete temporary folders left by a write that was interrupted."""
    folder = Path(run_dir) / "checkpoints"
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(_TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


def prune_resume_files(run_dir: str | os.PathLike, keep: int = 1) -> None:
    """Delete optimizer and trainer states of all but the newest ``keep`` checkpoints (weights stay)."""
    for ck in list_checkpoints(run_dir, check=False)[:-max(1, keep)]:
        for f in RESUME_FILES:
            with contextlib.suppress(FileNotFoundError):
                (ck.path / f).unlink()


def load_weights(model: torch.nn.Module, ckpt: Checkpoint) -> None:
    """Load a checkpoint's weights into ``model`` (strict, except the tied LM head)."""
    from safetensors.torch import load_file

    sd = load_file(str(ckpt.path / "model.safetensors"), device="cpu")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"checkpoint {ckpt.path} does not fit the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]} (was it written by another configuration?)")


def load_checkpoint_model(ckpt: Checkpoint, *, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32):
    """The checkpoint as a ``LlamaForCausalLM`` in eval mode (SDPA attention)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ckpt.path)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    load_weights(model, ckpt)
    return model.to(device=device, dtype=dtype).eval()
