"""Notebook tests: run a notebook ONCE, as CI does, then check what it produced.

- :func:`execute` runs the notebook with papermill (smoke parameters, ``cwd`` = its folder);
  :func:`execute_once` does it into a fresh temporary folder (a test module's ``run`` fixture);
- :func:`headline_text` returns what the cells tagged ``headline`` printed, to be checked for the
  expected numbers (:func:`numbers_in` reads them);
- :func:`check_reference` compares key numbers with committed reference values
  (``tests/reference/<name>.json``, tolerances stated in the file); run the test with
  ``SPARSING_UPDATE_REFERENCE=1`` to rewrite the file after a deliberate change, then review the diff;
- the other key numbers are recomputed in the test itself with the package functions, or by hand
  from the shipped run results (:func:`shipped_run`); :func:`assert_figures` checks the saved figures.
"""
from __future__ import annotations

import ast
import json
import math
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
UPDATE_ENV = "SPARSING_UPDATE_REFERENCE"


def execute(notebook: Path, out: Path, parameters: dict) -> Path:
    """Run ``notebook`` once with papermill into ``out``. The kernel imports ``sparsing_utils``
    from this checkout (its root is put first on the kernel's ``PYTHONPATH``), not from
    wherever the package happens to be installed."""
    import papermill

    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *([before] if before else [])])
    try:
        papermill.execute_notebook(str(notebook), str(out), parameters=parameters, cwd=str(notebook.parent),
                                   kernel_name="python3", progress_bar=False)
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before
    return out


def execute_once(tmp_path_factory, notebook: Path, parameters: dict) -> tuple[Path, Path]:
    """:func:`execute` ``notebook`` (``NN_name.ipynb``) into a fresh temporary folder ``nbNN``, with
    ``output_dir`` = its ``out`` subfolder added to ``parameters``: returns (executed notebook, out)."""
    key = notebook.name[:2]
    tmp = tmp_path_factory.mktemp(f"nb{key}")
    out = tmp / "out"
    executed = execute(notebook, tmp / f"{key}.ipynb", {**parameters, "output_dir": str(out)})
    return executed, out


