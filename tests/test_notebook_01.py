"""Notebook 01 (the PPL-p% metric on SmolLM2), executed once with CI parameters; its key numbers
are checked against the package (recomputed here on the same tokens by direct passes), against
committed reference values (``tests/reference/notebook_01.json``) and in the printed headline cell."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from _notebooks import (
    ROOT,
    assert_thin_and_stripped,
    check_reference,
    execute_once,
    headline_text,
    numbers_in,
)

from sparsing_utils.blocks import make_blocks
from sparsing_utils.pareto import fat_eps_for
from sparsing_utils.probe import SparsityProbe
from sparsing_utils.results import SparsityReport
from sparsing_utils.rules import CETTRule, FATRule, TopKRule

NOTEBOOK = ROOT / "notebooks" / "01_ppl_p_sparsity.ipynb"
PARAMETERS = {"smoke": True}  # output_dir is added per run
SMOKE = {"tokens": 512, "block_len": 256, "sweep_points": 3}  # what smoke=True sets in the notebook
FIGURES = ("fig1_neuron_contributions", "cett_vs_threshold", "fig3_pareto", "activation_heatmap", "layer_profile")
D_FF = 1536  # SmolLM2-135M
# Tolerances of the recomputation (same tokens, same thresholds, same batches: only the order of
# float32 sums may differ): relative 1e-4 on a PPL, 2e-5 on an activation ratio or a CETT (a
# neuron exactly at a threshold may flip: 1 of 1,536 x 512 per layer is 1.3e-6).
RTOL_PPL, ATOL_RATIO = 1e-4, 2e-5

pytestmark = [pytest.mark.notebook, pytest.mark.real_model]


def test_notebook_01_is_thin_and_stripped():
    assert_thin_and_stripped(NOTEBOOK, headlines=1)  # one headline cell: the PPL-p% numbers


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The notebook executed once (cwd = notebooks/), and its output folder."""
    return execute_once(tmp_path_factory, NOTEBOOK, PARAMETERS)


@pytest.fixture(scope="module")
def report(run) -> SparsityReport:
    return SparsityReport.load(run[1] / "result.json")


@pytest.fixture(scope="module")
def probe(smollm2, report):
    """A probe on the notebook's tokens, made here (the notebook's smoke budget)."""
    blocks = make_blocks(smollm2.tokenizer, "pydoc", tokens=SMOKE["tokens"], block_len=SMOKE["block_len"], seed=0)
    assert report.text == {"source": "pydoc", **blocks.to_dict()}, "the notebook measured other tokens"
    return SparsityProbe(smollm2.model, blocks, name="recomputed").prepare()


# ---------------------------------------------------------------------------
# against the package: the same numbers, recomputed here
# ---------------------------------------------------------------------------
def test_report_describes_the_4bit_model(report):
    assert report.model["spec"] == "smollm2" and report.model["source"] == "embedded-gguf"
    assert report.model["weights"] == "Q4_1 GGUF dequantized to float32"
    assert report.model["n_layers"] == 30 and report.model["d_ff"] == D_FF
    assert report.text["n_tokens"] == SMOKE["tokens"] and report.extra["dense_passes"] == 1


def test_thresholds_reproduce_the_results(report, probe):
    """Each result's thresholds, applied by a direct sparse pass on the same tokens, give its
    activation ratios and PPL; its per-layer CETT is the exact CETT at those thresholds."""
    assert report.ppl_dense == pytest.approx(probe.dense.ppl, rel=RTOL_PPL)
    assert [r.p for r in report.results] == [1.0, 5.0, 10.0]
    for r in report.results:
        s = probe.sparse_pass(CETTRule(r.thresholds))
        assert s.activation_ratio == pytest.approx(r.activation_ratio, abs=ATOL_RATIO), r.p
        assert s.layer_active.tolist() == pytest.approx(r.layer_activation_ratio, abs=ATOL_RATIO)
        assert s.token_active.tolist() == pytest.approx(r.token_activation_ratio, abs=1e-3)  # stored as float16
        assert s.ppl == pytest.approx(r.ppl_sparse, rel=RTOL_PPL)
        assert r.ppl_ratio == pytest.approx(r.ppl_sparse / r.ppl_dense, rel=1e-12)
        cett = probe.layer_cett(torch.tensor(r.thresholds))
        assert cett.tolist() == pytest.approx(r.layer_cett, abs=ATOL_RATIO)
        assert max(abs(c - r.cett) for c in r.layer_cett) <= 1e-4  # exact thresholds: every layer at c
        if r.converged:
            assert abs(r.ppl_ratio - (1 + r.p / 100)) <= 1e-3
        else:
            assert r.message, "a missed target must say why"
    ratios = [r.activation_ratio for r in report.results]
    assert ratios[0] > ratios[1] > ratios[2] > 0


