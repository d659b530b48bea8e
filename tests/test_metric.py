"""PPL-p% sparsity end to end on a tiny *trained* Llama (issue 2, items 5, 7, 10 and 11).

A random model's PPL barely moves when its FFN is sparsified, so these tests use the
``trained_llama`` fixture (conftest): a tiny Llama trained for a few seconds on a
second-order Markov chain, evaluated on 1,024 held-out tokens (16 blocks of 64). Every
headline number is re-derived here independently: dense and sparse PPL from the model's
logits, per-layer CETT from activations captured by the test's own hooks (float64), and
activation ratios from a sparse forward whose masking the test does itself.
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import os

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import Blocks
from torch import nn

from sparsing_utils.ffn import count_hooks, find_ffn_sites
from sparsing_utils.jsonio import atomic_write_json
from sparsing_utils.measure import measure_probe
from sparsing_utils.pareto import fat_eps_for, pareto_from_search, pareto_sweep
from sparsing_utils.probe import SparsityProbe
from sparsing_utils.results import (
    CheckpointResult,
    PPLPResult,
    SparsityReport,
    sparse_inference,
)
from sparsing_utils.rules import CETTRule, apply_rule
from sparsing_utils.search import (
    EvaluationTable,
    activation_uncertainty,
    search_checkpoints,
    search_ppl_p,
)

D_FF = 37


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def probe(trained_llama):
    return SparsityProbe(trained_llama.model, trained_llama.blocks(), name="trained")


@pytest.fixture(scope="module")
def searched(probe):
    return {p: search_ppl_p(probe, p) for p in (1, 5)}


# -- independent reference computations -------------------------------------------------


def ppl_of(model, ids, mask=None) -> tuple[float, int]:
    """(sum of next-token NLL, count) over real tokens, from the model's logits."""
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.double()
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    valid = (mask[:, 1:] * mask[:, :-1]).reshape(-1).bool()
    return float(nll[valid].sum()), int(valid.sum())


def _captured(model, ids, modules, *, inputs: bool) -> list[torch.Tensor]:
    """One no-grad pass of ``ids``: each module's input (``inputs=True``) or output, ``[tokens, d_ff]``
    float64, caught with the test's own hooks (removed in ``finally``), not the package's."""
    caught: list[list[torch.Tensor]] = [[] for _ in modules]
    handles = []
    try:
        for module, box in zip(modules, caught):
            if inputs:
                handles.append(module.register_forward_pre_hook(
                    lambda m, args, _box=box: _box.append(args[0].detach().reshape(-1, D_FF))))
            else:
                handles.append(module.register_forward_hook(
                    lambda m, args, y, _box=box: _box.append(y.detach().reshape(-1, D_FF))))
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(box).double() for box in caught]


def dense_activations(model, ids):
    """Each layer's FFN activation vector a ``[tokens, d_ff]`` (test's own hooks) and W_down^T."""
    sites = find_ffn_sites(model)
    acts = _captured(model, ids, [s.module for s in sites], inputs=True)  # W_down's input is a
    return acts, [s.module.weight.detach().double().T for s in sites]


def brute_layer_cett(a, w_t, eps: float) -> float:
    """Mean over tokens of ||sum_{n_i <= eps} a_i W[:, i]|| / ||W a|| in float64."""
    n = a.abs() * w_t.norm(dim=1)
    y = (a @ w_t).norm(dim=-1)
    num = ((a * (n <= eps)) @ w_t).norm(dim=-1)
    return float(torch.where(y > 0, num / y, torch.zeros_like(y)).mean())


def manual_sparse_forward(model, ids, thresholds):
    """Sparse forward with the test's own hooks: zero a_i where |a_i|*||W[:, i]|| <= eps_l.
    Returns (ppl, per-layer activation ratio, per-token activation ratio over layers)."""
    counts, handles = {}, []
    sites = find_ffn_sites(model)
    for s in sites:
        norms = s.module.weight.detach().double().norm(dim=0)  # ||W_down[:, i]||, Linear [d_model, d_ff]

        def pre(m, args, _i=s.index, _norms=norms):
            a = args[0]
            keep = a.double().abs() * _norms > thresholds[_i]
            counts[_i] = keep.sum(dim=-1).double()  # [batch, seq]
            return (a * keep.to(a.dtype),)
        handles.append(s.module.register_forward_pre_hook(pre))
    try:
        nll, n = ppl_of(model, ids)
    finally:
        for h in handles:
            h.remove()
    layer = [float(counts[s.index].mean()) / D_FF for s in sites]
    per_token = torch.stack([counts[s.index].reshape(-1) for s in sites]).mean(dim=0) / D_FF
    return math.exp(nll / n), layer, per_token


# -- the search --------------------------------------------------------------------------


def test_dense_pass_matches_model_loss(trained_llama, probe):
    probe.prepare()
    nll, n = ppl_of(trained_llama.model, trained_llama.eval_ids)
    assert probe.dense.n_predicted == n == 16 * 63
    assert probe.n_tokens == 1024
    assert probe.dense.ppl == pytest.approx(math.exp(nll / n), rel=1e-6)
    assert 1.5 < probe.dense.ppl < 12  # the model has learned the chain (uniform would be 101)


