"""``sparsing evaluate`` and :mod:`sparsing_utils.evaluation` / :mod:`sparsing_utils.eval_tasks` (issue 9).

* The offline tasks: hand-written one-item files in each local format give exactly the prompts,
  choices and targets of lm-eval's standard tasks (written out here from their YAMLs).
* The harness's dense accuracy (and every item's log-likelihood) equals an independent
  computation in this file, on a tiny random Llama with a character tokenizer, and on a few real
  PIQA/COPA items with SmolLM2.
* A sparse run is sparse: activation ratio < 1, equal to the metric's
  (``SparsityProbe.sparse_pass(CETTRule(thresholds))``) on the token rows the harness scored, and
  its log-likelihoods are those of the model under ``sparse_inference``.
* Bad input (missing data, unknown task, p not in the result, a result of another model, hub tasks
  offline, an unwritable output) is refused before the model is loaded.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import Blocks, build_tiny_llama, build_tiny_tokenizer

pytest.importorskip("lm_eval", reason="lm-eval is an optional dependency: pip install 'sparsing-law[eval]'")

import sparsing_utils.models as models_module
from sparsing_utils import eval_tasks
from sparsing_utils.cli import main
from sparsing_utils.evaluation import (
    check_same_model,
    evaluate_model,
    run_evaluation,
)
from sparsing_utils.ffn import count_hooks, find_ffn_sites
from sparsing_utils.models import LoadedModel, load_model
from sparsing_utils.probe import SparsityProbe
from sparsing_utils.results import PPLPResult, SparsityReport, sparse_inference
from sparsing_utils.rules import CETTRule

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# -- tiny hand-written items, one file per local format ------------------------------------
PIQA = [("How do you dry a wet towel?", "Hang it in the sun.", "Put it in a bowl of water."),
        ("How to open a jar?", "Twist the lid.", "Paint the lid."),
        ("Keep bread fresh", "Seal it in a bag.", "Leave it open."),
        ("Cool a hot drink", "Add ice cubes.", "Add hot water.")]
PIQA_LABELS = [0, 0, 1, 0]
COPA = [{"query": "The glass fell off the table, therefore", "choices": ["it broke.", "it sang."], "gold": 0},
        {"query": "The boy was tired, because", "choices": ["he ran far.", "he slept well."], "gold": 0},
        {"query": "It started to rain, therefore", "choices": ["we opened umbrellas.", "the sun set."], "gold": 1}]


def write_items(root: Path) -> Path:
    """One small data folder in the layout of ../shared/data (every format)."""
    (root / "piqa").mkdir(parents=True)
    (root / "piqa" / "valid.jsonl").write_text(
        "".join(json.dumps({"goal": g, "sol1": a, "sol2": b}) + "\n" for g, a, b in PIQA))
    (root / "piqa" / "valid-labels.lst").write_text("".join(f"{y}\n" for y in PIQA_LABELS))
    (root / "copa").mkdir()
    (root / "copa" / "copa.jsonl").write_text("".join(json.dumps(x) + "\n" for x in COPA))
    (root / "siqa").mkdir()
    (root / "siqa" / "dev.jsonl").write_text(json.dumps(
        {"context": "Ann gave Bo a gift.", "question": "How would Bo feel?", "answerA": "sad",
         "answerB": "glad", "answerC": "bored"}) + "\n")
    (root / "siqa" / "dev-labels.lst").write_text("2\n")
    (root / "hellaswag").mkdir()
    import bz2

    with bz2.open(root / "hellaswag" / "hellaswag_val_full.txt.bz2", "wt", encoding="utf-8") as fh:
        fh.write("Baking: A man puts flour in a bowl. the man\n1\nsings.\nadds eggs.\nleaves.\nsleeps.\n"
                 "Home and Garden: How to water a plant. Fill a can. See [www.example.org] for more.\n0\n"
                 "Pour slowly.\nEat it.\nBurn it.\nSell it.\n")
    (root / "winogrande").mkdir()
    (root / "winogrande" / "winogrande.jsonl").write_text(json.dumps(
        {"context_options": ["Sam gave Sarah a book because Sam", "Sam gave Sarah a book because Sarah"],
         "continuation": "was generous.", "gold": 0}) + "\n")
    (root / "boolq").mkdir()
    (root / "boolq" / "boolq.jsonl").write_text(json.dumps(
        {"query": "Passage: Cats are mammals.\nQuestion: Note the Question: marker\nQuestion: are cats mammals?",
         "choices": ["no", "yes"], "gold": 1}) + "\n")
    (root / "lambada").mkdir()
    (root / "lambada" / "lambada_test.jsonl").write_text(
        json.dumps({"text": "He opened the door and saw his dog"}) + "\n")
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_items(tmp_path_factory.mktemp("evaldata"))


# -- the offline tasks are lm-eval's tasks ----------------------------------------------------

# what lm-eval's YAMLs make of the items above, written out by hand: (text, choices, target)
EXPECTED = {
    "piqa": ("Question: How do you dry a wet towel?\nAnswer:", ["Hang it in the sun.", "Put it in a bowl of water."],
             0),
    "siqa": ("Q: Ann gave Bo a gift. How would Bo feel?\nA:", ["sad", "glad", "bored"], 1),
    # ctx_b "the man" capitalised by lm-eval's process_docs
    "hellaswag": ("Baking: A man puts flour in a bowl. The man", ["sings.", "adds eggs.", "leaves.", "sleeps."], 1),
    # partial evaluation: doc_to_text is the gold index, the choices are the two contexts
    "winogrande": (0, ["Sam gave Sarah a book because Sam", "Sam gave Sarah a book because Sarah"], "was generous."),
    # no comma before the connector, a leading space in each choice (lm-eval's COPA utilities)
    "copa": ("The glass fell off the table therefore", [" it broke.", " it sang."], " it broke."),
    "boolq": ("Cats are mammals.\nQuestion: Note the Question: marker\nQuestion: are cats mammals?\nAnswer:",
              ["no", "yes"], 1),
    "lambada": ("He opened the door and saw his", None, " dog"),
}


@pytest.mark.parametrize("name", list(eval_tasks.LOCAL_TASKS))
def test_local_task_is_lm_evals_task(name, data_dir):
    task = eval_tasks.build_local_task(name, data_dir)
    assert task.config.task == eval_tasks.LOCAL_TASKS[name].lm_eval
    doc = task.eval_docs[0]
    text, choices, target = EXPECTED[name]
    assert task.doc_to_text(doc) == text
    if choices is not None:
        assert task.doc_to_choice(doc) == choices
    assert task.doc_to_target(doc) == target


def test_hellaswag_complete_context_and_lm_evals_cleaning(data_dir):
    """A WikiHow context ends a sentence (no ctx_b); lm-eval's cleaning drops the bracket the file kept."""
    task = eval_tasks.build_local_task("hellaswag", data_dir)
    doc = task.eval_docs[1]
    assert doc["ctx_b"] == ""
    assert task.doc_to_text(doc) == "Home and Garden: How to water a plant. Fill a can. See for more."


def test_local_task_metrics_follow_lm_eval(data_dir):
    metrics = {n: [m["metric"] for m in eval_tasks.build_local_task(n, data_dir).config.metric_list]
               for n in eval_tasks.LOCAL_TASKS}
    assert metrics["piqa"] == metrics["hellaswag"] == ["acc", "acc_norm"]
    assert metrics["copa"] == metrics["boolq"] == metrics["siqa"] == metrics["winogrande"] == ["acc"]
    assert metrics["lambada"] == ["perplexity", "acc"]


# -- dense: the harness equals an independent log-likelihood ------------------------------

def tiny_loaded(model=None) -> LoadedModel:
    return LoadedModel(model=model if model is not None else build_tiny_llama(seed=3), tokenizer=build_tiny_tokenizer(),
                       spec="tiny-llama", source="local", dtype="float32", device="cpu")


def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log P(continuation | context): tokenize the whole text, the continuation being the tokens past
    the context's own tokenization (trailing spaces of the context move to the continuation)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    n_ctx = len(tokenizer.encode(context))
    ids = torch.tensor([whole[:-1]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)  # [len-1, vocab]
    return float(sum(logp[i - 1, whole[i]] for i in range(n_ctx, len(whole))))


def independent(model, tokenizer, name: str) -> tuple[list[list[float]], float, float]:
    """Per-item choice log-likelihoods, accuracy and length-normalised accuracy (PIQA, COPA)."""
    if name == "piqa":
        items = [(f"Question: {g}\nAnswer:", [a, b], y) for (g, a, b), y in zip(PIQA, PIQA_LABELS)]
    else:  # COPA's choices start with a space, and lm-eval's target delimiter adds another
        items = [(x["query"].replace(", because", " because").replace(", therefore", " therefore"),
                  [" " + c for c in x["choices"]], x["gold"]) for x in COPA]
    lls, acc, acc_norm = [], 0, 0
    for ctx, choices, gold in items:
        ll = [loglikelihood(model, tokenizer, ctx, " " + c) for c in choices]
        lls.append(ll)
        acc += int(max(range(len(ll)), key=ll.__getitem__) == gold)
        acc_norm += int(max(range(len(ll)), key=lambda i: ll[i] / len(choices[i])) == gold)
    return lls, acc / len(items), acc_norm / len(items)


def harness_lls(report, name) -> list[float]:
    """lm-eval's log-likelihood of every choice of every item, flattened in item order."""
    items = sorted(report.samples[name]["items"], key=lambda s: s["doc_id"])
    return [float(r[0]) for s in items for r in s["filtered_resps"]]


def flat(lls: list[list[float]]) -> list[float]:
    return [x for row in lls for x in row]


def test_dense_accuracy_equals_independent_loglikelihood(data_dir):
    loaded = tiny_loaded()
    report = evaluate_model(loaded, ["piqa", "copa"], data_dir=data_dir, keep_samples=True, batch_size=3)
    for name in ("piqa", "copa"):
        lls, acc, acc_norm = independent(loaded.model, loaded.tokenizer, name)
        assert harness_lls(report, name) == pytest.approx(flat(lls), abs=1e-4)
        t = report.tasks[name]
        assert t.metrics["acc"] == pytest.approx(acc, abs=1e-12)
        if name == "piqa":
            assert t.metrics["acc_norm"] == pytest.approx(acc_norm, abs=1e-12)
        n = len(lls)
        assert t.n_items == t.n_items_total == n
        assert t.metrics["acc_stderr"] == pytest.approx(math.sqrt(acc * (1 - acc) / (n - 1)), abs=1e-12)
        assert t.activation_ratio == 1.0 and t.tokens > 0
    assert count_hooks(loaded.model) == 0


@pytest.mark.real_model
def test_dense_accuracy_on_real_items_with_smollm2(smollm2):
    """A few real PIQA and COPA items (read by path from ../shared/data) through SmolLM2's BPE."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"the offline evaluation data (third-party) are not at {SHARED_DATA}")
    report = evaluate_model(smollm2, ["piqa", "copa"], data_dir=SHARED_DATA, limit=3, keep_samples=True)
    piqa = eval_tasks.read_docs("piqa", SHARED_DATA)[:3]
    copa = eval_tasks.read_docs("copa", SHARED_DATA)[:3]
    cases = {"piqa": [(f"Question: {d['goal']}\nAnswer:", [" " + d["sol1"], " " + d["sol2"]], d["label"])
                      for d in piqa],
             "copa": [(d["premise"][:-1] + {"cause": " because", "effect": " therefore"}[d["question"]],
                       ["  " + d["choice1"], "  " + d["choice2"]], d["label"]) for d in copa]}
    for name, items in cases.items():
        lls = [[loglikelihood(smollm2.model, smollm2.tokenizer, ctx, c) for c in choices] for ctx, choices, _ in items]
        assert harness_lls(report, name) == pytest.approx(flat(lls), abs=2e-3)
        acc = sum(max(range(2), key=ll.__getitem__) == gold for ll, (_, _, gold) in zip(lls, items)) / len(items)
        assert report.tasks[name].metrics["acc"] == acc


# -- sparse: really sparse, and the metric's ratio on the same tokens ----------------------

def thresholds_at_median(model, tokenizer) -> list[float]:
    """Per-layer thresholds at the median neuron output norm of a short text (about half activated)."""
    ids = torch.tensor([tokenizer.encode("Question: How to open a jar?\nAnswer: Twist the lid.")])
    norms = {}
    from sparsing_utils.ffn import read_activations

    with read_activations(model, lambda site, a: norms.__setitem__(
            site.index, (a.abs() * site.column_norms()).flatten())), torch.no_grad():
        model(ids)
    return [float(norms[i].median()) for i in range(len(norms))]


def test_sparse_run_is_sparse_and_matches_the_metric(data_dir):
    loaded = tiny_loaded()
    eps = thresholds_at_median(loaded.model, loaded.tokenizer)
    result = PPLPResult(p=5.0, cett=0.1, activation_ratio=0.5, ppl_dense=1.0, ppl_sparse=1.05, ppl_ratio=1.05,
                        thresholds=eps, layer_activation_ratio=[0.5] * len(eps), layer_cett=[0.1] * len(eps))
    report = evaluate_model(loaded, ["piqa", "copa"], data_dir=data_dir, sparsity=result, keep_samples=True,
                            keep_tokens=True, batch_size=3)
    assert count_hooks(loaded.model) == 0
    assert report.setting == "PPL-5%" and report.sparsity["thresholds"] == eps
    for name in ("piqa", "copa"):
        t = report.tasks[name]
        rows = report.samples[name]["tokens"]
        assert t.tokens == sum(map(len, rows)) > 0
        assert 0.1 < t.activation_ratio < 0.95
        # the metric on the same token rows (padded blocks, padding excluded by the mask)
        width = max(map(len, rows))
        ids = torch.tensor([r + [2] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        stats = SparsityProbe(loaded.model, Blocks(ids, mask), batch_size=len(rows)).sparse_pass(CETTRule(eps))
        assert t.layer_activation_ratio == pytest.approx(stats.layer_active.tolist(), abs=1e-6)
        assert t.activation_ratio == pytest.approx(stats.activation_ratio, abs=1e-6)
    # and the scores are those of the model under sparse_inference (same hooks, same thresholds)
    with sparse_inference(loaded.model, result):
        lls, acc, _ = independent(loaded.model, loaded.tokenizer, "copa")
    assert harness_lls(report, "copa") == pytest.approx(flat(lls), abs=1e-4)
    assert report.tasks["copa"].metrics["acc"] == pytest.approx(acc, abs=1e-12)
    dense_lls, _, _ = independent(loaded.model, loaded.tokenizer, "copa")
    assert max(abs(a - b) for x, y in zip(lls, dense_lls) for a, b in zip(x, y)) > 1e-3  # sparsity changed them


# -- MoE models: the ratio over the experts that ran, as the metric counts it ---------------

def build_moe(family: str):
    """A tiny random MoE model of test_moe's ``family`` (odd widths; Qwen2-MoE: a gated shared
    expert and a dense first layer) on the character tokenizer's vocabulary, eager experts."""
    import transformers as tf
    from conftest import TINY_VOCAB
    from test_moe import COMMON, FAMILIES

    cfg_name, cls_name, extra = FAMILIES[family]
    config = getattr(tf, cfg_name)(**{**COMMON, **extra, "vocab_size": TINY_VOCAB, "max_position_embeddings": 512})
    config._experts_implementation = "eager"
    torch.manual_seed(4)
    return getattr(tf, cls_name)(config).float().eval()


def thresholds_at_median_ran(model, tokenizer) -> list[float]:
    """Per-layer thresholds at the median output norm of the neurons that ran (nonzero ``a``): about
    half of them activated (the plain median of an MoE layer's ``v`` is 0, the experts that did not run)."""
    from sparsing_utils.ffn import read_activations

    ids = torch.tensor([tokenizer.encode("Question: How to open a jar?\nAnswer: Twist the lid.")])
    norms = {}
    with read_activations(model, lambda site, a: norms.__setitem__(
            site.index, (a.abs() * site.column_norms()).flatten())), torch.no_grad():
        model(ids)
    return [float(norms[i][norms[i] > 0].median()) for i in range(len(norms))]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_moe_run_records_both_ratios_as_the_metric(family, data_dir):
    """On an MoE model the activation ratio during evaluation is counted both ways, each equal to the
    metric's (``SparsityProbe.sparse_pass``) on the token rows the harness ran; over the experts that
    ran it is the larger one; the dense run reports 1; the JSON and the table carry both."""
    model = build_moe(family)
    loaded = tiny_loaded(model)
    eps = thresholds_at_median_ran(model, loaded.tokenizer)
    layers = len(eps)
    result = PPLPResult(p=5.0, cett=0.1, activation_ratio=0.2, ppl_dense=1.0, ppl_sparse=1.05, ppl_ratio=1.05,
                        thresholds=eps, layer_activation_ratio=[0.2] * layers, layer_cett=[0.1] * layers,
                        activation_ratio_ran=0.5, layer_activation_ratio_ran=[0.5] * layers)
    report = evaluate_model(loaded, ["piqa", "copa"], data_dir=data_dir, sparsity=result, keep_tokens=True,
                            batch_size=3)
    assert count_hooks(model) == 0 and report.sparsity["activation_ratio_ran_measured"] == 0.5
    sites = find_ffn_sites(model)
    moe = [s.index for s in sites if s.moe is not None]
    assert moe and (family != "qwen2_moe" or len(moe) == layers - 1)  # Qwen2-MoE's layer 0 is a dense FFN
    for name in ("piqa", "copa"):
        t = report.tasks[name]
        rows = report.samples[name]["tokens"]
        width = max(map(len, rows))
        ids = torch.tensor([r + [2] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        stats = SparsityProbe(model, Blocks(ids, mask), batch_size=len(rows)).sparse_pass(CETTRule(eps))
        assert t.layer_activation_ratio == pytest.approx(stats.layer_active.tolist(), abs=1e-6)
        assert t.layer_activation_ratio_ran == pytest.approx(stats.layer_active_ran.tolist(), abs=1e-6)
        assert t.activation_ratio_ran == pytest.approx(stats.activation_ratio_ran, abs=1e-6)
        for i in moe:  # fewer neurons ran than the layer has: the ratio over those that ran is larger
            assert 0.2 < t.layer_activation_ratio_ran[i] < 0.9
            assert t.layer_activation_ratio_ran[i] > t.layer_activation_ratio[i] * 1.5
        for s in sites:
            if s.moe is None:  # a dense FFN layer counts the same both ways
                assert t.layer_activation_ratio_ran[s.index] == pytest.approx(t.layer_activation_ratio[s.index])
        d = report.to_dict()["tasks"][name]
        assert d["activation_ratio_ran"] == t.activation_ratio_ran and len(d["layer_activation_ratio_ran"]) == layers
    assert "ran ratio" in report.table()
    dense = evaluate_model(loaded, ["copa"], data_dir=data_dir, batch_size=3).tasks["copa"]
    assert dense.activation_ratio == dense.activation_ratio_ran == 1.0


# -- the command line, end to end, and bad input ------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(seed=3).save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory, tiny_dir):
    """A SparsityReport of the tiny model (p = 1 and 5) with hand-set thresholds."""
    loaded = load_model(str(tiny_dir), dtype="float32", device="cpu")
    eps = thresholds_at_median(loaded.model, loaded.tokenizer)
    results = [PPLPResult(p=p, cett=0.1, activation_ratio=0.5, ppl_dense=1.0, ppl_sparse=1 + p / 100,
                          ppl_ratio=1 + p / 100, thresholds=[e * s for e in eps], layer_activation_ratio=[0.5] * 3,
                          layer_cett=[0.1] * 3) for p, s in ((1.0, 0.5), (5.0, 1.0))]
    path = tmp_path_factory.mktemp("result") / "result.json"
    SparsityReport(model=loaded.describe(), text={"source": "test"}, results=results, ppl_dense=1.0).save(path)
    return path


def test_cli_writes_eval_json(tmp_path, capsys, tiny_dir, tiny_result, data_dir):
    out = tmp_path / "eval.json"
    rc = main(["evaluate", "--model", str(tiny_dir), "--sparsity", str(tiny_result), "--p", "5", "--tasks",
               "copa,lambada", "--data-dir", str(data_dir), "--limit", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    d = json.loads(out.read_text())
    assert d["setting"] == "PPL-5%" and d["sparsity"]["p"] == 5.0 and d["sparsity"]["file"] == str(tiny_result)
    assert d["model"]["spec"] == str(tiny_dir) and d["limit"] == 2 and d["seconds"] > 0
    assert d["version"] and d["lm_eval_version"] == "0.4.13"
    copa, lam = d["tasks"]["copa"], d["tasks"]["lambada"]
    assert copa["n_items"] == 2 and copa["n_items_total"] == 3 and lam["n_items"] == lam["n_items_total"] == 1
    assert set(copa["metrics"]) == {"acc", "acc_stderr"}
    assert set(lam["metrics"]) == {"perplexity", "perplexity_stderr", "acc", "acc_stderr"}
    for t in (copa, lam):
        assert 0 < t["activation_ratio"] < 1 and len(t["layer_activation_ratio"]) == 3 and t["tokens"] > 0
        assert "activation_ratio_ran" not in t and "layer_activation_ratio_ran" not in t  # dense model: unchanged
    assert "activation_ratio_ran_measured" not in d["sparsity"]
    assert "copa" in printed and "written:" in printed and "ran ratio" not in printed


def lambada_ll(tiny_dir, data_dir) -> float:
    loaded = load_model(str(tiny_dir), dtype="float32", device="cpu")
    return loglikelihood(loaded.model, loaded.tokenizer, "He opened the door and saw his", " dog")


def test_dense_lambada_perplexity_is_exp_of_minus_loglikelihood(tiny_dir, data_dir):
    loaded = load_model(str(tiny_dir), dtype="float32", device="cpu")
    report = evaluate_model(loaded, ["lambada"], data_dir=data_dir)
    assert report.tasks["lambada"].metrics["perplexity"] == pytest.approx(math.exp(-lambada_ll(tiny_dir, data_dir)),
                                                                           rel=1e-4)


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(models_module, "load_model", refuse)


@pytest.mark.parametrize("case, message", [
    ({"data_dir": "MISSING"}, "data directory"),
    ({"tasks": ["piqa", "arc_easy"]}, "no local data for the task 'arc_easy'"),
    ({"tasks": ["copa"], "data_dir": "EMPTY"}, "copa/copa.jsonl"),
    ({"p": 3.0}, "p=3 is not in"),
    ({"p": None}, "--sparsity needs --p"),
    ({"sparsity_file": None}, "--p without --sparsity"),
    ({"model": "smollm2"}, "measured on a different model"),
    ({"sparsity_file": "MISSING"}, "not found"),
    ({"out": "/proc/eval.json"}, "cannot write the output"),
    ({"limit": 0}, "--limit"),
])
def test_bad_input_is_refused_before_model_work(no_model_loading, tmp_path, tiny_dir, tiny_result, data_dir,
                                                case, message):
    kwargs = {"model": str(tiny_dir), "tasks": ["piqa", "copa"], "data_dir": data_dir, "sparsity_file": tiny_result,
              "p": 1.0, "out": tmp_path / "eval.json", **case}
    if kwargs["data_dir"] == "MISSING":
        kwargs["data_dir"] = tmp_path / "no-such-data"
    if kwargs["data_dir"] == "EMPTY":
        (tmp_path / "empty").mkdir()
        kwargs["data_dir"] = tmp_path / "empty"
    if kwargs["sparsity_file"] == "MISSING":
        kwargs["sparsity_file"] = tmp_path / "no-result.json"
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("(", r"\(")):
        run_evaluation(**kwargs)
    assert not (tmp_path / "eval.json").exists()


def test_hub_tasks_offline_name_data_dir(no_model_loading, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="--data-dir"):
        run_evaluation("smollm2", ["piqa"], data_dir=None, out=tmp_path / "e.json")


def test_cli_error_exit_code(tmp_path, capsys, data_dir):
    rc = main(["evaluate", "--tasks", "copa", "--data-dir", str(tmp_path / "nothing"),
               "--out", str(tmp_path / "e.json")])
    assert rc == 2 and "data directory" in capsys.readouterr().err


def test_result_of_another_model_is_refused(data_dir, tiny_result):
    """The architecture facts of the result's model block are compared with the loaded model."""
    report = SparsityReport.load(tiny_result)
    other = tiny_loaded(build_tiny_llama(seed=3))
    other.spec = report.model["spec"]  # same name, other model: 3 layers of width 37, but other n_params
    other.model.config.intermediate_size = 36
    with pytest.raises(ValueError, match="d_ff 37 .result. vs 36"):
        evaluate_model(other, ["copa"], data_dir=data_dir, sparsity=report, p=1.0)
    assert count_hooks(other.model) == 0


def test_check_same_model_fields():
    block = {"spec": "smollm2", "path": "/a/m.gguf", "architecture": "LlamaForCausalLM", "n_layers": 30, "d_ff": 1536,
             "weights": "Q4_1 GGUF dequantized to float32"}
    check_same_model(block, {**block, "path": "/elsewhere/m.gguf"})  # same spec, another machine
    check_same_model(block, {**block, "spec": "/a/m.gguf"})  # same file under another spec
    check_same_model({k: v for k, v in block.items() if k != "weights"}, block)  # older results lack "weights"
    for key, value in (("n_layers", 24), ("weights", "bfloat16 checkpoint loaded in float32"),
                       ("architecture", "Qwen2ForCausalLM")):
        with pytest.raises(ValueError, match=key):
            check_same_model(block, {**block, key: value})
    with pytest.raises(ValueError, match="model 'smollm2'"):
        check_same_model(block, {"spec": "Qwen/Qwen2.5-0.5B", "path": ""})



def test_sparse_inference_record_sees_every_layer_mask():
    """results.sparse_inference passes ``record`` to apply_rule: one [batch, seq, d_ff] mask per layer."""
    model, seen = build_tiny_llama(seed=5), {}
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    eps = thresholds_at_median(model, build_tiny_tokenizer())
    with sparse_inference(model, eps, record=lambda site, keep: seen.__setitem__(site.index, keep)), torch.no_grad():
        model(ids)
    assert sorted(seen) == [0, 1, 2]
    assert all(k.shape == (2, 4, 37) and k.dtype == torch.bool and 0 < k.float().mean() < 1 for k in seen.values())
    assert count_hooks(model) == 0