def test_pareto_rows_are_the_search_points_and_placed_sweeps(run, report, probe):
    """The CETT rows are the search's own points; the baselines span the same activation ratios
    (Top-k: k / d_ff; FAT: eps from the gate scores), and one point of each is recomputed."""
    _, out = run
    pareto = pd.read_csv(out / "pareto.csv")
    assert list(pareto["rule"].unique()) == ["cett", "topk", "topk_global_official", "fat"]  # SiLU: no ReLU row
    cett = pareto[pareto["rule"] == "cett"]
    points = sorted(report.search_points, key=lambda pt: pt["c"])
    assert len(cett) == len(points) == report.extra["sparse_passes"]
    for row, pt in zip(cett.itertuples(), points):
        assert (row.value, row.activation_ratio, row.ppl, row.ppl_ratio) == pytest.approx(
            (pt["c"], pt["activation_ratio"], pt["ppl_sparse"], pt["ppl_ratio"]), rel=1e-12)
    for r in report.results:  # the PPL-p% points are among them
        assert r.cett in set(cett["value"])
    span = np.linspace(cett["activation_ratio"].min(), cett["activation_ratio"].max(), SMOKE["sweep_points"])
    rows = {rule: pareto[pareto["rule"] == rule] for rule in ("topk", "topk_global_official", "fat")}
    for rule in ("topk", "topk_global_official"):
        assert list(rows[rule]["value"]) == pytest.approx(list(span), rel=1e-12)
    # per token: k = round(v * d_ff) of every token; global: round(v * d_ff * tokens) over the one batch
    assert list(rows["topk"]["activation_ratio"]) == pytest.approx([round(v * D_FF) / D_FF for v in span], abs=1e-6)
    assert list(rows["topk_global_official"]["activation_ratio"]) == pytest.approx(list(span), abs=1e-6)
    assert list(rows["fat"]["value"]) == pytest.approx(fat_eps_for(probe, span), rel=1e-6)
    assert list(rows["fat"]["activation_ratio"]) == pytest.approx(list(span), abs=0.05)  # placed near the span
    for rule, make in (("topk", lambda v: TopKRule(v)), ("topk_global_official", lambda v: TopKRule(v, scope="global")),
                       ("fat", lambda v: FATRule(v))):
        row = rows[rule].iloc[1]
        s = probe.sparse_pass(make(float(row["value"])), per_token=False)
        assert s.activation_ratio == pytest.approx(row["activation_ratio"], abs=ATOL_RATIO), rule
        assert s.ppl / probe.dense.ppl == pytest.approx(row["ppl_ratio"], rel=RTOL_PPL), rule
    # Fig. 3's finding on these tokens: at every Top-k point, the CETT curve costs less PPL
    c = cett.sort_values("activation_ratio")
    for row in rows["topk"].itertuples():
        assert np.interp(row.activation_ratio, c["activation_ratio"], c["ppl_ratio"]) < row.ppl_ratio


def test_tables_and_figures_are_complete(run, report):
    _, out = run
    table = pd.read_csv(out / "ppl_p_table.csv")
    assert list(table["p"]) == [1.0, 5.0, 10.0] and set(table["tokens"]) == {SMOKE["tokens"]}
    assert list(table["activation_ratio"]) == [r.activation_ratio for r in report.results]
    assert list(table["sparsity_ratio"]) == pytest.approx([1 - r.activation_ratio for r in report.results])
    import matplotlib.image

    for name in FIGURES:
        img = matplotlib.image.imread(out / f"{name}.png")
        assert img.shape[0] > 300 and img.shape[1] > 500, (name, img.shape)
        assert img[..., :3].std() > 0.05, f"{name}.png is blank"