def test_token_losses_in_chunks_brute_force(monkeypatch):
    """The passes' loss taken on a few blocks of float32 logits at a time: each token's NLL is
    -log_softmax at its target (float64 brute force), 0 at ignored targets, and bitwise the same
    whatever the chunk (one block, three, all)."""
    import sparsing_utils.probe as probe_mod

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(7, 12, 37, generator=g).to(torch.bfloat16)  # [batch, seq, vocab], odd sizes
    target = torch.randint(0, 37, (7, 12), generator=g)
    target[2, 5:] = -100
    target[6, 0] = -100
    brute = -torch.log_softmax(logits.double(), dim=-1).gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    brute[target == -100] = 0.0
    got = {}
    for blocks in (1, 3, 7):
        monkeypatch.setattr(probe_mod, "LOSS_CHUNK_BYTES", blocks * 4 * 12 * 37)
        got[blocks] = probe_mod.token_losses(logits, target)
        assert got[blocks].dtype == torch.float32 and got[blocks].shape == (7, 12)
        assert torch.allclose(got[blocks].double(), brute, atol=1e-5, rtol=0)
    assert torch.equal(got[1], got[3]) and torch.equal(got[1], got[7])
    assert got[1][2, 5:].eq(0).all() and got[1][6, 0] == 0


def test_dense_pass_same_with_one_block_per_loss_chunk(trained_llama, monkeypatch):
    """The dense pass's per-token NLL and sum do not depend on how many blocks a loss chunk holds."""
    import sparsing_utils.probe as probe_mod

    out = []
    for chunk in (probe_mod.LOSS_CHUNK_BYTES, 1):  # the default (every block at once here), one block per chunk
        monkeypatch.setattr(probe_mod, "LOSS_CHUNK_BYTES", chunk)
        pr = SparsityProbe(trained_llama.model, trained_llama.blocks(), mode="memory")
        pr.prepare()
        out.append((pr.dense.nll_sum, pr.dense.token_nll.clone()))
        pr.release()
    assert out[0][0] == out[1][0]
    assert torch.equal(out[0][1], out[1][1])


def test_stream_dense_pass_keeps_only_the_guide_rows(trained_llama, monkeypatch):
    """Stream mode over several batches keeps each batch's guide rows as their own copies, never a view
    that holds the batch's whole activations (its memory grew with the tokens on the H200, session 10),
    and its curves are memory mode's."""
    import sparsing_utils.probe as probe_mod

    kept = []
    real = probe_mod._every_stride

    def spy(x, blocks, stride):
        out = real(x, blocks, stride)
        kept.append((stride, out.untyped_storage().nbytes(), out.numel() * out.element_size()))
        return out

    monkeypatch.setattr(probe_mod, "_every_stride", spy)
    curves = {}
    for mode in ("stream", "memory"):
        pr = SparsityProbe(trained_llama.model, trained_llama.blocks(), mode=mode, batch_size=3, curve_tokens=128)
        pr.prepare()
        curves[mode] = pr.curve
        pr.release()
    assert kept and all(stride == 8 for stride, _, _ in kept)  # 1,024 tokens / 128, blocks of 64
    assert all(held == own for _, held, own in kept)
    assert torch.equal(curves["stream"].eps, curves["memory"].eps)
    assert torch.equal(curves["stream"].cett, curves["memory"].cett)


@pytest.mark.parametrize("p", [1, 5])
def test_search_hits_target(probe, searched, p):
    r = searched[p]
    assert isinstance(r, PPLPResult)
    assert r.converged, r.message
    assert r.p == p and r.message == ""
    assert abs(r.ppl_ratio - (1 + p / 100)) <= 1e-3
    assert r.ppl_ratio == pytest.approx(r.ppl_sparse / r.ppl_dense, rel=1e-12)
    assert r.ppl_dense == pytest.approx(probe.dense.ppl, rel=1e-12)
    assert len(r.thresholds) == len(r.layer_activation_ratio) == len(r.layer_cett) == 2
    assert all(t > 0 for t in r.thresholds)
    # every layer's mean CETT at its threshold is the one target c
    for c in r.layer_cett:
        assert abs(c - r.cett) <= 1e-3
    again = probe.layer_cett(torch.tensor(r.thresholds))
    assert torch.allclose(again.double(), torch.tensor(r.layer_cett, dtype=torch.float64), atol=1e-5)
    # model-level ratio = mean over layers; per-token ratios average to it too
    assert r.activation_ratio == pytest.approx(sum(r.layer_activation_ratio) / 2, abs=1e-6)
    assert len(r.token_activation_ratio) == probe.n_tokens
    assert sum(r.token_activation_ratio) / probe.n_tokens == pytest.approx(r.activation_ratio, abs=1e-3)
    assert 0.05 < r.activation_ratio < 0.95
    assert r.sparsity_ratio == pytest.approx(1 - r.activation_ratio)


def test_more_ppl_loss_means_more_sparsity(searched):
    r1, r5 = searched[1], searched[5]
    assert r5.cett > r1.cett
    assert r5.activation_ratio < r1.activation_ratio
    assert all(t5 > t1 for t1, t5 in zip(r1.thresholds, r5.thresholds))


def chord_uncertainty(rows: list[dict], target: float, tol: float) -> float:
    """The test's own |d activation / d PPL ratio| x tol between the evaluated points nearest
    the target on either side (largest c below it, smallest c at or above it)."""
    lo = max((r for r in rows if r["ppl_ratio"] < target), key=lambda r: r["c"])
    hi = min((r for r in rows if r["ppl_ratio"] >= target), key=lambda r: r["c"])
    return abs((hi["activation_ratio"] - lo["activation_ratio"]) / (hi["ppl_ratio"] - lo["ppl_ratio"])) * tol


