"""Local path or Hugging Face hub: how a model or text spec string is read, and whether the
hub may be contacted. Shared by :mod:`~sparsing_utils.models` and :mod:`~sparsing_utils.sources`,
so both name a missing file the same way."""
from __future__ import annotations

import os
from collections.abc import Iterable

__all__ = ["HubUnreachableError", "hub_offline", "looks_like_path"]


class HubUnreachableError(OSError, ValueError):
    """The Hugging Face hub cannot be reached (offline mode or no network).

    Subclasses both ``OSError`` (what transformers raises) and ``ValueError`` (what the CLI
    reports as a user error).
    """


def hub_offline() -> bool:
    """True when the environment asks Hugging Face libraries not to touch the network."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return True
    return False


def looks_like_path(spec: str, suffixes: Iterable[str] = ()) -> bool:
    """Whether ``spec`` is meant as a local path (so a missing one is "not found", not a hub
    id or a built-in name): ``.``/``..``, a start with ``/``, ``./``, ``../`` or ``~``, a
    backslash, more than one ``/`` (hub ids are ``name`` or ``org/name``), or a name ending
    in one of ``suffixes`` (the file types the caller reads, e.g. ``.gguf`` or ``.txt``)."""
    if spec in {".", ".."} or spec.startswith(("/", "./", "../", "~")) or "\\" in spec:
        return True
    if spec.count("/") > 1:
        return True
    return spec.lower().endswith(tuple(s.lower() for s in suffixes))
