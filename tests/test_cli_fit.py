"""``sparsing fit``: a series JSON in, fit.json out; every bad series gets an error naming the
problem and the fix, before any fitting, and nothing is written."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from _notebooks import ROOT

from sparsing_utils import cli, fitting, laws
from sparsing_utils.series import load_series_file


def synthetic(law: str, n: int = 40, seed: int = 1):
    params = {"relu": {"alpha": 0.6, "b": -3.0, "c": 0.15, "A0": 0.07}, "silu": {"alpha": 0.7, "c": 0.2, "A0": 0.39}}
    D = np.geomspace(1.0, 200.0, n)
    return D, laws.get_law(law).func(D, **params[law]) + np.random.default_rng(seed).normal(0.0, 2e-4, n)


def write_series(path, law="relu"):
    D, y = synthetic(law)
    path.write_text(json.dumps({"token_passed": (D * 1e9).tolist(), "activation_ratio": y.tolist()}))
    return D, y


def test_round_trip(tmp_path, capsys):
    series = tmp_path / "series.json"
    write_series(series)
    D, y = load_series_file(series)  # D in billions, as the command reads it
    out = tmp_path / "sub" / "fit.json"
    rc = cli.main(["fit", "--input", str(series), "--law", "relu", "--out", str(out), "--bootstrap", "20"])
    assert rc == 0
    printed = capsys.readouterr().out
    fit = json.loads(out.read_text())
    direct = fitting.fit_law(D, y, "relu", n_bootstrap=20, seed=0)
    for key in ("alpha", "b", "c", "A0"):
        assert fit[key] == pytest.approx(direct.params[key], rel=1e-12)
        assert f"{key:<7}{direct.params[key]:>13.5g}" in printed  # the summary table row
    assert fit["law"] == "relu" and fit["equation"] == "Eq. 4"
    assert fit["mse"] == pytest.approx(np.mean((y - direct.predict(D)) ** 2), rel=1e-9)
    assert fit["A0_ci"] == pytest.approx(list(direct.limit_ci), rel=1e-12)
    assert set(fit["stderr"]) == {"alpha", "b", "c", "A0"}
    assert fit["A0"] == pytest.approx(0.07, abs=0.002)
    assert f"MSE {direct.mse:.4g}" in printed
    assert [p.name for p in out.parent.iterdir()] == ["fit.json"]  # no temp file left behind
    again = fitting.LawFit.load(out)
    np.testing.assert_allclose(again.predict(D), direct.predict(D), rtol=1e-12)

    rc = cli.main(["fit", "--input", str(series), "--law", "silu", "--out", str(out), "--bootstrap", "0"])
    fit = json.loads(out.read_text())
    assert rc == 0 and fit["law"] == "silu" and "b" not in fit and fit["A0_ci"] is None


def test_as_a_program(tmp_path):
    series = tmp_path / "series.json"
    write_series(series, "silu")
    out = tmp_path / "fit.json"
    proc = subprocess.run(
        [sys.executable, "-m", "sparsing_utils.cli", "fit", "--input", str(series), "--law", "log",
         "--out", str(out), "--bootstrap", "10"],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    fit = json.loads(out.read_text())
    assert fit["law"] == "log" and fit["fixed"] == {"a": 1.0} and fit["A0_ci"] is None


T5 = [1e9, 2e9, 3e9, 4e9, 5e9]
A5 = [0.1, 0.09, 0.08, 0.07, 0.07]
BAD = {
    "empty": ({"token_passed": [], "activation_ratio": []}, "relu",
              r"the series is empty: token_passed and activation_ratio hold no checkpoints; give one value per"),
    "one point": ({"token_passed": [1e9], "activation_ratio": [0.4]}, "silu",
                  r"1 checkpoint is too few to fit law silu \(Eq\. 5\) with 3 free parameters; give at least 4 "),
    "too few": ({"token_passed": T5[:4], "activation_ratio": A5[:4]}, "relu",
                r"4 checkpoints are too few to fit law relu \(Eq\. 4\) with 4 free parameters; give at least 5 "),
    "lengths": ({"token_passed": T5, "activation_ratio": A5[:4]}, "relu",
                r"token_passed has 5 values but activation_ratio has 4; give one activation_ratio per checkpoint"),
    "null": ({"token_passed": [1e9, None, 3e9, 4e9, 5e9], "activation_ratio": A5}, "relu",
             r"token_passed\[1\] is nan \(NaN, inf or null\); drop or fill those checkpoints"),
    "text": ({"token_passed": T5, "activation_ratio": [0.1, "0.09x", 0.08, 0.07, 0.07]}, "relu",
             r"must be lists of numbers .*; remove text or nested entries"),
    "nested": ({"token_passed": [[1e9, 2e9], [3e9, 4e9]], "activation_ratio": [[0.1, 0.1], [0.1, 0.1]]}, "relu",
               r"must be flat lists of numbers, got shapes \(2, 2\) and \(2, 2\); give one number per checkpoint"),
    "step 0": ({"token_passed": [0.0, *T5[1:]], "activation_ratio": A5}, "relu",
               r"token_passed must be positive .* token_passed\[0\] = 0; drop the step-0 checkpoint"),
    "negative": ({"token_passed": [-1e9, *T5[1:]], "activation_ratio": A5}, "relu",
                 r"token_passed\[0\] = -1e\+09; drop the step-0 checkpoint and any with a negative count"),
    "duplicate": ({"token_passed": [1e9, 2e9, 2e9, 4e9, 5e9], "activation_ratio": A5}, "relu",
                  r"duplicate token_passed = 2e\+09 at indices 1 and 2; keep one value per checkpoint"),
    "unsorted": ({"token_passed": [3e9, 1e9, 2e9, 4e9, 5e9], "activation_ratio": A5}, "relu",
                 r"not sorted ascending .*; sort the checkpoints by tokens passed"),
    "percent": ({"token_passed": T5, "activation_ratio": [10.0, 9.0, 8.0, 7.0, 7.0]}, "relu",
                r"activation_ratio\[0\] = 10; give fractions, not percentages"),
    "negative ratio": ({"token_passed": T5, "activation_ratio": [0.1, -0.09, 0.08, 0.07, 0.07]}, "relu",
                       r"activation_ratio\[1\] = -0\.09; an activation ratio cannot be negative"),
    "missing key": ({"tokens": T5, "activation_ratio": A5}, "relu",
                    r"missing key\(s\) \['token_passed'\]; the series needs \"token_passed\""),
    "not a list": ({"token_passed": 5, "activation_ratio": A5}, "relu",
                   r"\"token_passed\" must be a list of numbers, got int; expected \{\"token_passed\""),
    "not an object": ([T5, A5], "relu", r"expected a JSON object \{\"token_passed\": .*got list"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_series_are_refused_with_the_fix(tmp_path, capsys, case):
    payload, law, message = BAD[case]
    series = tmp_path / "series.json"
    series.write_text(json.dumps(payload))
    out = tmp_path / "fit.json"
    rc = cli.main(["fit", "--input", str(series), "--law", law, "--out", str(out), "--bootstrap", "5"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith(f"sparsing fit: error: {series}: "), err
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    assert re.search(message, err), err
    assert not out.exists() and list(tmp_path.iterdir()) == [series]


@pytest.mark.parametrize(
    "setup, message",
    [
        ("missing", r"series file .*absent\.json not found; pass a JSON file \{\"token_passed\""),
        ("folder", r"series file .* is a folder; pass a JSON file"),
        ("not json", r"is not valid JSON .*; expected \{\"token_passed\""),
        ("bootstrap", r"n_bootstrap must be >= 0 \(0 skips the bootstrap\), got -1"),
    ],
)
def test_bad_files_and_options(tmp_path, capsys, setup, message):
    series = tmp_path / "series.json"
    args = ["--bootstrap", "5"]
    if setup == "missing":
        series = tmp_path / "absent.json"
    elif setup == "folder":
        series = tmp_path / "dir.json"
        series.mkdir()
    elif setup == "not json":
        series.write_text("{not json")
    else:
        write_series(series)
        args = ["--bootstrap", "-1"]
    out = tmp_path / "fit.json"
    rc = cli.main(["fit", "--input", str(series), "--law", "relu", "--out", str(out), *args])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(message, err), err
    assert not out.exists()


def test_token_counts_in_billions_warn_but_fit(tmp_path, capsys):
    D, y = synthetic("silu")
    series = tmp_path / "series.json"
    series.write_text(json.dumps({"token_passed": D.tolist(), "activation_ratio": y.tolist()}))
    with pytest.warns(UserWarning, match="tops out at 200; it should hold raw token counts"):
        rc = cli.main(["fit", "--input", str(series), "--law", "silu", "--out", str(tmp_path / "f.json"),
                       "--bootstrap", "0"])
    assert rc == 0


def test_unwritable_out_is_refused_before_fitting(tmp_path, capsys, monkeypatch):
    series = tmp_path / "series.json"
    write_series(series)

    def must_not_fit(*args, **kwargs):
        raise AssertionError("fitting started although --out cannot be written")

    monkeypatch.setattr(fitting, "fit_series_file", must_not_fit)
    rc = cli.main(["fit", "--input", str(series), "--law", "relu", "--out", "/proc/fit.json", "--bootstrap", "5"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "cannot write the output '/proc/fit.json'" in err and "writable folder" in err, err
