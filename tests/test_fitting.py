"""Tests of the activation-data laws and their fitting (Luo et al. 2024, arXiv:2411.02335, section 2)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sparsing_utils import cli, fitting, laws

ROOT = Path(__file__).resolve().parents[1]
RAW_DIR = ROOT.parent / "shared" / "paper" / "activation-vs-data"

needs_raw = pytest.mark.skipif(
    not RAW_DIR.is_dir(),
    reason=f"the paper's activation-vs-data points are third-party data, not in this repository; "
    f"expected at {RAW_DIR}",
)

D40 = np.geomspace(1.0, 200.0, 40)
TRUE = {
    "relu": ({"alpha": 0.6, "b": -3.0, "c": 0.15, "A0": 0.07}, 2e-4),
    "silu": ({"alpha": 0.7, "c": 0.2, "A0": 0.39}, 5e-4),
    "log": ({"a": 1.0, "b": 0.5, "c": -0.01, "A0": 0.1}, 2e-4),
    "sigmoid": ({"a": 1.07, "b": 1.0, "c": -0.05, "d": -3.0}, 2e-4),
    "loss": ({"L0": 2.0, "k": 1.5, "beta": 0.4}, 5e-3),
}


def synthetic(law, seed=1, D=D40):
    params, sd = TRUE[law]
    rng = np.random.default_rng(seed)
    return D, laws.get_law(law).func(D, **params) + rng.normal(0.0, sd, D.size)


# ---------------------------------------------------------------------------
# the formulas
# ---------------------------------------------------------------------------
def test_laws_evaluate_to_the_paper_formulas():
    # Eq. 4: exp(-c*D^alpha + b) + A0 ; D=4, alpha=0.5 -> D^alpha = 2 ; -1*2 + 2 = 0 -> 1 + A0
    assert laws.relu_law(4.0, alpha=0.5, b=2.0, c=1.0, A0=0.1) == pytest.approx(1.1)
    # exponent -3*1 + 0 at D=1 -> e^-3 + 0.05
    assert laws.relu_law(1.0, alpha=0.7, b=0.0, c=3.0, A0=0.05) == pytest.approx(0.049787068 + 0.05)
    # Eq. 5: -c*D^-alpha + A0 ; D=4, alpha=0.5 -> 4^-0.5 = 0.5 -> -0.1 + 0.4
    assert laws.silu_law(4.0, alpha=0.5, c=0.2, A0=0.4) == pytest.approx(0.3)
    assert laws.silu_law(100.0, alpha=1.0, c=1.0, A0=0.5) == pytest.approx(0.49)
    # log: A0 + c*log(a*D + b) ; 2*1.5 - 2 = 1 -> log 1 = 0 ; 2*(e^2+2)/2 - 2 = e^2 -> 2c
    assert laws.log_law(1.5, a=2.0, b=-2.0, c=0.3, A0=0.1) == pytest.approx(0.1)
    assert laws.log_law((math.e**2 + 2) / 2, a=2.0, b=-2.0, c=0.3, A0=0.1) == pytest.approx(0.7)
    # sigmoid-like: a - 1/(1 + b*exp(c*D + d)) ; c*D + d = 0 -> a - 1/(1 + b)
    assert laws.sigmoid_law(2.0, a=0.5, b=3.0, c=1.5, d=-3.0) == pytest.approx(0.25)
    assert laws.sigmoid_law(2.0, a=0.5, b=1.0, c=1.5, d=-3.0 + math.log(3.0)) == pytest.approx(0.25)
    # loss (Fig. 12): L0 + k*D^-beta
    assert laws.loss_law(4.0, L0=2.0, k=1.0, beta=0.5) == pytest.approx(2.5)
    # bottleneck (Fig. 5): plateau + slope*(min(x, x_b) - x_b)
    np.testing.assert_allclose(laws.bottleneck_law([1.0, 3.0, 5.0], slope=0.5, x_b=3.0, plateau=1.0), [0.0, 1.0, 1.0])
    # vectorised over D
    np.testing.assert_allclose(laws.silu_law(np.array([1.0, 4.0]), alpha=0.5, c=0.2, A0=0.4), [0.2, 0.3])


@pytest.mark.parametrize("law", sorted(TRUE))
def test_derivative_matches_finite_difference(law):
    spec = laws.get_law(law)
    p = TRUE[law][0]
    D = np.array([2.0, 20.0, 150.0])
    h = 1e-5 * D
    fd = (spec.func(D + h, **p) - spec.func(D - h, **p)) / (2 * h)
    np.testing.assert_allclose(spec.derivative(D, **p), fd, rtol=1e-5, atol=1e-12)


def test_limits():
    assert laws.get_law("relu").limit(TRUE["relu"][0]) == 0.07
    assert laws.get_law("silu").limit(TRUE["silu"][0]) == 0.39
    sig = laws.get_law("sigmoid")
    assert sig.limit({"a": 1.07, "b": 1.0, "c": -0.05, "d": -3.0}) == pytest.approx(0.07)
    assert sig.limit({"a": 0.4, "b": 1.0, "c": 0.05, "d": -3.0}) == pytest.approx(0.4)
    assert laws.get_law("log").limit(TRUE["log"][0]) == -math.inf
    with pytest.raises(ValueError, match="unknown law"):
        laws.get_law("cubic")


# ---------------------------------------------------------------------------
# recovery of known parameters
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("law", sorted(TRUE))
def test_recovers_known_parameters(law):
    D, y = synthetic(law)
    params, sd = TRUE[law]
    fit = fitting.fit_law(D, y, law, n_bootstrap=40, seed=0)
    assert fit.success and not fit.at_bound
    # residual scatter at the noise level: the global optimum, not a poor local one
    assert 0.6 * sd < fit.rmse < 1.3 * sd
    for name, true in params.items():
        if name in fit.fixed:
            assert fit.params[name] == true
            continue
        lo, hi = fit.bootstrap_ci[name]
        width = hi - lo
        assert lo - width <= true <= hi + width, (name, true, (lo, hi))
        assert fit.params[name] == pytest.approx(true, rel=0.1, abs=1e-3)
        assert fit.stderr[name] is not None and fit.stderr[name] > 0
    if fit.limit_name:
        assert fit.limit_ci[0] <= fit.limit <= fit.limit_ci[1]


def test_degenerate_optimum_is_flagged():
    # a pure power law (A0 = 0) is Eq. 4 only in the limit alpha -> 0, c -> inf
    rng = np.random.default_rng(0)
    y = 0.5 * D40**-0.3 + rng.normal(0, 1e-4, D40.size)
    fit = fitting.fit_law(D40, y, "relu", n_bootstrap=0)
    assert "alpha" in fit.at_bound
    assert fit.params["alpha"] == fit.bounds["alpha"][0]
    assert fit.stderr["alpha"] is None
    assert "AT BOUND" in fit.summary()


def test_bootstrap_is_seeded_and_methods_work():
    D, y = synthetic("silu")
    a = fitting.fit_law(D, y, "silu", n_bootstrap=25, seed=3)
    b = fitting.fit_law(D, y, "silu", n_bootstrap=25, seed=3)
    c = fitting.fit_law(D, y, "silu", n_bootstrap=25, seed=4)
    assert a.limit_ci == b.limit_ci
    assert a.limit_ci != c.limit_ci
    for method in ("block", "pairs"):
        f = fitting.fit_law(D, y, "silu", n_bootstrap=25, seed=0, bootstrap=method)
        assert f.bootstrap["method"] == method and f.bootstrap["n_ok"] >= 20
        assert f.limit_ci[0] <= f.params["A0"] <= f.limit_ci[1]
    with pytest.raises(ValueError, match="bootstrap method"):
        fitting.fit_law(D, y, "silu", n_bootstrap=5, bootstrap="jackknife")


def test_goodness_of_fit_and_published_evaluation():
    D, y = synthetic("relu")
    fit = fitting.fit_law(D, y, "relu", n_bootstrap=0)
    r = y - fit.predict(D)
    assert fit.mse == pytest.approx(np.mean(r**2))
    assert fit.mae == pytest.approx(np.mean(np.abs(r)))
    assert fit.aic == pytest.approx(len(D) * np.log(fit.mse) + 2 * 4)
    assert fit.bic == pytest.approx(len(D) * np.log(fit.mse) + 4 * np.log(len(D)))
    ev = fitting.evaluate_params(D, y, "relu", TRUE["relu"][0])
    assert ev["mse"] >= fit.mse  # least squares beats the truth on its own sample
    with pytest.raises(ValueError, match="lack"):
        fitting.evaluate_params(D, y, "relu", {"alpha": 1.0})


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "D, A, match",
    [
        ([1.0, 2.0, 3.0], [0.1, 0.09, 0.08], "too few.*4 free parameters"),
        ([1.0, 2.0, np.nan, 4.0, 5.0], [0.1, 0.09, 0.08, 0.07, 0.07], "NaN"),
        ([1.0, 2.0, 3.0, 4.0, 5.0], [0.1, np.nan, 0.08, 0.07, 0.07], "NaN"),
        ([0.0, 2.0, 3.0, 4.0, 5.0], [0.1, 0.09, 0.08, 0.07, 0.07], "positive.*step-0"),
        ([-1.0, 2.0, 3.0, 4.0, 5.0], [0.1, 0.09, 0.08, 0.07, 0.07], "positive"),
        ([1.0, 3.0, 2.0, 4.0, 5.0], [0.1, 0.09, 0.08, 0.07, 0.07], "not sorted.*sort"),
        ([1.0, 2.0, 2.0, 4.0, 5.0], [0.1, 0.09, 0.08, 0.07, 0.07], "duplicate.*one value per checkpoint"),
        ([1.0, 2.0, 3.0, 4.0], [0.1, 0.09, 0.08], "4 values.*3"),
        ([1.0, 2.0, 3.0, 4.0, 5.0], [10.0, 9.0, 8.0, 7.0, 7.0], r"\[0, 1\].*percentages"),
    ],
)
def test_bad_input_gives_clear_error(D, A, match):
    with pytest.raises(ValueError, match=match):
        fitting.fit_law(D, A, "relu", n_bootstrap=0)


def test_too_few_points_counts_free_parameters_of_each_law():
    D, y = np.array([1.0, 2.0, 4.0]), np.array([0.3, 0.35, 0.37])
    with pytest.raises(ValueError, match="3 free parameters.*at least 4"):
        fitting.fit_law(D, y, "silu", n_bootstrap=0)
    fitting.fit_law(np.append(D, 8.0), np.append(y, 0.38), "silu", n_bootstrap=0)


def test_bad_series_files(tmp_path):
    p = tmp_path / "s.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        fitting.load_series_file(p)
    p.write_text(json.dumps({"tokens": [1, 2], "activation_ratio": [0.1, 0.2]}))
    with pytest.raises(ValueError, match="missing key.*token_passed"):
        fitting.load_series_file(p)
    p.write_text(json.dumps({"token_passed": 5, "activation_ratio": [0.1]}))
    with pytest.raises(ValueError, match="must be a list"):
        fitting.load_series_file(p)
    with pytest.raises(FileNotFoundError):
        fitting.load_series_file(tmp_path / "absent.json")
    with pytest.raises(FileNotFoundError, match="activation-vs-data directory"):
        fitting.load_activation_series(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no <scale>b_"):
        fitting.load_activation_series(tmp_path)


# ---------------------------------------------------------------------------
# CLI and JSON output
# ---------------------------------------------------------------------------
def _write_series(path, law="relu"):
    D, y = synthetic(law)
    path.write_text(json.dumps({"token_passed": (D * 1e9).tolist(), "activation_ratio": y.tolist()}))
    return D, y


def test_cli_round_trip(tmp_path, capsys):
    series = tmp_path / "series.json"
    D, y = _write_series(series)
    out = tmp_path / "sub" / "fit.json"
    rc = cli.main(["fit", "--input", str(series), "--law", "relu", "--out", str(out), "--bootstrap", "20"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Eq. 4" in printed and "A0" in printed and "MSE" in printed
    fit = json.loads(out.read_text())
    for key in ("law", "alpha", "b", "c", "A0", "mse", "mae", "aic", "bic", "A0_ci", "stderr", "at_bound"):
        assert key in fit, key
    assert fit["law"] == "relu"
    assert set(fit["stderr"]) == {"alpha", "b", "c", "A0"}
    lo, hi = fit["A0_ci"]
    assert lo <= fit["A0"] <= hi
    assert fit["A0"] == pytest.approx(0.07, abs=0.002)
    assert [p.name for p in out.parent.iterdir()] == ["fit.json"]  # no temp file left behind
    again = fitting.LawFit.load(out)
    np.testing.assert_allclose(again.predict(D), fitting.fit_law(D, y, "relu", n_bootstrap=0).predict(D), rtol=1e-6)

    rc = cli.main(["fit", "--input", str(series), "--law", "silu", "--out", str(out), "--bootstrap", "0"])
    fit = json.loads(out.read_text())
    assert rc == 0 and fit["law"] == "silu" and "b" not in fit and fit["A0_ci"] is None


def test_cli_reports_bad_input(tmp_path, capsys):
    series = tmp_path / "series.json"
    series.write_text(json.dumps({"token_passed": [3e9, 1e9, 2e9, 4e9, 5e9], "activation_ratio": [0.1] * 5}))
    rc = cli.main(["fit", "--input", str(series), "--law", "relu", "--out", str(tmp_path / "f.json")])
    assert rc == 2
    assert "not sorted" in capsys.readouterr().err
    assert not (tmp_path / "f.json").exists()


def test_cli_as_a_program(tmp_path):
    series = tmp_path / "series.json"
    _write_series(series, "silu")
    out = tmp_path / "fit.json"
    proc = subprocess.run(
        [sys.executable, "-m", "sparsing_utils.cli", "fit", "--input", str(series), "--law", "log",
         "--out", str(out), "--bootstrap", "10"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    fit = json.loads(out.read_text())
    assert fit["law"] == "log" and fit["fixed"] == {"a": 1.0} and fit["A0_ci"] is None


# ---------------------------------------------------------------------------
# derived quantities, profile, forecasting
# ---------------------------------------------------------------------------
def test_mse_profile_bottoms_out_at_the_fit():
    D, y = synthetic("silu")
    fit = fitting.fit_law(D, y, "silu", n_bootstrap=30)
    prof = fitting.mse_profile(D, y, "silu", fit=fit, include=[0.38], n=21)
    assert list(prof.columns[:2]) == ["A0", "mse"] and len(prof) >= 21
    assert prof["A0"].min() <= 0.38
    assert prof["mse"].min() >= fit.mse * (1 - 1e-6)
    near = prof.iloc[(prof["A0"] - fit.params["A0"]).abs().argmin()]
    assert near["mse"] <= fit.mse * 1.2
    lo, hi = fitting.profile_interval(prof, len(D))
    assert lo <= fit.params["A0"] <= hi
    with pytest.raises(ValueError, match="no finite limit"):
        fitting.mse_profile(D, y, "log")


def test_forecast_from_first_checkpoints():
    D, y = synthetic("relu")
    r = fitting.forecast(D, y, "relu", 0.5)
    assert r["n_train"] == 20 and r["n_test"] == 20
    assert r["rmse"] < 2e-3 and abs(r["limit_partial"] - 0.07) < 0.01
    with pytest.raises(ValueError, match="train_fraction"):
        fitting.forecast(D, y, "relu", 1.5)
    with pytest.raises(ValueError, match="leaves no checkpoint"):
        fitting.forecast(D[:6], y[:6], "relu", 0.9)


def test_derivative_vs_data_ratio():
    D, y = synthetic("relu")
    fit = fitting.fit_law(D, y, "relu", n_bootstrap=0)
    df = fitting.derivative_vs_data_ratio(fit, n_params=1.08e8, num=50)
    assert len(df) == 50
    np.testing.assert_allclose(df["data_ratio"], df["D"] * 1e9 / 1.08e8)
    assert (df["dA_dD"] < 0).all()
    assert df["D"].iloc[0] == pytest.approx(D.min())
    with pytest.raises(ValueError, match="n_params"):
        fitting.derivative_vs_data_ratio(fit, n_params=0)


def test_bottleneck_fit_recovers_the_knee():
    x = np.array([20, 40, 60, 80, 100, 120, 150, 200, 250, 300], float)
    rng = np.random.default_rng(0)
    y = laws.bottleneck_law(x, slope=2e-4, x_b=110.0, plateau=0.075) + rng.normal(0, 2e-4, x.size)
    fit = fitting.fit_bottleneck(x, y)
    assert fit.x_b == pytest.approx(110.0, rel=0.1)
    assert fit.slope == pytest.approx(2e-4, rel=0.1)
    assert fit.plateau == pytest.approx(0.075, abs=5e-4)
    assert not fit.at_bound
    # only a rise: the bottleneck is pushed to the end of the data and flagged
    lin = fitting.fit_bottleneck(x, 0.05 + 1e-4 * x)
    assert lin.at_bound == ["x_b"]
    with pytest.raises(ValueError, match="at least 4"):
        fitting.fit_bottleneck([1, 2, 3], [1, 2, 3])


def test_limit_loss_fit():
    D, L = synthetic("loss")
    fit = fitting.fit_limit_loss(D, L, n_bootstrap=30)
    assert fit.law == "loss" and fit.limit == pytest.approx(2.0, abs=0.05)
    assert fit.limit_ci[0] <= fit.limit <= fit.limit_ci[1]
    assert "L0_ci" in fit.to_dict()


def test_figures(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from sparsing_utils import plots

    series = []
    fits = {}
    for act, law in (("relu", "relu"), ("silu", "silu")):
        D, y = synthetic(law)
        s = fitting.ActivationSeries(f"0.1B {act}", act, "0.1B", D, y)
        series.append(s)
        fits[s.name] = fitting.fit_law(D, y, law, n_bootstrap=10)
    pub = laws.published_coefficients()
    fig = plots.plot_activation_vs_data(series, fits, published=pub)
    assert len(fig.axes) == 2
    assert plots.save_figure(fig, tmp_path, "fig4").is_file()
    table = fitting.compare_with_published(series, fits)
    assert len(plots.plot_limit_vs_scale(table).axes) == 2
    deriv = pd.concat(
        [fitting.derivative_vs_data_ratio(fits[s.name], 1.08e8).assign(activation=s.activation, scale=s.scale) for s in series]
    )
    assert len(plots.plot_derivative_vs_ratio(deriv).axes) == 2
    prof = fitting.mse_profile(series[1].D, series[1].A, "silu", n=7, fit=fits[series[1].name])
    plots.plot_mse_profile(prof, fits[series[1].name], published=0.409)
    plots.plot_forecast(series[0], [fitting.forecast(series[0].D, series[0].A, "relu", 0.5)])
    x = np.array([20, 40, 60, 80, 100, 150, 200, 300.0])
    plots.plot_bottleneck(fitting.fit_bottleneck(x, laws.bottleneck_law(x, 1e-4, 100, 0.07)))
    D, L = synthetic("loss")
    plots.plot_limit_loss({"0.1B relu": fitting.fit_limit_loss(D, L, n_bootstrap=10)})
    import matplotlib.pyplot as plt

    plt.close("all")


# ---------------------------------------------------------------------------
# the paper's tables
# ---------------------------------------------------------------------------
def test_paper_tables_are_consistent():
    for n in (1, 2, 3, 4, 5, 6):
        df = laws.read_paper_table(f"table{n}")
        assert df["source"].str.contains(f"arXiv 2411.02335, Table {n}").all()
    pub = laws.published_coefficients()
    assert len(pub) == 10
    assert pub[("relu", "1.2B")] == {"alpha": 1.33, "b": -3.89, "c": 9.03e-4, "A0": 7.82e-2}
    assert pub[("silu", "0.1B")] == {"alpha": 0.479, "c": 0.102, "A0": 0.409}  # the corrected row
    N = laws.non_embedding_params()
    assert N == {"0.1B": 1.08e8, "0.2B": 2.41e8, "0.4B": 4.52e8, "0.8B": 7.6e8, "1.2B": 1.18e9}
    keys = ["scale", "activation", "setting"]
    t1 = laws.read_paper_table("table1")
    m = t1.merge(laws.read_paper_table("table4")[keys + ["avg"]], on=keys).merge(
        laws.read_paper_table("table5")[keys + ["avg"]], on=keys, suffixes=("_cr", "_rc")
    )
    assert len(m) == 40
    np.testing.assert_allclose(m["commonsense_reasoning"], m["avg_cr"])
    np.testing.assert_allclose(m["reading_comprehension"], m["avg_rc"])
    for n in (4, 5, 6):
        t = laws.read_paper_table(f"table{n}")
        bench = [c for c in t.columns if c not in keys + ["avg", "source"]]
        assert len(t) == 40
        assert (t[bench].mean(axis=1) - t["avg"]).abs().max() < 0.1  # printed values are rounded


# ---------------------------------------------------------------------------
# acceptance: the ten published series
# ---------------------------------------------------------------------------
@needs_raw
def test_load_activation_series():
    series = fitting.load_activation_series(RAW_DIR)
    assert [s.name for s in series] == [f"{sc} {a}" for a in ("relu", "silu") for sc in ("0.1B", "0.2B", "0.4B", "0.8B", "1.2B")]
    for s in series:
        assert 0.5 < s.D.min() < s.D.max() < 1000  # billions of tokens
        assert np.all(np.diff(s.D) > 0) and len(s) >= 20
        assert s.law == s.activation


@needs_raw
def test_acceptance_every_published_series():
    """The automatic fit beats Table 2's rounded coefficients on every series, and its
    bootstrap interval for A0 contains its A0 (issue 3, acceptance)."""
    series = fitting.load_activation_series(RAW_DIR)
    pub = laws.published_coefficients()
    assert len(series) == 10
    for s in series:
        fit = fitting.fit_law(s.D, s.A, s.law, n_bootstrap=40, seed=0)
        published = fitting.evaluate_params(s.D, s.A, s.law, pub[(s.activation, s.scale)])
        assert fit.mse <= published["mse"], (s.name, fit.mse, published["mse"])
        lo, hi = fit.limit_ci
        assert lo <= fit.params["A0"] <= hi, (s.name, fit.params["A0"], fit.limit_ci)
        # a parameter on a bound must be reported as such
        for name in fit.at_bound:
            assert fit.params[name] in fit.bounds[name]