def test_activation_uncertainty_and_a_tighter_tolerance(trained_llama):
    """Each result says how precisely the PPL tolerance pins its activation ratio (issue 10):
    the chord between the bracketing evaluated points times ``tol``. A tighter ``tol`` lands
    within it and pins the activation ratio to a proportionally smaller band."""
    pr = SparsityProbe(trained_llama.model, trained_llama.blocks(), name="tol")
    loose_table, tight_table = EvaluationTable([pr]), EvaluationTable([pr])
    loose = search_ppl_p(pr, 5, evaluations=loose_table)
    tight = search_ppl_p(pr, 5, tol=3e-4, evaluations=tight_table)
    for r, table, tol in ((loose, loose_table, 1e-3), (tight, tight_table, 3e-4)):
        assert r.converged and abs(r.ppl_ratio - 1.05) <= tol, (tol, r.ppl_ratio)
        expected = chord_uncertainty(table.rows(), 1.05, tol)
        assert r.activation_ratio_uncertainty == pytest.approx(expected, rel=1e-9)
        assert 0 < r.activation_ratio_uncertainty < 0.05
        assert r.to_dict()["activation_ratio_uncertainty"] == r.activation_ratio_uncertainty
    assert tight.activation_ratio_uncertainty < loose.activation_ratio_uncertainty


def test_activation_uncertainty_rules():
    # (c, PPL ratio, activation ratio); target 1.01, tol 1e-3
    pts = [(0.05, 1.002, 0.70), (0.10, 1.008, 0.60), (0.20, 1.030, 0.40), (0.12, 1.0105, 0.58)]
    # bracket: largest c below (0.10) and smallest c at or above (0.12): |(-0.02) / 0.0025| x 1e-3
    assert activation_uncertainty(pts, 1.01, 1e-3) == pytest.approx(0.008)
    # no point above: the two nearest in PPL ratio, 1.008 and 1.002
    assert activation_uncertainty(pts[:2], 1.01, 1e-3) == pytest.approx(0.1 / 0.006 * 1e-3)
    assert activation_uncertainty(pts[:1], 1.01, 1e-3) is None  # one point: no slope
    assert activation_uncertainty([(0.1, 1.0, 0.6), (0.2, 1.0, 0.5)], 1.01, 1e-3) is None  # flat ratio


@pytest.mark.parametrize("tol", [0, -1e-3, float("nan"), float("inf"), 0.01, 0.5, "1e-3", True])
def test_bad_tol(probe, tol):
    with pytest.raises(ValueError, match="tol"):
        search_ppl_p(probe, 1, tol=tol)


def test_dense_pass_computed_once(probe, searched):
    assert probe.dense_passes == 1  # memory mode: the searches never rerun the dense model


def test_evaluation_table_is_shared_between_p_values(trained_llama):
    """One table for several p: the second search starts from every point the first evaluated,
    and each point is the mean PPL ratio of its own sparse pass."""
    pr = SparsityProbe(trained_llama.model, trained_llama.blocks(), name="shared")
    table = EvaluationTable([pr])
    r1 = search_ppl_p(pr, 1, evaluations=table)
    after_first = table.points()
    passes = pr.sparse_passes
    r5 = search_ppl_p(pr, 5, evaluations=table)
    assert table.points()[: len(after_first)] == after_first  # kept, in order
    assert pr.sparse_passes - passes == len(table) - len(after_first)  # only new points cost a pass
    assert r1.converged and r5.converged
    for c, ratio in table.points():
        ev = table.evaluate(c)
        assert ev.ratio == ratio == pytest.approx(ev.stats[0].ppl / pr.dense.ppl, rel=1e-12)
        assert torch.equal(ev.thresholds[0], pr.thresholds_for(c)[0])
    assert table.evaluate(r5.cett).stats[0].activation_ratio == r5.activation_ratio
    other = SparsityProbe(trained_llama.model, trained_llama.blocks(), name="other")
    with pytest.raises(ValueError, match="made for other probes"):
        search_ppl_p(other, 1, evaluations=table)


def test_new_target_after_release(trained_llama):
    """release() drops the stored activations of a memory-mode probe; a CETT target not
    computed before must still get exact thresholds (by a fresh dense pass, as in stream
    mode), equal to those of a probe that kept its activations."""
    model, blocks = trained_llama.model, trained_llama.blocks()
    kept = SparsityProbe(model, blocks, name="kept")
    released = SparsityProbe(model, blocks, name="released")
    for pr in (kept, released):
        pr.thresholds_for(0.05)  # the same history of exact points on both
    released.release()
    with pytest.raises(ValueError, match="before release"):
        released.activations(0)
    before = released.dense_passes
    eps_r, cett_r = released.thresholds_for(0.2)  # not cached: needs exact statistics
    eps_k, cett_k = kept.thresholds_for(0.2)
    assert released.dense_passes > before and kept.dense_passes == 1
    assert torch.allclose(eps_r, eps_k, rtol=1e-5)
    assert torch.allclose(cett_r, cett_k, atol=1e-6)
    assert torch.allclose(released.layer_cett(eps_k), kept.layer_cett(eps_k), atol=1e-6)
    r = search_ppl_p(released, 1)
    assert r.converged and abs(r.ppl_ratio - 1.01) <= 1e-3


