"""Notebook 03 (our training runs), executed once with CI parameters from the shipped results in
data/runs/; its numbers are recomputed here by hand from the result files (json + numpy + the
fitting code), compared with committed reference values (``tests/reference/notebook_03.json``)
and found in the printed headline cells."""
from __future__ import annotations

import json
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

from sparsing_utils import fitting

NOTEBOOK = ROOT / "notebooks" / "03_training_runs.ipynb"
PARAMETERS = {"smoke": True, "n_bootstrap": 20}  # output_dir is added per run
FIGURES = ("fig11_loss_curves", "fig4_activation_vs_data_ours", "seed_band", "seed_band_silu", "pareto_final_checkpoints",
           "fig2_moe_pareto", "repetition")
MOE = ["moe/relu-2m-rerun", "moe/relu-2m-moe8", "moe/relu-2m-moe16"]
ACTIVATION = [f"activation/{a}-{s}" for a in ("relu", "silu") for s in ("1m", "2m", "4m")]
SEEDS = [f"seeds/relu-2m-seed{s}" for s in range(3)]
VARIANTS = {"all pre-decay checkpoints": {}, "D/N >= 10": {"min_dn": 10}, "ReLU: falling part only": {"falling": True}}


def test_notebook_03_is_thin_and_stripped():
    assert_thin_and_stripped(NOTEBOOK, headlines=7)  # loss, activation, seeds, SiLU seeds and the rerun, Pareto, MoE,
    # repetition


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The notebook executed once (cwd = notebooks/, so the default runs_dir is exercised)."""
    return execute_once(tmp_path_factory, NOTEBOOK, PARAMETERS)


def _series(run: dict, min_dn: float = 0, falling: bool = False):
    """Pre-decay checkpoints with D/N >= min_dn (through the lowest ratio if falling), by hand."""
    n = run["plan"]["non_embedding_params"]
    pts = [c for c in run["checkpoints"] if c["stage"] != "decay" and c["tokens"] >= min_dn * n]
    D = np.array([c["tokens"] for c in pts]) / 1e9
    A = np.array([c["activation_ratio"] for c in pts])
    k = int(np.argmin(A)) + 1 if falling else len(A)
    return D[:k], A[:k]


def _last_stable(run: dict) -> dict:
    return [c for c in run["checkpoints"] if c["stage"] != "decay"][-1]


# ---------------------------------------------------------------------------
# against the result files, by hand
# ---------------------------------------------------------------------------
@pytest.mark.notebook
def test_run_table_matches_the_files(run):
    _, out = run
    table = pd.read_csv(out / "runs.csv").set_index("run")
    assert sorted(table.index) == sorted(["relu-1m", "relu-2m", "relu-4m", "silu-1m", "silu-2m", "silu-4m",
                                          "relu-2m-seed1", "relu-2m-seed2", "relu-2m-frac005"])
    for key in ACTIVATION + SEEDS[1:] + ["repetition/relu-2m-frac005"]:
        r = shipped_run(key)
        row = table.loc[key.split("/")[1]]
        pre = [c for c in r["checkpoints"] if c["stage"] != "decay"]
        assert row.A_last_stable == pre[-1]["activation_ratio"] and row.A_final == r["checkpoints"][-1]["activation_ratio"]
        assert row.A_min == min(c["activation_ratio"] for c in pre)
        assert row.heldout_loss_final == pytest.approx(r["checkpoints"][-1]["heldout_loss"], rel=1e-12)
        assert row.epochs == pytest.approx(np.mean(list(r["checkpoints"][-1]["epochs"].values())), rel=1e-12)
        assert row.cett == pytest.approx(r["tracking"]["cett"], rel=1e-12)


@pytest.mark.notebook
def test_limits_match_a_refit_by_hand(run):
    """Every fit of the notebook (three variants) equals fitting.fit_law on the checkpoints chosen by hand."""
    _, out = run
    limits = pd.read_csv(out / "limits.csv", keep_default_na=False)
    fits = json.loads((out / "fits.json").read_text())["fits"]
    assert len(limits) == 15 and list(limits["variant"].unique()) == list(VARIANTS)
    for row in limits.itertuples():
        r = shipped_run(f"activation/{row.run}")
        D, A = _series(r, **VARIANTS[row.variant])
        again = fitting.fit_law(D, A, r["config"]["activation"], n_bootstrap=0)
        assert row.n_points == len(D) and row.A0 == pytest.approx(again.params["A0"], rel=1e-9, abs=1e-12)
        assert row.rmse == pytest.approx(np.sqrt(np.mean((A - again.predict(D)) ** 2)), rel=1e-9)
        assert row.at_bound == ", ".join(again.at_bound)
        assert row.A0_lo <= row.A0 + 1e-12 and row.A0 <= row.A0_hi + 1e-12
        f = fits[f"{row.variant} | {row.run}"]
        assert f["A0"] == row.A0 and f["bootstrap"]["n"] == 20 and f["bootstrap"]["seed"] == 0


@pytest.mark.notebook
def test_seed_spread_by_hand(run):
    _, out = run
    spread = pd.read_csv(out / "seed_spread.csv").set_index("quantity")
    seeds = [shipped_run(k) for k in SEEDS]
    last = np.array([_last_stable(s)["activation_ratio"] for s in seeds])
    low = np.array([min(c["activation_ratio"] for c in s["checkpoints"] if c["stage"] != "decay") for s in seeds])
    assert spread.loc["A_last_stable", "std"] == pytest.approx(np.std(last, ddof=1), rel=1e-9)
    assert spread.loc["A_min", "std"] == pytest.approx(np.std(low, ddof=1), rel=1e-9)
    assert spread.loc["rise_from_min", "mean"] == pytest.approx(np.mean(last - low), rel=1e-9)
    assert (last - low > 0).all()  # every seed rises after its lowest point
    loss = np.array([s["checkpoints"][-1]["heldout_loss"] for s in seeds])
    assert spread.loc["heldout_loss_final", "std"] == pytest.approx(np.std(loss, ddof=1), rel=1e-9)


@pytest.mark.notebook
def test_figures_are_saved(run):
    assert_figures(run[1], FIGURES)


# ---------------------------------------------------------------------------
# what the notebook prints
# ---------------------------------------------------------------------------
@pytest.mark.notebook
def test_headlines_print_the_computed_numbers(run):
    executed, out = run
    loss_text, act_text, seed_text, silu_text, pareto_text, _, rep_text = headline_text(executed)
    seeds = [shipped_run(k) for k in SEEDS]
    loss_sd = np.std([s["checkpoints"][-1]["heldout_loss"] for s in seeds], ddof=1)
    for line, size in zip(loss_text.strip().splitlines(), ("1m", "2m", "4m")):
        relu, silu = (shipped_run(f"activation/{a}-{size}")["checkpoints"][-1]["heldout_loss"] for a in ("relu", "silu"))
        assert numbers_in(line)[1:] == pytest.approx([relu, silu, relu - silu, loss_sd], abs=6e-4)
    lines = act_text.strip().splitlines()
    last_sd = np.std([_last_stable(s)["activation_ratio"] for s in seeds], ddof=1)
    for line, act in zip(lines[:2], ("relu", "silu")):
        runs_ = [shipped_run(f"activation/{act}-{s}") for s in ("1m", "2m", "4m")]
        low = [min(c["activation_ratio"] for c in r["checkpoints"] if c["stage"] != "decay") for r in runs_]
        last = [_last_stable(r)["activation_ratio"] for r in runs_]
        nums = numbers_in(line)
        assert nums[1::2][:3] == pytest.approx(low, abs=6e-4) and nums[6:9] == pytest.approx(last, abs=6e-4)
        assert nums[-1] == pytest.approx(last_sd, abs=6e-5)
    limits = pd.read_csv(out / "limits.csv")
    for line, variant in zip(lines[2:], VARIANTS):
        printed = dict(re.findall(r"(\w+-\dm) (\d\.\d+)", line))
        rows = limits[limits["variant"] == variant]
        assert list(printed) == list(rows["run"])
        assert [float(v) for v in printed.values()] == pytest.approx(rows["A0"].tolist(), abs=6e-4)
    rises = [_last_stable(s)["activation_ratio"] - min(c["activation_ratio"] for c in s["checkpoints"]
                                                        if c["stage"] != "decay") for s in seeds]
    assert numbers_in(seed_text.splitlines()[0])[1::2][:3] == pytest.approx(rises, abs=6e-5)
    silu = [shipped_run(f"seeds_silu/silu-2m-seed{s}") for s in range(3)]
    silu_last = [_last_stable(s)["activation_ratio"] for s in silu]
    line = silu_text.splitlines()[0]
    assert f"last stable {', '.join(f'{v:.3f}' for v in silu_last)} (sd {np.std(silu_last, ddof=1):.4f})" in line
    sizes = [_last_stable(shipped_run(f"activation/silu-{s}"))["activation_ratio"] for s in ("1m", "2m", "4m")]
    assert numbers_in(silu_text.splitlines()[1])[-2:] == pytest.approx([np.std(sizes, ddof=1), np.std(silu_last, ddof=1)],
                                                                        abs=6e-5)
    a, b = shipped_run("activation/relu-2m"), shipped_run("moe/relu-2m-rerun")
    dense_only = {"name", "num_experts", "experts_top_k", "moe_style", "router_aux_loss_coef"}  # (fields added later)
    assert {k: v for k, v in a["config"].items() if k not in dense_only} == \
        {k: v for k, v in b["config"].items() if k not in dense_only}  # the same config and seed, trained twice
    assert (f"last stable {_last_stable(a)['activation_ratio']:.4f} / {_last_stable(b)['activation_ratio']:.4f} "
            f"({(_last_stable(b)['activation_ratio'] - _last_stable(a)['activation_ratio']) / last_sd:+.1f} ReLU seed sd)"
            ) in silu_text
    pareto = pd.read_csv(out / "pareto.csv")  # the final checkpoints' Pareto points, as the files hold them
    with_points = {"moe/relu-2m-rerun", "width_depth/relu-d64-l40", "seeds_silu/silu-2m-seed1", "seeds_silu/silu-2m-seed2"}
    assert sorted(pareto["run"].unique()) == sorted(k.split("/")[1] for k in with_points)
    for key in with_points:
        r = shipped_run(key)
        rows = sorted(r["pareto"]["rows"], key=lambda x: x["activation_ratio"])
        got = pareto[pareto["run"] == r["run"]]
        assert got["activation_ratio"].tolist() == [x["activation_ratio"] for x in rows]
        assert got["ppl_ratio"].tolist() == [x["ppl_ratio"] for x in rows]
        assert r["pareto"]["name"] == r["checkpoints"][-1]["name"]  # the final checkpoint
        by_c = {x["value"]: x for x in rows}
        assert f"{r['run']} {by_c[0.1]['activation_ratio']:.3f} (PPL ratio {by_c[0.1]['ppl_ratio']:.4f})" in pareto_text
        ratios = [by_c[c]["activation_ratio"] for c in sorted(by_c)]
        assert ratios == sorted(ratios, reverse=True)  # a larger CETT target cuts more neurons
    rep = pd.read_csv(out / "repetition.csv").set_index("run")
    small = shipped_run("repetition/relu-2m-frac005")
    assert f"relu-2m-frac005: {rep.loc['relu-2m-frac005', 'epochs']:.1f} epochs" in rep_text
    assert f"last stable {_last_stable(small)['activation_ratio']:.4f}" in rep_text


@pytest.mark.notebook
def test_moe_against_dense_matches_the_files(run):
    """Fig. 2 on our runs: the MoE models run the dense model's FFN width per token on the same tokens
    and schedule; every point and printed number is the files' own, recomputed here by hand."""
    executed, out = run
    moe_text = headline_text(executed)[5]
    dense = shipped_run(MOE[0])
    differ = {"name", "d_ff", "num_experts", "experts_top_k", "total_tokens", "tokens_per_param"}  # tokens: below
    pareto = pd.read_csv(out / "moe_pareto.csv")
    assert sorted(pareto["run"].unique()) == sorted(k.split("/")[1] for k in MOE)
    for key in MOE:
        r = shipped_run(key)
        cfg, experts = r["config"], r["config"]["num_experts"]
        assert {k: v for k, v in cfg.items() if k not in differ} == {k: v for k, v in dense["config"].items() if k not in differ}
        assert r["plan"]["total_tokens"] == dense["plan"]["total_tokens"] == r["checkpoints"][-1]["tokens"]
        width = r["plan"]["d_ff"] * (cfg["experts_top_k"] if experts >= 2 else 1)
        assert width == dense["plan"]["d_ff"] == 448  # the FFN width a token runs
        neurons = r["plan"]["d_ff"] * max(experts, 1)
        rows = sorted(r["pareto"]["rows"], key=lambda x: (x["rule"], x["activation_ratio"]))
        got = pareto[pareto["run"] == r["run"]]
        assert got["ppl"].tolist() == [x["ppl"] for x in rows] and (got["neurons"] == neurons).all()
        assert got["active_neurons"].tolist() == pytest.approx([x["activation_ratio"] * neurons for x in rows], rel=1e-12)
        last = _last_stable(r)
        block = moe_text.split(f"{r['run']}: ")[1].split("\nrelu-")[0]
        assert f"activation ratio {last['activation_ratio']:.4f} of {neurons} neurons" in block
        assert f"= {last['activation_ratio'] * neurons:.1f} neurons per token" in block
        by = {(x["rule"], x["value"]): x for x in rows}
        c01 = by[("cett", 0.1)]
        assert f"CETT 0.1: {c01['activation_ratio'] * neurons:.1f} neurons, PPL {c01['ppl']:.3f}" in block
        assert f"dense PPL {r['pareto']['ppl_dense']:.3f}" in block
        if experts >= 2:
            assert f"({last['activation_ratio_ran']:.4f} of the experts that ran)" in block
            k = cfg["experts_top_k"]
            assert by[("experts", float(k))]["ppl_ratio"] == pytest.approx(1.0, abs=1e-6)  # as trained = dense
            assert [by[("experts", float(j))]["activation_ratio"] for j in range(1, experts + 1)] == \
                pytest.approx([j / experts for j in range(1, experts + 1)], rel=1e-12)  # every neuron of k experts
            assert f"top-{k - 1}: {(k - 1) * r['plan']['d_ff']} neurons, " \
                f"PPL ratio {by[('experts', float(k - 1))]['ppl_ratio']:.4f}" in block
            assert f"all {experts}: PPL ratio {by[('experts', float(experts))]['ppl_ratio']:.4f}" in block
        else:
            assert "routed experts" not in block


