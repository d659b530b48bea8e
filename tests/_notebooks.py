"""Run a notebook as CI does: papermill with parameters, then nbval (lax) on the result.

nbval re-executes the papermill output and compares the cells marked ``# NBVAL_CHECK_OUTPUT``
(the headline cells) with what papermill stored, so a headline that changes between two runs,
or any cell that raises, fails the test.
"""
from __future__ import annotations

import ast
import json
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


def assert_thin_and_stripped(notebook: Path) -> list[dict]:
    """House rules: a tagged ``parameters`` cell first, no function/class/lambda definitions,
    committed without outputs, under 2 MB, citing the paper. Returns the code cells."""
    cells = json.loads(notebook.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert "parameters" in code[0].get("metadata", {}).get("tags", [])
    for c in code:
        tree = ast.parse("".join(c["source"]))
        assert not any(isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Lambda)) for n in ast.walk(tree))
        assert not c.get("outputs") and c.get("execution_count") is None, "commit the notebook without outputs"
    assert notebook.stat().st_size < 2_000_000
    assert any("2411.02335" in "".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    return code