@pytest.mark.parametrize("p", [1, 5])
def test_layer_cett_brute_force(trained_llama, searched, p):
    r = searched[p]
    acts, w_ts = dense_activations(trained_llama.model, trained_llama.eval_ids)
    for layer, (a, w_t) in enumerate(zip(acts, w_ts)):
        assert a.shape == (1024, D_FF)
        assert brute_layer_cett(a, w_t, r.thresholds[layer]) == pytest.approx(r.layer_cett[layer], abs=2e-5)


@pytest.mark.parametrize("p", [1, 5])
def test_activation_ratio_brute_force(trained_llama, searched, p):
    r = searched[p]
    ppl, layer, per_token = manual_sparse_forward(trained_llama.model, trained_llama.eval_ids, r.thresholds)
    assert ppl == pytest.approx(r.ppl_sparse, rel=1e-5)
    assert layer == pytest.approx(r.layer_activation_ratio, abs=1e-6)
    assert torch.allclose(per_token.float(), torch.tensor(r.token_activation_ratio), atol=1e-3)


def test_stream_mode_matches_memory_mode(trained_llama, searched):
    stream = SparsityProbe(trained_llama.model, trained_llama.blocks(), mode="stream", batch_size=5)
    r = search_ppl_p(stream, 1)
    m = searched[1]
    assert r.converged, r.message
    assert stream.dense_passes > 1  # stream mode recomputes the dense pass for exact statistics
    assert r.ppl_dense == pytest.approx(m.ppl_dense, rel=1e-6)
    # both hit the target; at the same c they pick the same thresholds
    assert abs(r.ppl_ratio - 1.01) <= 1e-3
    assert abs(r.cett - m.cett) < 0.01
    assert abs(r.activation_ratio - m.activation_ratio) < 0.01
    eps_s, cett_s = stream.thresholds_for(m.cett)
    assert torch.allclose(eps_s, torch.tensor(m.thresholds), rtol=2e-3)
    assert torch.allclose(cett_s, torch.tensor(m.layer_cett), atol=1.5e-4)
    # exact statistics at fixed thresholds agree to float precision
    eps = torch.tensor(m.thresholds)
    assert torch.allclose(stream.layer_cett(eps), torch.tensor(m.layer_cett), atol=1e-5)
    s = stream.sparse_pass(CETTRule(m.thresholds))
    assert s.layer_active.tolist() == pytest.approx(m.layer_activation_ratio, abs=1e-6)
    assert s.ppl == pytest.approx(m.ppl_sparse, rel=1e-5)


def test_padding_is_excluded(trained_llama):
    """Blocks whose tails are padding (attention_mask 0, garbage ids) give the same dense
    PPL, CETT statistics and activation ratios as the same real tokens without padding."""
    model = trained_llama.model
    ids = trained_llama.eval_ids[:8].clone()
    valid = [64, 51, 64, 64, 34, 64, 57, 64]
    mask = torch.ones_like(ids)
    garbage = torch.randint(3, 101, ids.shape, generator=torch.Generator().manual_seed(5))
    for b, v in enumerate(valid):
        mask[b, v:] = 0
        ids[b, v:] = garbage[b, v:]
    padded = SparsityProbe(model, Blocks(ids, mask), name="padded")
    parts = [SparsityProbe(model, Blocks(ids[b:b + 1, :v]), name=f"block{b}") for b, v in enumerate(valid)]
    padded.prepare()
    for pr in parts:
        pr.prepare()
    n_tokens = sum(valid)
    assert padded.n_tokens == sum(pr.n_tokens for pr in parts) == n_tokens
    # dense PPL
    assert padded.dense.n_predicted == sum(pr.dense.n_predicted for pr in parts) == n_tokens - 8
    assert padded.dense.nll_sum == pytest.approx(sum(pr.dense.nll_sum for pr in parts), rel=1e-6)
    # CETT statistics at fixed thresholds: token-weighted mean of the parts
    for c in (0.05, 0.2):
        eps, _ = padded.thresholds_for(c)
        joined = sum(pr.layer_cett(eps).double() * pr.n_tokens for pr in parts) / n_tokens
        assert torch.allclose(padded.layer_cett(eps).double(), joined, atol=1e-6)
        # activation ratio (layer, token) and sparse PPL
        rule = CETTRule(eps)
        sp = padded.sparse_pass(rule)
        sparts = [pr.sparse_pass(rule) for pr in parts]
        active = sum(s.layer_active.double() * pr.n_tokens for s, pr in zip(sparts, parts)) / n_tokens
        assert torch.allclose(sp.layer_active.double(), active, atol=1e-6)
        assert torch.equal(sp.token_active, torch.cat([s.token_active for s in sparts]))
        assert sp.token_active.numel() == n_tokens
        assert sp.nll_sum == pytest.approx(sum(s.nll_sum for s in sparts), rel=1e-6)
    # what sits in the padded positions does not matter at all
    ids2 = ids.clone()
    ids2[mask == 0] = 2
    other = SparsityProbe(model, Blocks(ids2, mask)).prepare()
    assert other.dense.nll_sum == pytest.approx(padded.dense.nll_sum, rel=1e-9)
    eps, _ = padded.thresholds_for(0.1)
    assert torch.allclose(other.layer_cett(eps), padded.layer_cett(eps), atol=1e-7)


def test_search_with_padding_converges(trained_llama):
    ids = trained_llama.eval_ids.clone()
    mask = torch.ones_like(ids)
    mask[::3, 40:] = 0
    ids[mask == 0] = 2
    r = search_ppl_p(SparsityProbe(trained_llama.model, Blocks(ids, mask)), 1)
    assert r.converged, r.message
    assert len(r.token_activation_ratio) == int(mask.sum())