# ---------------------------------------------------------------------------
# against committed reference values
# ---------------------------------------------------------------------------
def _key_numbers(executed, out) -> dict:
    limits = pd.read_csv(out / "limits.csv", keep_default_na=False)
    spread = pd.read_csv(out / "seed_spread.csv").set_index("quantity")
    return {  # bootstrap interval ends are compared within their tolerance, so they are cut out of the lines
        "headline": [re.sub(r"\[[^]]*\]", "[..]", line) for text in headline_text(executed)
                     for line in text.strip().splitlines()],
        "limits": {f"{r.variant} | {r.run}": {"A0": float(r.A0), "rmse": float(r.rmse), "at_bound": r.at_bound,
                                               # a fit with a coefficient on a bound has a degenerate bootstrap
                                               **({} if r.at_bound else {"A0_ci": [float(r.A0_lo), float(r.A0_hi)]})}
                   for r in limits.itertuples()},
        "seed_spread": {q: {"mean": float(spread.loc[q, "mean"]), "std": float(spread.loc[q, "std"])}
                        for q in spread.index},
    }


@pytest.mark.notebook
def test_key_numbers_match_the_committed_reference(run):
    executed, out = run
    check_reference(
        _key_numbers(executed, out), "notebook_03", parameters=PARAMETERS,
        about="Key numbers of notebooks/03_training_runs.ipynb run by tests/test_notebook_03.py with the parameters "
              "below, from the shipped results in data/runs/. Written with SPARSING_UPDATE_REFERENCE=1; floats are "
              "compared within the tolerance of their key (else default), everything else exactly.",
        tolerance={
            "default": {"rtol": 1e-6, "atol": 1e-9},  # deterministic fits and table values
            "A0_ci": {"rtol": 2e-2, "atol": 1e-4},  # ends of a 20-resample bootstrap interval
        },
    )
