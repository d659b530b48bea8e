"""Notebook 04 (width-depth ratio), executed once with CI parameters from the shipped results in
data/runs/; its numbers are recomputed here by hand from the result files (json + numpy + the
fitting code), compared with committed reference values (``tests/reference/notebook_04.json``)
and found in the printed headline cells."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from _notebooks import (
    ROOT,
    assert_figures,
    assert_thin_and_stripped,
    check_reference,
    execute_once,
    headline_text,
    numbers_in,
    shipped_run,
)

from sparsing_utils import analysis, fitting

NOTEBOOK = ROOT / "notebooks" / "04_width_depth.ipynb"
PARAMETERS = {"smoke": True, "n_bootstrap": 20}  # output_dir is added per run
SHAPES = ["relu-d64-l40", "relu-d96-l18", "relu-d128-l10", "relu-d160-l6", "relu-d192-l5", "relu-d224-l3", "relu-d288-l2"]
SEEDS = [f"seeds/relu-2m-seed{s}" for s in range(3)]


def test_notebook_04_is_thin_and_stripped():
    assert_thin_and_stripped(NOTEBOOK, headlines=3)  # activation (Fig. 5), loss (Fig. 6), the size effect


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return execute_once(tmp_path_factory, NOTEBOOK, PARAMETERS)


def _pre(run: dict) -> list[dict]:
    return [c for c in run["checkpoints"] if c["stage"] != "decay"]


@pytest.fixture(scope="module")
def shapes():
    return {name: shipped_run(f"width_depth/{name}") for name in SHAPES}


def _loss_at(run: dict, tokens: float) -> float:
    pre = _pre(run)
    return float(np.interp(np.log(tokens), np.log([c["tokens"] for c in pre]), [c["heldout_loss"] for c in pre]))


@pytest.mark.notebook
def test_width_depth_table_matches_the_files(run, shapes):
    _, out = run
    table = pd.read_csv(out / "width_depth.csv", keep_default_na=False)
    assert list(table["run"]) == SHAPES  # ordered by hidden/layers, 1.6 to 144
    for row in table.itertuples():
        r = shapes[row.run]
        pre = _pre(r)
        assert row.width_depth_ratio == pytest.approx(r["config"]["hidden_size"] / r["config"]["num_layers"])
        assert row.A_last_stable == pre[-1]["activation_ratio"]
        D = np.array([c["tokens"] for c in pre]) / 1e9
        A = np.array([c["activation_ratio"] for c in pre])
        again = fitting.fit_law(D, A, "relu", n_bootstrap=0)
        assert row.A0 == pytest.approx(again.params["A0"], rel=1e-9) and row.at_bound == ", ".join(again.at_bound)
        assert row.A0_lo <= row.A0 <= row.A0_hi


@pytest.mark.notebook
def test_loss_at_equal_tokens_and_limit_loss_by_hand(run, shapes):
    _, out = run
    loss = pd.read_csv(out / "width_depth_loss.csv")
    common = min(_pre(r)[-1]["tokens"] for r in shapes.values())
    assert list(loss["run"]) == SHAPES and (loss["tokens"] == common).all()
    for row in loss.itertuples():
        r = shapes[row.run]
        assert row.value == pytest.approx(_loss_at(r, common), rel=1e-12)
        pts = [c for c in _pre(r) if c["tokens"] >= 40 * r["plan"]["non_embedding_params"]]
        again = fitting.fit_law(np.array([c["tokens"] for c in pts]) / 1e9, [c["heldout_loss"] for c in pts], "loss",
                                n_bootstrap=0)
        assert row.L0 == pytest.approx(again.params["L0"], rel=1e-9)


@pytest.mark.notebook
def test_figures_are_saved(run):
    assert_figures(run[1], ("fig5_width_depth_activation", "fig6_width_depth_loss"))


@pytest.mark.notebook
def test_headlines_print_the_computed_numbers(run, shapes):
    executed, _ = run
    act_text, loss_text, size_text = headline_text(executed)
    lines = act_text.strip().splitlines()
    ratio = [shapes[n]["config"]["hidden_size"] / shapes[n]["config"]["num_layers"] for n in SHAPES]
    last = [_pre(shapes[n])[-1]["activation_ratio"] for n in SHAPES]
    assert numbers_in(lines[0]) == pytest.approx([x for pair in zip(ratio, last) for x in pair], abs=6e-2)
    seed_last = [_pre(shipped_run(k))[-1]["activation_ratio"] for k in SEEDS]
    assert numbers_in(lines[1]) == pytest.approx([7, np.std(last, ddof=1), 3, np.std(seed_last, ddof=1)], abs=6e-5)
    fit = analysis.fit_bottleneck(ratio, last)  # Fig. 5 by hand on the last stable ratios
    printed = numbers_in(lines[3])
    assert printed[0] == pytest.approx(fit.slope, rel=1e-2) and printed[-1] == pytest.approx(fit.x_b, abs=0.06)
    common = min(_pre(r)[-1]["tokens"] for r in shapes.values())
    values = [_loss_at(shapes[n], common) for n in SHAPES]
    assert numbers_in(loss_text.splitlines()[0])[2::2] == pytest.approx(values, abs=6e-4)
    best = SHAPES[int(np.argmin(values))]
    assert f"({best}, " in loss_text
    act = [shipped_run(f"activation/relu-{s}") for s in ("2m", "4m")]
    n = [a["plan"]["non_embedding_params"] for a in act]
    per_log_n = (_loss_at(act[0], common) - _loss_at(act[1], common)) / np.log(n[1] / n[0])
    assert float(re.search(r": ([\d.]+) nats less per unit of log N", size_text)[1]) == pytest.approx(per_log_n, abs=6e-4)


def _key_numbers(executed, out) -> dict:
    table = pd.read_csv(out / "width_depth.csv", keep_default_na=False)
    loss = pd.read_csv(out / "width_depth_loss.csv")
    return {
        "headline": [line for text in headline_text(executed) for line in text.strip().splitlines()],
        "activation": {r.run: {"A_last_stable": float(r.A_last_stable), "A0": float(r.A0),
                               "A0_ci": [float(r.A0_lo), float(r.A0_hi)]} for r in table.itertuples()},
        "loss": {r.run: {"at_tokens": float(r.value), "L0": float(r.L0), "L0_ci": [float(r.L0_lo), float(r.L0_hi)]}
                 for r in loss.itertuples()},
    }


@pytest.mark.notebook
def test_key_numbers_match_the_committed_reference(run):
    executed, out = run
    check_reference(
        _key_numbers(executed, out), "notebook_04", parameters=PARAMETERS,
        about="Key numbers of notebooks/04_width_depth.ipynb run by tests/test_notebook_04.py with the parameters "
              "below, from the shipped results in data/runs/. Written with SPARSING_UPDATE_REFERENCE=1; floats are "
              "compared within the tolerance of their key (else default), everything else exactly.",
        tolerance={
            "default": {"rtol": 1e-6, "atol": 1e-9},  # deterministic fits and interpolations
            "A0_ci": {"rtol": 2e-2, "atol": 1e-4},  # ends of 20-resample bootstrap intervals
            "L0_ci": {"rtol": 2e-2, "atol": 1e-3},
        },
    )