# -- Algorithm 1 ---------------------------------------------------------------------------


def test_algorithm_1_over_checkpoints(trained_llama):
    probes = [SparsityProbe(trained_llama.early, trained_llama.blocks(), name="step120"),
              SparsityProbe(trained_llama.model, trained_llama.blocks(), name="step300")]
    res = search_checkpoints(probes, p=1)
    assert isinstance(res, CheckpointResult)
    assert res.converged, res.message
    assert res.names == ["step120", "step300"]
    ratios = [c.ppl_ratio for c in res.checkpoints]
    assert res.mean_ppl_ratio == pytest.approx(sum(ratios) / 2, rel=1e-12)
    assert abs(res.mean_ppl_ratio - 1.01) <= 1e-3
    assert abs(ratios[0] - ratios[1]) > 1e-3  # each checkpoint alone is not at 1.01: the *mean* is
    for ck, pr in zip(res.checkpoints, probes):
        assert ck.cett == res.cett  # one shared CETT
        assert all(abs(c - res.cett) <= 1e-3 for c in ck.layer_cett)
        assert torch.allclose(pr.layer_cett(torch.tensor(ck.thresholds)), torch.tensor(ck.layer_cett), atol=1e-5)
        assert ck.ppl_ratio == pytest.approx(ck.ppl_sparse / pr.dense.ppl, rel=1e-12)
    # the two models get different thresholds (and activation ratios) at that shared c
    assert res.checkpoints[0].thresholds != res.checkpoints[1].thresholds
    d = res.to_dict()
    assert d["checkpoints"][1]["cett"] == res.cett and json.dumps(d)


# -- results -------------------------------------------------------------------------------


def _report(searched, probe):
    return SparsityReport(model={"spec": "trained-tiny-llama"}, text={"source": "markov", "n_tokens": probe.n_tokens},
                          results=[searched[1], searched[5]], ppl_dense=probe.dense.ppl, seed=0,
                          extra={"note": "test"})


def test_report_round_trip(tmp_path, searched, probe):
    report = _report(searched, probe)
    path = tmp_path / "sub" / "report.json"
    report.save(path)
    loaded = SparsityReport.load(path)
    assert loaded == report
    assert loaded.result(5) == searched[5]
    with pytest.raises(KeyError, match="no result for p=10"):
        loaded.result(10)
    raw = json.loads(path.read_text())
    for key in ("p", "cett", "activation_ratio", "ppl_dense", "ppl_sparse", "ppl_ratio", "thresholds",
                "layer_activation_ratio", "layer_cett", "token_activation_ratio", "converged"):
        assert key in raw["results"][0]
    assert raw["version"] and raw["model"]["spec"] == "trained-tiny-llama"
    table = report.table()
    assert "yes" in table and f"{searched[1].ppl_ratio:.4f}" in table
    df = report.dataframe()
    assert list(df["p"]) == [1.0, 5.0] and "thresholds" not in df.columns
    assert [n for n in os.listdir(path.parent)] == ["report.json"]  # no temp file left


