"""Notebook 02 (activation vs training data) runs end to end with CI parameters."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from _notebooks import assert_thin_and_stripped, execute, nbval

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "02_activation_vs_data.ipynb"
RAW_DIR = ROOT.parent / "shared" / "paper" / "activation-vs-data"


def test_notebook_02_is_thin_and_stripped():
    code = assert_thin_and_stripped(NOTEBOOK)
    assert any("NBVAL_CHECK_OUTPUT" in "".join(c["source"]) for c in code), "a headline cell must be checked"


@pytest.mark.notebook
@pytest.mark.skipif(not RAW_DIR.is_dir(), reason=f"the paper's activation-vs-data points (third-party) are not at {RAW_DIR}")
def test_notebook_02_runs(tmp_path):
    out = tmp_path / "out"
    # cwd = notebooks/ as in CI, so the default data_dir (relative to the notebook) is exercised
    executed = execute(NOTEBOOK, tmp_path / "02.ipynb", {"smoke": True, "output_dir": str(out), "n_bootstrap": 20})
    fits = json.loads((out / "fits.json").read_text())["fits"]
    assert len(fits) == 10
    table = pd.read_csv(out / "table2_comparison.csv")
    assert len(table) == 10
    assert (table["mse"] <= table["mse_published"]).all()
    for name, fit in fits.items():
        lo, hi = fit["A0_ci"]
        assert lo <= fit["A0"] <= hi, name
        assert fit["law"] == ("relu" if name.endswith("relu") else "silu")
    comparison = pd.read_csv(out / "model_comparison.csv")
    assert set(comparison["law"]) == {"power", "log", "sigmoid"} and len(comparison) == 30
    assert len(pd.read_csv(out / "forecast.csv")) == 30
    for fig in ("fig4_activation_vs_data", "fig7_limit_vs_scale", "fig8_derivative_vs_data_ratio", "mse_profiles_A0"):
        assert (out / f"{fig}.png").stat().st_size > 10_000
    # nbval (lax) re-executes the papermill output; data_dir must then be absolute
    rerun = execute(NOTEBOOK, tmp_path / "02-nbval.ipynb",
                    {"smoke": True, "output_dir": str(tmp_path / "out2"), "n_bootstrap": 20, "data_dir": str(RAW_DIR)})
    run = nbval(rerun)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert executed.exists()
