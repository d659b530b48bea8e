"""Notebook 06 (what sparsity costs on benchmarks), executed once with CI parameters; its key numbers
are recomputed here with the package, compared with committed reference values
(``tests/reference/notebook_06.json``) and found in its printed headline cell."""
from __future__ import annotations

import json

import pytest
from _notebooks import (
    ROOT,
    assert_thin_and_stripped,
    check_reference,
    execute,
    headline_text,
    numbers_in,
    tagged_cells,
)

pytest.importorskip("lm_eval", reason="lm-eval is an optional dependency: pip install 'sparsing-law[eval]'")

from sparsing_utils import evaluation
from sparsing_utils.results import SparsityReport

NOTEBOOK = ROOT / "notebooks" / "06_evaluation.ipynb"
DATA = ROOT.parent / "shared" / "data"
RESULT = ROOT / "data" / "results" / "smollm2_pydoc_8192.json"
COMMITTED = ROOT / "data" / "results" / "eval"
PARAMETERS = {"smoke": True}  # smoke: copa and piqa, 6 items, dense + PPL-1% + PPL-10%; output_dir per run
SMOKE = {"tasks": ["copa", "piqa"], "limit": 6, "settings": {"dense": None, "p1": 1.0, "p10": 10.0}}
needs_data = pytest.mark.skipif(not DATA.is_dir(),
                                reason=f"the offline evaluation data (third-party) are not at {DATA}")


def test_notebook_06_is_thin_and_stripped():
    assert_thin_and_stripped(NOTEBOOK)
    assert len(tagged_cells(NOTEBOOK, "headline")) == 1


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    if not DATA.is_dir():
        pytest.skip(f"the offline evaluation data (third-party) are not at {DATA}")
    tmp = tmp_path_factory.mktemp("nb06")
    out = tmp / "out"
    executed = execute(NOTEBOOK, tmp / "06.ipynb", {**PARAMETERS, "output_dir": str(out)})
    return executed, out


def _reports(out) -> dict[str, evaluation.EvalReport]:
    return {name: evaluation.EvalReport.load(out / f"eval_{name}.json") for name in SMOKE["settings"]}


@pytest.mark.notebook
@pytest.mark.real_model
@needs_data
def test_reports_and_figures(run):
    _, out = run
    reports = _reports(out)
    for name, report in reports.items():
        assert list(report.tasks) == SMOKE["tasks"] and report.limit == SMOKE["limit"]
        assert report.sparsity is None if name == "dense" else report.sparsity["p"] == SMOKE["settings"][name]
        for t in report.tasks.values():
            assert t.n_items == SMOKE["limit"] and t.tokens > 0
    for task in SMOKE["tasks"]:
        ratios = [reports[n].tasks[task].activation_ratio for n in ("dense", "p1", "p10")]
        assert ratios[0] == 1.0 and 1.0 > ratios[1] > ratios[2] > 0.2  # sparser with p, really sparse
    for fig in ("score_drop_vs_activation", "committed_score_drop_vs_activation"):
        assert (out / f"{fig}.png").stat().st_size > 10_000


@pytest.mark.notebook
@pytest.mark.real_model
@needs_data
def test_numbers_recomputed_with_the_package(run, smollm2):
    """COPA dense and PPL-10% again, here: same accuracy, same activation ratio, same tokens."""
    _, out = run
    reports = _reports(out)
    sparsity = SparsityReport.load(RESULT)
    for name in ("dense", "p10"):
        p = SMOKE["settings"][name]
        again = evaluation.evaluate_model(smollm2, ["copa"], data_dir=DATA, limit=SMOKE["limit"],
                                          sparsity=None if p is None else sparsity, p=p).tasks["copa"]
        saved = reports[name].tasks["copa"]
        assert again.metrics == saved.metrics
        assert again.tokens == saved.tokens
        assert again.activation_ratio == pytest.approx(saved.activation_ratio, abs=1e-9)


@pytest.mark.notebook
@pytest.mark.real_model
@needs_data
def test_headline_prints_the_saved_scores(run):
    executed, out = run
    text = headline_text(executed)[0]
    reports = _reports(out)
    for report in reports.values():
        block = text.split(f"--- {report.setting}\n", 1)[1].split("---", 1)[0]
        for task, t in report.tasks.items():
            line = next(row for row in block.splitlines() if row.startswith(task))
            nums = numbers_in(line)
            assert nums[0] == t.n_items
            assert nums[1] == pytest.approx(t.metrics["acc"], abs=5e-5)
            assert nums[-2] == pytest.approx(t.activation_ratio, abs=5e-5)


@pytest.mark.notebook
@pytest.mark.real_model
@needs_data
def test_against_reference(run):
    _, out = run
    values = {name: {task: {"acc": t.metrics["acc"], "activation_ratio": t.activation_ratio, "tokens": t.tokens}
                     for task, t in report.tasks.items()} for name, report in _reports(out).items()}
    check_reference(values, "notebook_06",
                    about="notebook 06 in smoke mode: SmolLM2 (Q4_1 GGUF, float32, CPU) on the first 6 COPA and PIQA "
                          "items, dense and at PPL-1/10% of data/results/smollm2_pydoc_8192.json",
                    parameters=PARAMETERS,
                    tolerance={"default": {"rtol": 0.0, "atol": 1e-9}, "activation_ratio": {"rtol": 0.0, "atol": 1e-4}})


@pytest.mark.notebook
@needs_data
def test_committed_table_is_complete():
    """data/results/eval/: dense and PPL-1/5/10% for the seven tasks, the same items in every setting."""
    reports = [evaluation.EvalReport.load(p) for p in sorted(COMMITTED.glob("*.json"))]
    frame = evaluation.scores_frame(reports)
    assert sorted(frame["task"].unique()) == sorted(evaluation.DEFAULT_TASKS)
    assert sorted(frame["p"].unique()) == [0.0, 1.0, 5.0, 10.0]
    assert (frame.groupby("task")["n_items"].nunique() == 1).all()
    for r in reports:
        data = json.loads(json.dumps(r.to_dict()))
        assert data["model"]["spec"] == "smollm2" and data["lm_eval_version"] == "0.4.13"
        assert r.sparsity is None or r.sparsity["file"] == "data/results/smollm2_pydoc_8192.json"
