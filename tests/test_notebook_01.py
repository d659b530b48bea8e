"""Notebook 01 (the PPL-p% metric) runs end to end on SmolLM2 with CI parameters."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from _notebooks import ROOT, assert_thin_and_stripped, execute, nbval

NOTEBOOK = ROOT / "notebooks" / "01_ppl_p_sparsity.ipynb"
SMOKE = {"smoke": True}


def test_notebook_01_is_thin_and_stripped():
    code = assert_thin_and_stripped(NOTEBOOK)
    assert any("NBVAL_CHECK_OUTPUT" in "".join(c["source"]) for c in code), "a headline cell must be checked"


@pytest.fixture(scope="module")
def executed_01(tmp_path_factory):
    out = tmp_path_factory.mktemp("nb01")
    path = execute(NOTEBOOK, out / "01.ipynb", {**SMOKE, "output_dir": str(out / "results")})
    return path, out / "results"


@pytest.mark.notebook
@pytest.mark.real_model
def test_notebook_01_results(executed_01):
    _, results = executed_01
    report = json.loads((results / "result.json").read_text())
    assert [r["p"] for r in report["results"]] == [1.0, 5.0, 10.0]
    assert report["text"]["n_tokens"] == 512
    for r in report["results"]:
        assert len(r["thresholds"]) == 30 and len(r["layer_activation_ratio"]) == 30
        if r["converged"]:
            assert abs(r["ppl_ratio"] - (1 + r["p"] / 100)) <= 1e-3
        else:
            assert r["message"], "a missed target must say why"
        assert max(abs(c - r["cett"]) for c in r["layer_cett"]) <= 1e-3
    ratios = [r["activation_ratio"] for r in report["results"]]
    assert ratios[0] > ratios[1] > ratios[2] > 0
    pareto = pd.read_csv(results / "pareto.csv")
    assert set(pareto["rule"]) == {"cett", "topk", "topk_global_official", "fat"}
    assert len(pd.read_csv(results / "ppl_p_table.csv")) == 3
    for fig in ("fig1_neuron_contributions", "cett_vs_threshold", "fig3_pareto", "activation_heatmap"):
        assert (results / f"{fig}.png").stat().st_size > 10_000


@pytest.mark.notebook
@pytest.mark.real_model
def test_notebook_01_nbval(executed_01):
    path, _ = executed_01
    run = nbval(path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout
