"""`sparsing track`: Algorithm 1 over a tiny run's checkpoints, checked against brute force, and bad input."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _lab import tiny_config, write_tiny_corpus

from sparsing_utils import cli, runs
from sparsing_utils.checkpoints import list_checkpoints, load_checkpoint_model
from sparsing_utils.shards import open_corpus
from sparsing_utils.tracking import DEAD_FREQUENCY, throughput_summary, track
from sparsing_utils.trainer import train

P = 1.0
TOL = 2e-3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(1)
    corpus = write_tiny_corpus(tmp_path_factory.mktemp("corpus"))
    return train(tiny_config(corpus), tmp_path_factory.mktemp("runs") / "tiny", device="cpu", progress=False)


@pytest.fixture(scope="module")
def tracked(run, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("result") / "sweep" / "tiny.json"
    assert cli.main(["track", "--run", str(run), "--p", str(P), "--out", str(out), "--tokens", "1024",
                     "--block-len", "16", "--pattern-tokens", "512", "--token-set", "64", "--device", "cpu",
                     "--tol", str(TOL), "--sweep", "tests", "--pareto", "0.3,0.05,0.15", "--quiet"]) == 0
    return out


def _sparse_pass(model, ids: torch.Tensor, thresholds) -> tuple[list[float], float, torch.Tensor]:
    """Brute force, independent of the package's hooks: on every layer zero the neurons with
    |a_i| * ||W_down[:, i]|| <= eps_l before down_proj; count the rest. Returns per-layer
    activation ratios, the sparse PPL and per-token ratios (mean over layers)."""
    layers = model.model.layers
    counts = [torch.zeros(ids.numel()) for _ in layers]  # [tokens] per layer
    handles = []
    for i, layer in enumerate(layers):
        col = layer.mlp.down_proj.weight.norm(dim=0)  # [d_ff]

        def pre(module, args, i=i, col=col):
            a = args[0]  # [batch, seq, d_ff]
            keep = a.abs() * col > thresholds[i]
            counts[i] += keep.sum(-1).flatten().float()
            return (a * keep,)

        handles.append(layer.mlp.down_proj.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    d_ff = layers[0].mlp.down_proj.in_features
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    per_token = torch.stack(counts).mean(0) / d_ff
    return [float(c.sum()) / (ids.numel() * d_ff) for c in counts], math.exp(float(nll)), per_token


def test_one_cett_for_the_run_and_the_mean_ppl_ratio(tracked):
    r = json.loads(tracked.read_text())
    t = r["tracking"]
    assert r["format"] == "sparsing-run/1" and r["sweep"] == "tests" and t["converged"], t["message"]
    searched = [c for c in r["checkpoints"] if c["in_search"]]
    assert [c["name"] for c in searched] == t["search_checkpoints"]
    assert {c["stage"] for c in searched} == {"stable"} and len(searched) >= 15
    assert np.mean([c["ppl_ratio"] for c in searched]) == pytest.approx(t["mean_ppl_ratio"], abs=1e-6)
    assert not any("activation_ratio_ran" in c or "layer_activation_ratio_ran" in c for c in r["checkpoints"])
    assert abs(t["mean_ppl_ratio"] - (1 + P / 100)) <= TOL
    for c in r["checkpoints"]:  # every checkpoint, searched or not, at the same c: each layer's CETT is c
        assert np.allclose(c["layer_cett"], t["cett"], atol=2e-4), c["name"]
    stages = [c["stage"] for c in r["checkpoints"]]
    assert stages[0] == "warmup" and stages[-1] == "decay" and r["checkpoints"][-1]["tokens"] == 16 * 8 * 40
    assert tracked.stat().st_size < 2e6


def test_per_layer_ratios_match_a_brute_force_sparse_pass(run, tracked):
    r = json.loads(tracked.read_text())
    rec = r["checkpoints"][len(r["checkpoints"]) // 2]
    ck = {c.name: c for c in list_checkpoints(run)}[rec["name"]]
    model = load_checkpoint_model(ck)
    text = r["tracking"]["text"]
    blocks = open_corpus(r["config"]["corpus"]).heldout_blocks(text["tokens_by_domain"], text["block_len"])
    ratios, ppl, _ = _sparse_pass(model, blocks.input_ids, rec["thresholds"])
    np.testing.assert_allclose(rec["layer_activation_ratio"], ratios, atol=2e-4)
    assert rec["activation_ratio"] == pytest.approx(np.mean(ratios), abs=2e-4)
    assert rec["ppl_sparse"] == pytest.approx(ppl, rel=1e-4)
    with torch.no_grad():
        logits = model(input_ids=blocks.input_ids).logits
    dense = math.exp(float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1),
                                                             blocks.input_ids[:, 1:].flatten())))
    assert rec["ppl_dense"] == pytest.approx(dense, rel=1e-5)
    assert rec["heldout_loss"] == ck.state["heldout_loss"] and rec["train_loss"] == ck.state["train_loss"]


def test_patterns_per_domain_and_token_set(run, tracked):
    r = json.loads(tracked.read_text())
    pats = r["patterns"]["checkpoints"]
    stable = [c for c in r["checkpoints"] if c["stage"] == "stable"]
    assert [p["name"] for p in pats] == [stable[-1]["name"], r["checkpoints"][-1]["name"]]
    final = pats[-1]
    model = load_checkpoint_model(list_checkpoints(run)[-1])
    corpus = open_corpus(r["config"]["corpus"])
    all_freq = []
    for domain in ("code", "prose"):
        d = final["domains"][domain]
        freq = np.array(d["neuron_frequency"])  # [layers, d_ff]
        assert freq.shape == (2, 37) and d["n_tokens"] == 512
        blocks = corpus.heldout_blocks({domain: 512}, 16)
        ratios, _, per_token = _sparse_pass(model, blocks.input_ids, final["thresholds"])
        np.testing.assert_allclose(freq.mean(axis=1), ratios, atol=5e-4)
        assert d["activation_ratio"] == pytest.approx(np.mean(ratios), abs=2e-4)
        assert d["dead_share"] == pytest.approx(np.mean(freq < DEAD_FREQUENCY), abs=1 / 74)
        np.testing.assert_allclose(final["token_activation_ratio"][domain], per_token[:64].numpy(), atol=2e-3)
        ids = blocks.input_ids.flatten()[:64]
        assert r["patterns"]["token_ids"][domain] == ids.tolist()  # the token set, recorded once per domain
        by_id = runs.token_ratios(runs.load_run(tracked), domain, "final", by="vocabulary")
        for tok in ids.unique().tolist():  # Fig. 10 per vocabulary token: the mean over that id's positions
            assert by_id[tok] == pytest.approx(float(per_token[:64][ids == tok].mean()), abs=2e-3)
        all_freq.append(freq)
    assert final["dead_share_all"] == pytest.approx(np.mean(np.mean(all_freq, axis=0) < DEAD_FREQUENCY), abs=1 / 74)


def test_pareto_points_of_the_final_checkpoint_match_a_brute_force_pass(run, tracked):
    """``--pareto``: one exact-threshold sparse pass per CETT target on the final checkpoint, in
    ascending order, each equal to the independent brute-force pass at that target's thresholds."""
    import sparsing_utils as su

    r = json.loads(tracked.read_text())
    par = r["pareto"]
    final = list_checkpoints(run)[-1]
    assert par["name"] == final.name == r["checkpoints"][-1]["name"]
    assert [row["value"] for row in par["rows"]] == [0.05, 0.15, 0.3] and {row["rule"] for row in par["rows"]} == {"cett"}
    ratios = [row["activation_ratio"] for row in par["rows"]]
    assert ratios[0] > ratios[1] > ratios[2] > 0  # a larger CETT target cuts more neurons
    text = r["tracking"]["text"]
    blocks = open_corpus(r["config"]["corpus"]).heldout_blocks(text["tokens_by_domain"], text["block_len"])
    model = load_checkpoint_model(final)
    eps, _ = su.SparsityProbe(model, blocks).thresholds_for(0.15)
    layer_ratios, ppl, _ = _sparse_pass(model, blocks.input_ids, eps.tolist())
    row = par["rows"][1]
    assert row["activation_ratio"] == pytest.approx(float(np.mean(layer_ratios)), abs=1e-5)
    assert row["ppl"] == pytest.approx(ppl, rel=1e-4)
    assert row["ppl_ratio"] == pytest.approx(ppl / par["ppl_dense"], rel=1e-4)


def test_run_summary_merges_the_training_log(run, tracked):
    r = json.loads(tracked.read_text())
    s = throughput_summary(run)
    assert r["throughput"]["tokens_per_s"] == s["tokens_per_s"] > 0 and r["throughput"]["world_size"] == 1
    assert r["loss_curve"]["tokens"][-1] == 16 * 8 * 40 and len(r["loss_curve"]["loss"]) == 40
    assert r["config"]["activation"] == "relu" and r["plan"]["non_embedding_params"] > 0
    assert r["code_version"]["tracking"]["package"] and r["corpus"]["vocab_size"] == 97


def test_track_refuses_bad_runs_before_any_work(run, tmp_path, capsys):
    n_before = len(list_checkpoints(run))
    out = tmp_path / "r.json"
    assert cli.main(["track", "--run", str(tmp_path), "--out", str(out)]) == 2
    assert "not a training run folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    shutil.copytree(run, empty, ignore=shutil.ignore_patterns("tokens-*"))
    with pytest.raises(ValueError, match="no complete checkpoint yet"):
        track(empty, out=out, device="cpu")
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    victim = list_checkpoints(broken)[5].path / "model.safetensors"
    with open(victim, "r+b") as fh:
        fh.truncate(victim.stat().st_size // 2)
    assert cli.main(["track", "--run", str(broken), "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert victim.parent.name in err and "is corrupt" in err
    with pytest.raises(ValueError, match="p must be"):
        track(run, p=0, out=out, device="cpu")
    assert not out.exists()
    assert len(list_checkpoints(run)) == n_before  # nothing of the run was touched


def test_moe_run_records_the_ratio_over_the_experts_that_ran(tmp_path, capsys):
    """A Mixtral-style run (5 experts of width 13, top-2): every checkpoint record carries the
    activation ratio over the experts that ran, per layer and overall, equal to the metric's
    (``SparsityProbe.sparse_pass``) at the record's thresholds on the same held-out blocks, and
    larger than the ratio over all expert neurons; the printed table gets a ``ran ratio`` column.
    (The dense run's records have no such field: test above.)"""
    import sparsing_utils as su

    torch.set_num_threads(1)
    corpus = write_tiny_corpus(tmp_path / "corpus")
    cfg = tiny_config(corpus, num_experts=5, experts_top_k=2, d_ff=13, activation="silu", total_tokens=16 * 8 * 24,
                      name="tiny-moe")
    run = train(cfg, tmp_path / "moe", device="cpu", progress=False)
    out = tmp_path / "moe.json"
    assert cli.main(["track", "--run", str(run), "--p", "5", "--out", str(out), "--tokens", "512", "--block-len", "16",
                     "--pattern-tokens", "256", "--token-set", "32", "--device", "cpu", "--tol", "5e-3",
                     "--pareto", "0.1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "ran ratio" in printed
    r = json.loads(out.read_text())
    text = r["tracking"]["text"]
    blocks = open_corpus(r["config"]["corpus"]).heldout_blocks(text["tokens_by_domain"], text["block_len"])
    by_name = {c.name: c for c in list_checkpoints(run)}
    assert len(r["checkpoints"]) >= 4 and any(not c["in_search"] for c in r["checkpoints"])
    for rec in r["checkpoints"]:
        assert len(rec["layer_activation_ratio_ran"]) == 2
        assert rec["activation_ratio_ran"] == pytest.approx(np.mean(rec["layer_activation_ratio_ran"]), abs=1e-5)
        assert 0 < rec["activation_ratio"] < rec["activation_ratio_ran"] <= 1
    searched = [c for c in r["checkpoints"] if c["in_search"]]
    for rec in (r["checkpoints"][0], searched[-1]):  # the warmup one (measured at the run's c) and a searched one
        assert not rec["in_search"] or rec is searched[-1]
        model = load_checkpoint_model(by_name[rec["name"]])
        stats = su.SparsityProbe(model, blocks).sparse_pass(su.CETTRule(rec["thresholds"]))
        np.testing.assert_allclose(rec["layer_activation_ratio_ran"], stats.layer_active_ran.tolist(), atol=1e-5)
        np.testing.assert_allclose(rec["layer_activation_ratio"], stats.layer_active.tolist(), atol=1e-5)
    # Fig. 2 points: one per number of routed experts; with the trained top-2 the model is unchanged
    # (PPL ratio 1, 2 of 5 experts' neurons), with all 5 every expert neuron counts as active
    experts = {row["value"]: row for row in r["pareto"]["rows"] if row["rule"] == "experts"}
    assert sorted(experts) == [1, 2, 3, 4, 5]
    assert experts[2]["ppl_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert experts[2]["activation_ratio"] == pytest.approx(2 / 5, abs=1e-6)
    assert experts[5]["activation_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert all(experts[k]["activation_ratio_ran"] == pytest.approx(1.0, abs=1e-6) for k in experts)


def test_token_set_script_recovers_the_recorded_token_ids(run, tracked, tmp_path):
    """scripts/heldout_token_ids.py reads the same ids from the corpus as track recorded (Fig. 10 by
    vocabulary token for results written before track recorded them)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import heldout_token_ids

    r = json.loads(tracked.read_text())
    out = tmp_path / "ids.json"
    assert heldout_token_ids.main(["--corpus", r["config"]["corpus"], "--token-set", "64", "--block-len", "16",
                                   "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["token_ids"] == r["patterns"]["token_ids"]
    assert got["corpus"]["train_tokens"] == r["corpus"]["train_tokens"]
