"""Results on disk: files (JSON, or any bytes) written atomically, so a crash never leaves a
half-written file, and a check that an output path can be written, made before any expensive work."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_json", "check_writable"]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path``: a temporary file in the same folder (created with its parents),
    flushed to disk, then ``os.replace``, so readers see the old file or the new one, never a part.
    The file gets the usual permissions (``mkstemp`` alone would leave it 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, payload, *, indent: int = 1) -> Path:
    """Write ``payload`` as JSON to ``path`` atomically (:func:`atomic_write_bytes`). NaN/inf are
    refused (``ValueError``) before anything is written."""
    text = json.dumps(payload, indent=indent, allow_nan=False)
    return atomic_write_bytes(path, (text + "\n").encode())


def check_writable(path: str | os.PathLike) -> Path:
    """Make sure ``path`` can be written later, or raise ``ValueError`` saying why.

    Call it before expensive work whose result goes to ``path``. Missing folders are created
    and a temporary file is created and removed in the target folder (so a read-only or
    virtual folder such as ``/proc`` is found out); the folders the check created are removed
    again, so it leaves nothing behind. Returns the path.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"the output {str(path)!r} is a folder: give a file name, e.g. {str(path / 'result.json')!r}")
    folder = path.parent
    missing = []
    existing = folder
    while not existing.exists():
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"cannot write the output {str(path)!r}: {str(existing)!r} is a file, not a folder")
    created: list[Path] = []
    try:
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".check", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        where = f"the folder {str(folder)!r} cannot be created" if len(created) < len(missing) else \
            f"the folder {str(folder)!r} does not accept new files"
        raise ValueError(f"cannot write the output {str(path)!r}: {where} ({err.strerror or err}); "
                         "choose an output path in a writable folder") from err
    finally:
        for d in reversed(created):
            with contextlib.suppress(OSError):
                d.rmdir()
    return path
