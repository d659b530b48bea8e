"""Run a notebook as CI does: papermill with parameters, then nbval (lax) on the result.

nbval re-executes the papermill output and compares the cells marked ``# NBVAL_CHECK_OUTPUT``
(the headline cells) with what papermill stored, so a headline that changes between two runs,
or any cell that raises, fails the test.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def execute(notebook: Path, out: Path, parameters: dict) -> Path:
    import papermill

    papermill.execute_notebook(str(notebook), str(out), parameters=parameters, cwd=str(notebook.parent),
                               kernel_name="python3", progress_bar=False)
    return out


def nbval(executed: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """``pytest --nbval-lax`` on an executed notebook, in a subprocess; returns the result."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval-lax", "-q", "-p", "no:cacheprovider", str(executed),
         "--rootdir", str(executed.parent)],
        cwd=str(executed.parent), capture_output=True, text=True, timeout=timeout, env=env)