def test_save_is_atomic(tmp_path, monkeypatch, searched, probe):
    from sparsing_utils import jsonio

    report = _report(searched, probe)
    real_fsync = os.fsync

    def broken_fsync(fd):  # the temp file holds the bytes, then the disk fails
        raise RuntimeError("disk full")

    monkeypatch.setattr(jsonio.os, "fsync", broken_fsync)
    fresh = tmp_path / "fresh.json"
    with pytest.raises(RuntimeError, match="disk full"):
        report.save(fresh)
    assert not fresh.exists()
    assert os.listdir(tmp_path) == []  # no temp file left behind
    old = tmp_path / "old.json"
    old.write_text('{"previous": true}\n')
    with pytest.raises(RuntimeError, match="disk full"):
        report.save(old)
    assert old.read_text() == '{"previous": true}\n'
    assert sorted(os.listdir(tmp_path)) == ["old.json"]
    monkeypatch.setattr(jsonio.os, "fsync", real_fsync)
    report.save(old)
    assert SparsityReport.load(old) == report
    assert oct(old.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # usual permissions, not 0600
    # NaN is refused rather than written as invalid JSON
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "nan.json", {"x": float("nan")})
    assert sorted(os.listdir(tmp_path)) == ["old.json"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_sparse_inference(trained_llama, searched, probe):
    model = trained_llama.model
    r = searched[5]
    x = trained_llama.eval_ids[:3]
    with torch.no_grad():
        dense = model(input_ids=x).logits
        with apply_rule(model, CETTRule(r.thresholds)):
            ref = model(input_ids=x).logits
        with sparse_inference(model, r) as rule:
            assert isinstance(rule, CETTRule) and count_hooks(model) > 0
            got = model(input_ids=x).logits
        assert count_hooks(model) == 0
        assert torch.equal(got, ref)
        assert (got - dense).abs().max() > 1e-2  # the thresholds do something
        report = _report(searched, probe)
        with sparse_inference(model, report, p=5):
            assert torch.equal(model(input_ids=x).logits, ref)
        with sparse_inference(model, list(r.thresholds)):
            assert torch.equal(model(input_ids=x).logits, ref)
        assert count_hooks(model) == 0
        assert torch.equal(model(input_ids=x).logits, dense)  # clean afterwards
    with pytest.raises(ValueError, match="pass p="), sparse_inference(model, report):
        pass
    with pytest.raises(ValueError, match="3 thresholds for a model with 2 FFN layers"), \
            sparse_inference(model, [0.1, 0.1, 0.1]):
        pass
    with pytest.raises(RuntimeError, match="boom"), sparse_inference(model, r):
        raise RuntimeError("boom")
    assert count_hooks(model) == 0


# -- Pareto sweeps (Fig. 3) --------------------------------------------------------------------

COLUMNS = ["rule", "value", "activation_ratio", "ppl", "ppl_ratio"]


def _nonincreasing(xs, slack=0.0):
    return all(b <= a + slack for a, b in itertools.pairwise(xs))


def test_pareto_sweeps(probe):
    cett = pareto_sweep(probe, "cett", [0.02, 0.05, 0.1, 0.2, 0.4])
    topk = pareto_sweep(probe, "topk", [0.2, 0.4, 0.6, 0.8, 1.0], score="magnitude")
    fat = pareto_sweep(probe, "fat", [0.0, 0.01, 0.05, 0.1, 0.3])
    glob = pareto_sweep(probe, "topk", [0.3], scope="global", score="magnitude")
    relu = pareto_sweep(probe, "relu")
    for df in (cett, topk, fat, glob, relu):
        assert isinstance(df, pd.DataFrame) and list(df.columns) == COLUMNS
        assert (df["ppl_ratio"] - df["ppl"] / probe.dense.ppl).abs().max() < 1e-12
    assert set(cett["rule"]) == {"cett"} and set(fat["rule"]) == {"fat"} and set(topk["rule"]) == {"topk"}
    assert set(glob["rule"]) == {"topk_global_official"}
    # CETT: a larger target truncates more and costs more PPL
    assert _nonincreasing(list(cett["activation_ratio"]))
    assert _nonincreasing(list(-cett["ppl_ratio"]), slack=2e-3)
    assert cett["ppl_ratio"].iloc[-1] > cett["ppl_ratio"].iloc[0] + 0.01
    # Top-k per token: exactly round(r * 37) / 37 of the neurons; more kept costs less
    for r, a in zip(topk["value"], topk["activation_ratio"]):
        assert a == pytest.approx(round(r * D_FF) / D_FF, abs=1e-6)
    assert _nonincreasing(list(topk["ppl_ratio"]), slack=2e-3)
    assert topk["ppl_ratio"].iloc[-1] == 1.0  # keeping all 37 changes nothing
    # global Top-k: exactly round(r * numel) over the batch (one batch here)
    assert glob["activation_ratio"].iloc[0] == pytest.approx(round(0.3 * 1024 * D_FF) / (1024 * D_FF), abs=1e-7)
    # FAT: a larger eps keeps fewer; eps 0 keeps every nonzero gate (SiLU: all)
    assert _nonincreasing(list(fat["activation_ratio"]))
    assert fat["activation_ratio"].iloc[0] == pytest.approx(1.0)
    # ReLU rule on a SiLU model: nothing is exactly zero, nothing changes
    assert relu["activation_ratio"].iloc[0] == pytest.approx(1.0) and relu["ppl_ratio"].iloc[0] == 1.0
    # PPL-p% is the better Pareto curve: at a similar activation ratio, CETT beats Top-k
    c_row = cett.iloc[2]
    k_ppl = float(pd.Series(topk["ppl_ratio"].values, index=topk["activation_ratio"].values)
                  .sort_index().loc[lambda s: s.index <= c_row["activation_ratio"] + 1e-9].iloc[-1])
    assert c_row["ppl_ratio"] < k_ppl
    with pytest.raises(ValueError, match="unknown rule"):
        pareto_sweep(probe, "random", [0.1])
    with pytest.raises(ValueError, match="needs a list of values"):
        pareto_sweep(probe, "topk", [])


def test_pareto_from_search_reuses_the_search_points(trained_llama, probe, tmp_path):
    """The CETT curve of Fig. 3 is the points the search already evaluated: one row per evaluated
    target, each the very sparse pass of the search (no new pass), kept in the report's JSON."""
    pr = SparsityProbe(trained_llama.model, trained_llama.blocks(), name="points")
    table = EvaluationTable([pr])
    report = measure_probe(pr, [1, 5], evaluations=table)
    passes = pr.sparse_passes
    assert len(report.search_points) == len(table) == passes  # one sparse pass per evaluated target
    curve = pareto_from_search(report)
    assert pr.sparse_passes == passes  # nothing recomputed
    assert list(curve.columns) == COLUMNS and set(curve["rule"]) == {"cett"}
    assert list(curve["value"]) == sorted(c for c, _ in table.points())
    for row in curve.itertuples():
        ev = table.evaluations[row.value]
        assert row.activation_ratio == ev.stats[0].activation_ratio and row.ppl == ev.stats[0].ppl
        assert row.ppl_ratio == ev.ratio == pytest.approx(ev.stats[0].ppl / pr.dense.ppl, rel=1e-12)
    for r in report.results:  # the PPL-p% points are on the curve
        row = curve[curve["value"] == r.cett].iloc[0]
        assert (row["activation_ratio"], row["ppl_ratio"]) == (r.activation_ratio, r.ppl_ratio)
    # a sweep at the same targets (the cached exact thresholds, a new pass) lands on the same points
    again = pareto_sweep(pr, "cett", list(curve["value"][:2]))
    assert list(again["activation_ratio"]) == pytest.approx(list(curve["activation_ratio"][:2]), rel=1e-6)
    assert list(again["ppl_ratio"]) == pytest.approx(list(curve["ppl_ratio"][:2]), rel=1e-6)
    # through JSON and from the table itself: the same frame
    report.save(tmp_path / "r.json")
    loaded = SparsityReport.load(tmp_path / "r.json")
    assert loaded.search_points == report.search_points
    pd.testing.assert_frame_equal(pareto_from_search(loaded), curve)
    pd.testing.assert_frame_equal(pareto_from_search(table), curve)
    # a report written before search_points existed still loads, and says what it lacks
    raw = json.loads((tmp_path / "r.json").read_text())
    del raw["search_points"]
    atomic_write_json(tmp_path / "old.json", raw)
    old = SparsityReport.load(tmp_path / "old.json")
    assert old.search_points == [] and old.results == report.results
    with pytest.raises(ValueError, match="no evaluated points"):
        pareto_from_search(old)
    with pytest.raises(TypeError, match="SparsityReport or an EvaluationTable"):
        pareto_from_search(42)
    with pytest.raises(ValueError, match="made for other probes"):
        measure_probe(pr, [1], evaluations=EvaluationTable([probe]))


def _gate_scores(model, ids) -> list[torch.Tensor]:
    """|act(W_gate x)| of each layer, [tokens, d_ff] float64, with the test's own hooks."""
    return [g.abs() for g in _captured(model, ids, [layer.mlp.act_fn for layer in model.model.layers], inputs=False)]


def test_sweep_points_placed_by_activation_ratio(trained_llama, probe):
    """Top-k takes the ratios as k / d_ff; FAT-eps reads them off the gate scores of about
    ``tokens`` tokens spread over every block (256 of the 1,024: the 4th, 8th, ... token of each
    block): eps is the smallest histogram edge (1/256 decade) at which the mean fraction of
    gates above it is at most the target, checked against gate scores hooked by the test."""
    targets = [0.3, 0.5, 0.7]
    topk = pareto_sweep(probe, "topk", activation_ratios=targets, score="magnitude")
    assert list(topk["value"]) == targets
    for r, a in zip(targets, topk["activation_ratio"]):
        assert a == pytest.approx(round(r * D_FF) / D_FF, abs=1e-6)
    gates = [g.view(16, 64, D_FF)[:, 3::4].reshape(-1, D_FF)  # every 4th token of each of the 16 blocks: 256
             for g in _gate_scores(trained_llama.model, trained_llama.eval_ids)]
    step = 10 ** (1 / 256)

    def above(e: float) -> float:
        return float(sum((g > e).double().mean() for g in gates) / len(gates))

    eps = fat_eps_for(probe, targets, tokens=256)
    assert eps == sorted(eps, reverse=True) and all(e > 0 for e in eps)
    for r, e in zip(targets, eps):
        assert above(e) <= r + 1e-3 < above(e / step * (1 - 1e-6)) + 2e-3
    assert fat_eps_for(probe, [1.0]) == [0.0]  # every SiLU gate is nonzero
    fat = pareto_sweep(probe, "fat", activation_ratios=targets)
    assert list(fat["value"]) == fat_eps_for(probe, targets)  # default: 1,024 tokens (all here)
    # the sparse pass measures the real ratio; truncating layer 0 moves layer 1's gates a little
    assert list(fat["activation_ratio"]) == pytest.approx(targets, abs=0.05)
    with pytest.raises(ValueError, match="either values or activation_ratios"):
        pareto_sweep(probe, "topk", [0.5], activation_ratios=[0.5])
    with pytest.raises(ValueError, match="pareto_from_search"):
        pareto_sweep(probe, "cett", activation_ratios=[0.5])
    with pytest.raises(ValueError, match="activation ratios must be in"):
        fat_eps_for(probe, [1.5])


def test_exact_curve_brute_force(trained_llama, probe):
    """exact_curve: the mean CETT on all tokens at every grid threshold of the chosen layers
    (float64 brute force); other layers NaN; the guide curve is only an estimate of it."""
    acts, w_ts = dense_activations(trained_llama.model, trained_llama.eval_ids)
    exact = probe.exact_curve([1])
    assert torch.equal(exact.eps, probe.curve.eps) and torch.isnan(exact.cett[0]).all()
    for e, c in zip(exact.eps[1].tolist(), exact.cett[1].tolist()):
        assert c == pytest.approx(brute_layer_cett(acts[1], w_ts[1], e), abs=2e-5)
    assert exact.cett[1].diff().min() >= -1e-6  # CETT grows with the threshold
    grid = torch.tensor([[0.0, 0.05, 0.2], [0.0, 0.1, 0.3]])
    both = probe.exact_curve(eps=grid)
    for layer in (0, 1):
        for e, c in zip(grid[layer].tolist(), both.cett[layer].tolist()):
            assert c == pytest.approx(brute_layer_cett(acts[layer], w_ts[layer], e), abs=2e-5)
    with pytest.raises(ValueError, match="layer 2 does not exist"):
        probe.exact_curve([2])
    with pytest.raises(ValueError, match=r"eps must be \[layers=2, K\]"):
        probe.exact_curve(eps=torch.zeros(3, 4))


def test_metric_figures_draw_the_given_numbers(probe, searched):
    """plot_cett_curves draws the exact curve (solid), the guide (dotted) and each result's
    threshold at its exact CETT; plot_layer_profile draws every layer's numbers of every p."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from sparsing_utils import plots

    exact, results = probe.exact_curve([1]), [searched[1], searched[5]]
    fig = plots.plot_cett_curves(exact, [1], results, guide=probe.curve)
    solid, dotted, *circles = fig.axes[0].get_lines()
    ok = exact.eps[1] > 0
    assert np.allclose(solid.get_xdata(), exact.eps[1][ok]) and np.allclose(solid.get_ydata(), exact.cett[1][ok])
    assert dotted.get_linestyle() == ":" and np.allclose(dotted.get_ydata(), probe.curve.cett[1][probe.curve.eps[1] > 0])
    assert [c.get_xdata()[0] for c in circles] == pytest.approx([r.thresholds[1] for r in results])
    assert [c.get_ydata()[0] for c in circles] == pytest.approx([r.layer_cett[1] for r in results])
    plt.close(fig)
    fig = plots.plot_layer_profile(results)
    for ax, key in zip(fig.axes, ("layer_activation_ratio", "layer_cett", "thresholds")):
        drawn = [line.get_ydata() for line in ax.get_lines() if line.get_marker() == "."]
        assert [list(y) for y in drawn] == [pytest.approx(getattr(r, key)) for r in results]
    plt.close(fig)


# -- calibration split ------------------------------------------------------------------------


def test_calibration_split_uses_calibration_thresholds(trained_llama):
    model = trained_llama.model
    calib = SparsityProbe(model, trained_llama.blocks("cal"), name="calibration")
    evl = SparsityProbe(model, trained_llama.blocks("eval"), name="evaluation", calibration=calib)
    own = SparsityProbe(model, trained_llama.blocks("eval"), name="own")
    r = search_ppl_p(evl, 1)
    assert r.converged, r.message
    assert abs(r.ppl_ratio - 1.01) <= 1e-3
    # thresholds and CETT come from the calibration tokens ...
    eps_cal, cett_cal = calib.thresholds_for(r.cett)
    assert r.thresholds == eps_cal.tolist() and r.layer_cett == cett_cal.tolist()
    assert torch.allclose(calib.layer_cett(torch.tensor(r.thresholds)), torch.tensor(r.layer_cett), atol=1e-5)
    eps_own, _ = own.thresholds_for(r.cett)
    assert not torch.allclose(eps_own, eps_cal, rtol=1e-4)  # ... which differ from the evaluation tokens'
    # ... and PPL and activation ratios from the evaluation tokens
    nll, n = ppl_of(model, trained_llama.eval_ids)
    assert r.ppl_dense == pytest.approx(math.exp(nll / n), rel=1e-6)
    ppl, layer, _ = manual_sparse_forward(model, trained_llama.eval_ids, r.thresholds)
    assert r.ppl_sparse == pytest.approx(ppl, rel=1e-5)
    assert r.layer_activation_ratio == pytest.approx(layer, abs=1e-6)
    with pytest.raises(ValueError, match="same model object"):
        SparsityProbe(trained_llama.early, trained_llama.blocks(), calibration=calib)


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0, 100, -1, 150, float("nan"), float("inf"), "1"])
def test_bad_p(probe, p):
    with pytest.raises(ValueError, match=r"p must be a percentage in \(0, 100\)"):
        search_ppl_p(probe, p)


def test_empty_probe_list():
    with pytest.raises(ValueError, match="no model to search"):
        search_ppl_p([], 1)


def test_nan_activations_are_reported(trained_llama):
    model = copy.deepcopy(trained_llama.model)
    with torch.no_grad():
        model.model.layers[1].mlp.gate_proj.weight[5, 3] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite FFN activations at model\.layers\.1\.mlp\.down_proj"):
        SparsityProbe(model, trained_llama.blocks()).prepare()
    assert count_hooks(model) == 0


def test_nan_logits_are_reported(trained_llama):
    model = copy.deepcopy(trained_llama.model)
    with torch.no_grad():
        model.lm_head.weight[7, 0] = float("inf")
        model.lm_head.weight[8, 0] = -float("inf")
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        SparsityProbe(model, trained_llama.blocks()).prepare()
    assert count_hooks(model) == 0


def test_model_without_ffn():
    class NoFFN(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)

    with pytest.raises(ValueError, match="no FFN found in NoFFN"):
        SparsityProbe(NoFFN(), Blocks(torch.zeros(2, 8, dtype=torch.long)))


def test_bad_blocks(trained_llama):
    model = trained_llama.model
    with pytest.raises(ValueError, match="block_len >= 2"):
        SparsityProbe(model, Blocks(torch.zeros(4, 1, dtype=torch.long)))
    with pytest.raises(ValueError, match="block_len >= 2"):
        SparsityProbe(model, Blocks(torch.zeros(8, dtype=torch.long)))
    with pytest.raises(ValueError, match="mode must be"):
        SparsityProbe(model, trained_llama.blocks(), mode="disk")
    ids = trained_llama.eval_ids[:2]
    with pytest.raises(ValueError, match="no predicted tokens"):
        SparsityProbe(model, Blocks(ids, torch.zeros_like(ids))).prepare()


def test_unreachable_target_is_reported(trained_llama):
    """An FFN whose outputs barely matter cannot raise the PPL by 5%: converged=False with
    the reason, not a silently wrong answer."""
    model = copy.deepcopy(trained_llama.model)
    with torch.no_grad():
        for s in find_ffn_sites(model):
            s.module.weight.mul_(1e-4)
    r = search_ppl_p(SparsityProbe(model, trained_llama.blocks()), 5)
    assert not r.converged
    assert "not reachable" in r.message
    assert r.ppl_ratio < 1.05
