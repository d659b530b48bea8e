"""Results on disk: JSON written atomically, so a crash never leaves a half-written file."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write_json"]


def atomic_write_json(path: str | os.PathLike, payload, *, indent: int = 1) -> Path:
    """Write ``payload`` as JSON to ``path``: a temporary file in the same folder, flushed to disk,
    then ``os.replace``. NaN/inf are refused (``ValueError``) before anything is written; the
    file gets the usual permissions (``mkstemp`` alone would leave it 0600)."""
    path = Path(path)
    text = json.dumps(payload, indent=indent, allow_nan=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "w") as fh:
            fh.write(text + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path