def assert_thin_and_stripped(notebook: Path, *, headlines: int | None = None) -> list[dict]:
    """House rules: a tagged ``parameters`` cell first, no function/class/lambda definitions,
    committed without outputs, under 2 MB, citing the paper; with ``headlines``, that many cells
    tagged ``headline``. Returns the code cells."""
    cells = json.loads(notebook.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert "parameters" in code[0].get("metadata", {}).get("tags", [])
    for c in code:
        tree = ast.parse("".join(c["source"]))
        assert not any(isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Lambda)) for n in ast.walk(tree))
        assert not c.get("outputs") and c.get("execution_count") is None, "commit the notebook without outputs"
    assert notebook.stat().st_size < 2_000_000
    assert any("2411.02335" in "".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    if headlines is not None:
        tagged = len(tagged_cells(notebook, "headline"))
        assert tagged == headlines, f"{notebook.name}: {tagged} cells tagged 'headline', expected {headlines}"
    return code


def tagged_cells(notebook: Path, tag: str) -> list[dict]:
    """The code cells of a notebook (executed or not) that carry ``tag`` in their metadata."""
    cells = json.loads(Path(notebook).read_text())["cells"]
    return [c for c in cells if c["cell_type"] == "code" and tag in c.get("metadata", {}).get("tags", [])]


def headline_text(executed: Path, tag: str = "headline") -> list[str]:
    """What each cell tagged ``tag`` printed (stdout, or its plain-text result), one string per
    cell in notebook order. Fails if there is no such cell, or one raised or printed nothing."""
    cells = tagged_cells(executed, tag)
    assert cells, f"{executed.name} has no cell tagged {tag!r}"
    texts = []
    for c in cells:
        outputs = c.get("outputs", [])
        assert not any(o.get("output_type") == "error" for o in outputs), "".join(c["source"])
        text = "".join(
            "".join(o.get("text", "")) if o.get("output_type") == "stream" and o.get("name") == "stdout"
            else "".join(o.get("data", {}).get("text/plain", ""))
            for o in outputs
        )
        assert text.strip(), f"the {tag} cell printed nothing:\n{''.join(c['source'])}"
        texts.append(text)
    return texts


_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?%?")


def numbers_in(text: str) -> list[float]:
    """The numbers in a printed line, in order; ``12.5%`` is read as 0.125."""
    return [float(m[:-1]) / 100 if m.endswith("%") else float(m) for m in _NUMBER.findall(text)]


def _compare(actual, expected, tolerance: dict, path: str, errors: list[str]) -> None:
    tol = tolerance.get(path.rsplit("/", 1)[-1], tolerance["default"])
    if isinstance(expected, dict):
        if not isinstance(actual, dict) or set(actual) != set(expected):
            errors.append(f"{path}: {actual!r} does not have the keys {sorted(expected)}")
            return
        for k in expected:
            _compare(actual[k], expected[k], tolerance, f"{path}/{k}", errors)
    elif isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            errors.append(f"{path}: {actual!r} != {expected!r}")
            return
        for i, (a, e) in enumerate(zip(actual, expected)):  # list items share the list's tolerance
            _compare(a, e, {**tolerance, "default": tol}, f"{path}[{i}]", errors)
    elif isinstance(expected, float):
        number = isinstance(actual, (int, float)) and not isinstance(actual, bool)
        if not (number and math.isclose(actual, expected, rel_tol=tol["rtol"], abs_tol=tol["atol"])):
            errors.append(f"{path}: {actual!r} != {expected!r} (rtol {tol['rtol']:g}, atol {tol['atol']:g})")
    elif actual != expected or type(actual) is not type(expected):  # ints, bools, strings, null: exactly
        errors.append(f"{path}: {actual!r} != {expected!r}")


def check_reference(actual: dict, name: str, *, about: str, parameters: dict, tolerance: dict) -> None:
    """Compare ``actual`` (nested dicts/lists of numbers and strings) with
    ``tests/reference/<name>.json``: floats within the file's tolerances (per leaf key, else
    ``"default"``: ``{"rtol": ..., "atol": ...}``), everything else exactly.

    With ``SPARSING_UPDATE_REFERENCE=1`` the file is (re)written from ``actual`` with ``about``,
    ``parameters`` and ``tolerance``, and the test is skipped: review the diff and commit it.
    """
    path = REFERENCE_DIR / f"{name}.json"
    if os.environ.get(UPDATE_ENV) == "1":
        from sparsing_utils.jsonio import atomic_write_json

        atomic_write_json(path, {"about": about, "parameters": parameters, "tolerance": tolerance,
                                 "values": actual})
        pytest.skip(f"{UPDATE_ENV}=1: wrote {path.relative_to(ROOT)}; review the diff and commit it")
    assert path.is_file(), f"no reference {path}; create it with {UPDATE_ENV}=1"
    ref = json.loads(path.read_text())
    assert ref["parameters"] == parameters, (
        f"{path.name} was made with parameters {ref['parameters']}, the test runs {parameters}; "
        f"rewrite it with {UPDATE_ENV}=1")
    errors: list[str] = []
    _compare(json.loads(json.dumps(actual)), ref["values"], ref["tolerance"], name, errors)
    assert not errors, f"{len(errors)} values differ from {path.name}:\n" + "\n".join(errors[:40])


RUNS_DIR = ROOT / "data" / "runs"


def shipped_run(key: str) -> dict:
    """A shipped training-lab result (``data/runs/<sweep>/<run>.json``) read with ``json`` alone,
    an alias followed by hand: for checks that do not go through ``sparsing_utils.runs``."""
    obj = json.loads((RUNS_DIR / f"{key}.json").read_text())
    if obj.get("format") == "sparsing-run-alias/1":
        obj = json.loads((RUNS_DIR / obj["same_as"]).read_text())
    return obj


def assert_figures(out: Path, names) -> None:
    """Every ``<out>/<name>.png`` exists, is a real figure (at least 300 x 400 pixels) and not blank."""
    import matplotlib.image

    for name in names:
        img = matplotlib.image.imread(out / f"{name}.png")
        assert img.shape[0] > 300 and img.shape[1] > 400, (name, img.shape)
        assert img[..., :3].std() > 0.05, f"{name}.png is blank"