# ---------------------------------------------------------------------------
# what the notebook prints
# ---------------------------------------------------------------------------
def test_headline_prints_the_computed_numbers(run, report):
    executed, _ = run
    (text,) = headline_text(executed)
    lines = text.strip().splitlines()
    assert lines[0].startswith(f"{SMOKE['tokens']} tokens of pydoc; weights: Q4_1 GGUF dequantized to float32;")
    assert numbers_in(lines[0])[-1] == pytest.approx(report.ppl_dense, abs=5e-5)
    for line, r in zip(lines[1:4], report.results):
        assert line.startswith(f"PPL-{r.p:g}%:")
        assert numbers_in(line)[1:] == pytest.approx([r.cett, r.activation_ratio, r.ppl_ratio], abs=5e-5)
    reached = all(abs(r.ppl_ratio - (1 + r.p / 100)) <= 1e-3 for r in report.results)
    assert lines[4] == f"targets reached within 0.1 point: {reached}"
    assert lines[5] == "every layer's CETT within 1e-3 of c: True"
    assert lines[6] == "sparser at larger p: True"
    n = len(report.search_points)
    assert lines[7] == f"sparse passes: {report.extra['sparse_passes']} ({n} CETT targets evaluated)"


# ---------------------------------------------------------------------------
# against committed reference values (catches a regression that repeats every run)
# ---------------------------------------------------------------------------
SHOWN_LAYERS = (0, 15, 29)


def _key_numbers(run, report) -> dict:
    pareto = pd.read_csv(run[1] / "pareto.csv")
    return {
        "ppl_dense": report.ppl_dense,
        "results": {
            f"PPL-{r.p:g}%": {"cett": r.cett, "activation_ratio": r.activation_ratio, "ppl_ratio": r.ppl_ratio,
                              "converged": r.converged,
                              "layer_activation_ratio": [r.layer_activation_ratio[i] for i in SHOWN_LAYERS],
                              "thresholds": [r.thresholds[i] for i in SHOWN_LAYERS]}
            for r in report.results
        },
        "baselines": {
            rule: {col: [float(v) for v in g[col]] for col in ("value", "activation_ratio", "ppl_ratio")}
            for rule, g in pareto[pareto["rule"] != "cett"].groupby("rule", sort=False)
        },
    }


def test_key_numbers_match_the_committed_reference(run, report):
    check_reference(
        _key_numbers(run, report), "notebook_01", parameters=PARAMETERS,
        about="Key numbers of notebooks/01_ppl_p_sparsity.ipynb (SmolLM2-135M-Instruct, 4-bit Q4_1 GGUF dequantized "
              "to float32, CPU; 512 tokens of pydoc from Python 3.11.7) run by tests/test_notebook_01.py with the "
              "parameters below. Written with SPARSING_UPDATE_REFERENCE=1; floats are compared within the "
              "tolerance of their key (else default), everything else exactly.",
        tolerance={
            "default": {"rtol": 1e-4, "atol": 2e-5},  # dense PPL: only the order of float32 sums moves it
            # searched quantities: exact up to the search's tolerances (1e-4 on each layer's CETT, 1e-3 on
            # the PPL ratio), which another summation order may land elsewhere in (tests/test_smollm2_pinned.py)
            "cett": {"rtol": 1e-2, "atol": 1e-4},
            "thresholds": {"rtol": 1e-2, "atol": 1e-6},
            "activation_ratio": {"rtol": 0.0, "atol": 2e-3},
            "layer_activation_ratio": {"rtol": 0.0, "atol": 3e-3},
            # baselines are placed across the searched points' span, so they inherit its tolerance
            "value": {"rtol": 1e-2, "atol": 1e-6},
            "ppl_ratio": {"rtol": 0.0, "atol": 3e-3},
        },
    )


def test_the_reference_check_catches_a_changed_number():
    """The tolerances above are not hollow: the committed values pass; an activation ratio moved
    by 0.005, a dense PPL moved by 0.1% or a flipped convergence fails; a threshold moved by 0.5%
    (inside the search's tolerance) passes."""
    from _notebooks import REFERENCE_DIR, _compare

    ref = json.loads((REFERENCE_DIR / "notebook_01.json").read_text())
    values, tolerance = ref["values"], ref["tolerance"]
    errors = []
    _compare(json.loads(json.dumps(values)), values, tolerance, "nb", errors)
    assert errors == []
    changed = json.loads(json.dumps(values))
    changed["ppl_dense"] *= 1.001
    changed["results"]["PPL-1%"]["activation_ratio"] += 0.005
    changed["results"]["PPL-1%"]["thresholds"][0] *= 1.005
    changed["results"]["PPL-5%"]["converged"] = not changed["results"]["PPL-5%"]["converged"]
    changed["baselines"]["fat"]["ppl_ratio"][0] += 0.01
    _compare(changed, values, tolerance, "nb", errors)
    assert [e.split(":")[0] for e in errors] == [
        "nb/ppl_dense", "nb/results/PPL-1%/activation_ratio", "nb/results/PPL-5%/converged",
        "nb/baselines/fat/ppl_ratio[0]"]
