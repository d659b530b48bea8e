"""`sparsing_utils.runs`: the shipped training-lab results. Loading and aliases, the tables and
series the notebooks use (checked by hand on small synthetic result files), bad input, the writer
that `scripts/run_sweeps.py` uses, and the integrity of the files in `data/runs/`."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from argparse import Namespace

import numpy as np
import pytest
from _notebooks import ROOT

from sparsing_utils import fitting, runs
from sparsing_utils.training import TrainConfig

DOMAINS = ("code", "prose")


# ---------------------------------------------------------------------------
# small synthetic result files (format sparsing-run/1, only the keys runs.py reads)
# ---------------------------------------------------------------------------
def payload(name="relu-a", *, activation="relu", n_params=1000, hidden=24, layers=3, seed=0, train_fraction=1.0,
            tokens=(2000, 5000, 11000, 30000, 70000, 150000, 200000), ratios=None, epoch_tokens=100000,
            stages=None, token_ids=None, block_len=16, freq_shift=0.0):
    ratios = ratios or [0.30, 0.22, 0.17, 0.15, 0.16, 0.18, 0.19]
    stages = stages or ["warmup"] + ["stable"] * (len(tokens) - 2) + ["decay"]
    ckpts = [{"name": f"tokens-{t:012d}", "tokens": t, "step": i + 1, "stage": s, "in_search": s == "stable",
              "train_loss": 5.0 - 0.3 * i, "heldout_loss": 5.2 - 0.3 * i, "epochs": {d: t / epoch_tokens for d in DOMAINS},
              "activation_ratio": a, "ppl_ratio": 1.0 + 0.003 * i}
             for i, (t, s, a) in enumerate(zip(tokens, stages, ratios))]
    rng = np.random.default_rng(seed + 7)
    pats = []
    for ck in (ckpts[-2], ckpts[-1]):
        doms, per_token = {}, {}
        for j, d in enumerate(DOMAINS):
            freq = np.clip(rng.beta(2, 8, size=(layers, 5)) + freq_shift, 0, 1)
            freq[0, j] = 0.0004  # one dead neuron per domain, in a different column
            doms[d] = {"n_tokens": 64, "activation_ratio": float(freq.mean()), "dead_share": float((freq < 1e-3).mean()),
                       "layer_dead_share": (freq < 1e-3).mean(axis=1).tolist(), "neuron_frequency": freq.tolist()}
            per_token[d] = (0.1 + 0.05 * np.sin(np.arange(12) + j) + 0.01 * seed).tolist()
        pats.append({"name": ck["name"], "tokens": ck["tokens"], "stage": ck["stage"], "thresholds": [0.1] * layers,
                     "domains": doms, "dead_share_all": 0.0, "token_activation_ratio": per_token})
    patterns = {"block_len": block_len, "tokens_per_domain": 64, "token_set_per_domain": 12, "dead_frequency": 1e-3,
                "checkpoints": pats}
    if token_ids is not None:
        patterns["token_ids"] = token_ids
    return {
        "format": "sparsing-run/1", "run": name, "sweep": "activation",
        "config": {"activation": activation, "hidden_size": hidden, "num_layers": layers, "d_ff": 5, "seed": seed,
                   "train_fraction": train_fraction, "lr": 0.003, "name": name, "corpus": "/somewhere"},
        "plan": {"non_embedding_params": n_params, "d_ff": 5},
        "corpus": {"heldout_tokens": {"code": 500, "prose": 400}, "builder": {"args": {"heldout_prose": 0.04}}},
        "throughput": {"tokens_per_s": 1000.0, "mfu": 0.01, "wall_seconds": 12.0},
        "loss_curve": {"tokens": [1000, 2000], "loss": [6.0, 5.0], "lr": [0.001, 0.003]},
        "tracking": {"cett": 0.1, "mean_ppl_ratio": 1.01, "converged": True},
        "checkpoints": ckpts, "patterns": patterns,
    }


def write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture
def tree(tmp_path):
    """activation/{relu-a, relu-b (4x the parameters), silu-a}; seeds/{relu-a-seed0 (alias), seed1, seed2}."""
    root = tmp_path / "runs"
    write(root / "activation" / "relu-a.json", payload())
    write(root / "activation" / "relu-b.json", payload("relu-b", n_params=4000, hidden=48, layers=2,
                                                       ratios=[0.25, 0.18, 0.12, 0.11, 0.115, 0.12, 0.125]))
    write(root / "activation" / "silu-a.json", payload("silu-a", activation="silu",
                                                       ratios=[0.30, 0.26, 0.30, 0.38, 0.42, 0.44, 0.45]))
    write(root / "seeds" / "relu-a-seed0.json", {"format": runs.ALIAS_FORMAT, "sweep": "seeds", "run": "relu-a-seed0",
                                                 "same_as": "activation/relu-a.json"})
    for s, shift in ((1, 0.01), (2, 0.025)):
        r = [0.30, 0.22, 0.17, 0.15 + shift / 2, 0.16 + shift, 0.18 + shift, 0.19 + shift]
        write(root / "seeds" / f"relu-a-seed{s}.json", payload(f"relu-a-seed{s}", seed=s, ratios=r))
    return root


# ---------------------------------------------------------------------------
# loading and aliases
# ---------------------------------------------------------------------------
def test_aliases_resolve_to_the_full_result_under_their_own_names(tree):
    seeds = runs.load_sweep("seeds", tree)
    alias = seeds["relu-a-seed0"]
    full = runs.load_run("activation/relu-a", tree)
    assert alias.is_alias and alias.alias_of == "activation/relu-a" and not full.is_alias
    assert (alias.sweep, alias.name, alias.key) == ("seeds", "relu-a-seed0", "seeds/relu-a-seed0")
    assert alias.data == full.data and alias.path == full.path == tree / "activation" / "relu-a.json"
    assert runs.load_run(tree / "seeds" / "relu-a-seed0.json").data == full.data  # by path: the root is found
    every = runs.load_runs(tree)
    assert len(every) == 6 and len(runs.load_runs(tree, distinct=True)) == 5
    assert [r.key for r in runs.load_runs(tree, sweeps=["seeds"])] == [
        "seeds/relu-a-seed0", "seeds/relu-a-seed1", "seeds/relu-a-seed2"]


def test_sweep_order_by_size_or_width_depth(tree):
    assert list(runs.load_sweep("activation", tree)) == ["relu-a", "relu-b", "silu-a"]  # relu: N 1000, 4000
    assert list(runs.load_sweep("activation", tree, order="width_depth")) == ["relu-a", "relu-b", "silu-a"]
    r = runs.load_sweep("activation", tree)["relu-b"]
    assert (r.scale, r.width_depth_ratio, r.n_params, r.activation) == ("4.0k", 24.0, 4000, "relu")
    with pytest.raises(ValueError, match="order must be one of"):
        runs.load_sweep("activation", tree, order="age")


def test_missing_and_corrupt_files_give_clear_errors(tree):
    with pytest.raises(FileNotFoundError, match=r"relu-z\.json not found; activation/ holds \['relu-a', 'relu-b'"):
        runs.load_run("activation/relu-z", tree)
    with pytest.raises(FileNotFoundError, match=r"sweep folder .*nosuch not found; .* holds the sweeps \['activation', 'seeds'\]"):
        runs.load_sweep("nosuch", tree)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        runs.load_sweep("activation", tree / "missing")
    bad = tree / "broken"
    (bad / "x").mkdir(parents=True)
    (bad / "x" / "half.json").write_text(json.dumps(payload())[:500])
    with pytest.raises(ValueError, match=r"half\.json is not valid JSON .*git checkout"):
        runs.load_run(bad / "x" / "half.json")
    write(bad / "x" / "other.json", {"format": "something/2"})
    with pytest.raises(ValueError, match="has format 'something/2', expected 'sparsing-run/1'"):
        runs.load_run(bad / "x" / "other.json")
    write(bad / "x" / "list.json", [1, 2])
    with pytest.raises(ValueError, match="has format a list"):
        runs.load_run(bad / "x" / "list.json")
    cut = payload()
    del cut["checkpoints"]
    write(bad / "x" / "cut.json", cut)
    with pytest.raises(ValueError, match=r"lacks \['checkpoints'\]"):
        runs.load_run(bad / "x" / "cut.json")
    write(bad / "x" / "empty.json", {**payload(), "checkpoints": []})
    with pytest.raises(ValueError, match="no checkpoint records"):
        runs.load_run(bad / "x" / "empty.json")
    (tree / "hollow").mkdir()
    with pytest.raises(ValueError, match="holds no .json run results"):
        runs.load_sweep("hollow", tree)


def test_broken_aliases_are_refused(tree):
    a = tree / "extra"
    write(a / "dangling.json", {"format": runs.ALIAS_FORMAT, "sweep": "extra", "run": "dangling",
                                "same_as": "activation/gone.json"})
    with pytest.raises(FileNotFoundError, match="points to activation/gone.json, which is not in"):
        runs.load_run("extra/dangling", tree)
    write(a / "chain.json", {"format": runs.ALIAS_FORMAT, "sweep": "extra", "run": "chain",
                             "same_as": "seeds/relu-a-seed0.json"})
    with pytest.raises(ValueError, match="another alias"):
        runs.load_run("extra/chain", tree)
    write(a / "short.json", {"format": runs.ALIAS_FORMAT, "sweep": "extra"})
    with pytest.raises(ValueError, match=r"lacks \['run', 'same_as'\]"):
        runs.load_run("extra/short", tree)


# ---------------------------------------------------------------------------
# writing: one full file, aliases elsewhere (what scripts/run_sweeps.py does)
# ---------------------------------------------------------------------------
def test_publish_writes_the_result_once_and_aliases_elsewhere(tmp_path):
    p = payload("relu-x")
    sweeps = {"activation": "relu-x", "seeds": "relu-x-seed0", "width_depth": "relu-d24-l3"}
    paths = runs.publish(p, sweeps, tmp_path)
    assert paths == [tmp_path / "activation" / "relu-x.json", tmp_path / "seeds" / "relu-x-seed0.json",
                     tmp_path / "width_depth" / "relu-d24-l3.json"]
    full = json.loads(paths[0].read_text())
    assert full == {**p, "sweep": "activation", "run": "relu-x"}
    for path, (sweep, name) in zip(paths[1:], list(sweeps.items())[1:]):
        assert json.loads(path.read_text()) == {"format": runs.ALIAS_FORMAT, "sweep": sweep, "run": name,
                                                "same_as": "activation/relu-x.json"}
        assert path.stat().st_size < 200
        r = runs.load_run(f"{sweep}/{name}", tmp_path)
        assert r.data == full and r.name == name
    with pytest.raises(ValueError, match="belongs to no sweep"):
        runs.publish(p, {}, tmp_path)
    with pytest.raises(ValueError, match="expected 'sparsing-run/1'"):
        runs.publish({"format": "x"}, sweeps, tmp_path)


@pytest.fixture
def run_sweeps():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import run_sweeps
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return run_sweeps


def test_run_sweeps_publishes_aliases_and_counts_them_as_done(run_sweeps, tmp_path, capsys):
    """The scheduler's publish step writes the data/runs layout, and a later pass of the script
    sees every sweep entry (full file or alias) as an existing result and trains nothing."""
    entry = {"run": "relu-x", "config": "configs/activation/relu-2m.json", "priority": 0, "est_seconds": 10,
             "total_tokens": 1, "sweeps": {"activation": "relu-x", "repetition": "relu-x-full"}}
    args = Namespace(work=tmp_path / "work", results=tmp_path / "work" / "results", no_compile=False)
    run = run_sweeps.Run(entry, args)
    write(run.tracked, payload("relu-x"))
    run.publish()
    assert run.state == "done"
    assert json.loads((args.results / "repetition" / "relu-x-full.json").read_text())["same_as"] == \
        "activation/relu-x.json"
    assert runs.load_run("repetition/relu-x-full", args.results).data["run"] == "relu-x"
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"runs": [entry]}))
    assert run_sweeps.main(["--plan", str(plan), "--corpus", str(tmp_path), "--work", str(args.work),
                            "--device", "cpu", "--poll", "0"]) == 0
    assert "finished: 1 done, 0 failed, 0 skipped" in capsys.readouterr().out
    status = json.loads((args.work / "status.json").read_text())
    assert [(r["state"], r["note"], r["attempts"]) for r in status["runs"]] == [("done", "result existed", 0)]


# ---------------------------------------------------------------------------
# tables and series (numbers checked by hand)
# ---------------------------------------------------------------------------
def test_checkpoint_frame_and_run_table(tree):
    act = list(runs.load_sweep("activation", tree).values())
    frame = runs.checkpoint_frame(act)
    assert len(frame) == 21 and list(frame["run"].unique()) == ["relu-a", "relu-b", "silu-a"]
    b = frame[frame["run"] == "relu-b"]
    assert b["D"].tolist() == pytest.approx([t / 1e9 for t in (2000, 5000, 11000, 30000, 70000, 150000, 200000)])
    assert b["tokens_per_param"].iloc[-1] == 50.0 and b["epochs"].iloc[-1] == pytest.approx(2.0)
    t = runs.run_table(act).set_index("run")
    a = t.loc["relu-a"]  # pre-decay ratios 0.30 0.22 0.17 0.15 0.16 0.18; decay 0.19
    assert (a.A_min, a.tokens_at_min, a.A_last_stable, a.A_final) == (0.15, 30000, 0.18, 0.19)
    assert a.rise_from_min == pytest.approx(0.03) and a.tokens_per_epoch == pytest.approx(100000)
    # the first epoch ends at 100,000 tokens: between 70,000 (0.16) and 150,000 (0.18), linear in log tokens
    w = math.log(100000 / 70000) / math.log(150000 / 70000)
    assert a.A_at_epoch1 == pytest.approx(0.16 + w * 0.02) and a.rise_before_epoch1 == pytest.approx(0.01 + w * 0.02)
    assert (a.epochs, a.tokens_per_param, a.heldout_loss_last_stable) == pytest.approx((2.0, 200.0, 5.2 - 1.5))
    curves = runs.loss_curve_frame(act)
    assert len(curves) == 6 and curves["scale"].tolist() == ["1.0k"] * 2 + ["4.0k"] * 2 + ["1.0k"] * 2


def test_value_at_tokens_and_compare_at_tokens(tree):
    a, b = runs.load_sweep("activation", tree)["relu-a"], runs.load_sweep("activation", tree)["relu-b"]
    assert runs.value_at_tokens(a, 30000, "activation_ratio") == pytest.approx(0.15)
    mid = math.sqrt(30000 * 70000)  # halfway in log tokens
    assert runs.value_at_tokens(a, mid, "activation_ratio") == pytest.approx(0.155)
    with pytest.raises(ValueError, match="outside its warmup/stable checkpoints .* no extrapolation"):
        runs.value_at_tokens(a, 200000)  # the decay checkpoint is not used
    both = runs.compare_at_tokens([a, b], "activation_ratio")
    assert both["tokens"].tolist() == [150000, 150000] and both["value"].tolist() == pytest.approx([0.18, 0.12])


def test_checkpoint_series_stages_cut_and_segments(tree):
    a = runs.load_sweep("activation", tree)["relu-a"]
    D, A = runs.checkpoint_series(a)
    assert D.tolist() == pytest.approx([2e-6, 5e-6, 1.1e-5, 3e-5, 7e-5, 1.5e-4]) and A.tolist() == [
        0.30, 0.22, 0.17, 0.15, 0.16, 0.18]
    assert runs.checkpoint_series(a, stages=("stable", "decay"))[1].tolist() == [0.22, 0.17, 0.15, 0.16, 0.18, 0.19]
    assert runs.checkpoint_series(a, min_tokens_per_param=30)[1].tolist() == [0.15, 0.16, 0.18]
    assert runs.checkpoint_series(a, segment="falling")[1].tolist() == [0.30, 0.22, 0.17, 0.15]
    assert runs.checkpoint_series(a, segment="rising")[1].tolist() == [0.15, 0.16, 0.18]
    assert runs.checkpoint_series(a, "heldout_loss")[1].tolist() == pytest.approx([5.2 - 0.3 * i for i in range(6)])
    with pytest.raises(ValueError, match="segment must be one of"):
        runs.checkpoint_series(a, segment="middle")
    with pytest.raises(ValueError, match="stages must be a non-empty selection"):
        runs.checkpoint_series(a, stages=("cooldown",))
    with pytest.raises(ValueError, match=r"no checkpoint in stages .* >= 500 tokens per parameter \(its last has 200\)"):
        runs.checkpoint_series(a, min_tokens_per_param=500)
    s = runs.activation_series(a, segment="falling")
    assert (s.name, s.activation, s.law, len(s)) == ("relu-a", "relu", "relu", 4)


def test_fits_are_the_fitting_code_on_the_pre_decay_series(tree):
    """Eq. 4 / Eq. 5 per run through runs.fit_activation_laws equal fitting.fit_law on the series
    built by hand, and on a run made from Eq. 4 itself the limit comes back."""
    root = tree.parent / "law"
    tokens = [int(t) for t in np.geomspace(1e6, 4e8, 24)] + [440_000_000]
    truth = {"alpha": 0.5, "b": -1.0, "c": 20.0, "A0": 0.07}
    ratios = [float(v) for v in fitting.get_law("relu").func(np.array(tokens) / 1e9, **truth)]
    write(root / "activation" / "relu-law.json", payload("relu-law", tokens=tokens, ratios=ratios, n_params=10**6))
    act = list(runs.load_sweep("activation", tree).values()) + [runs.load_run("activation/relu-law", root)]
    fits = runs.fit_activation_laws(act, n_bootstrap=0)
    assert fits["relu-law"].params["A0"] == pytest.approx(0.07, abs=1e-4) and fits["relu-law"].n_points == 24
    for r in act[:3]:
        D = np.array([c["tokens"] for c in r.checkpoints if c["stage"] != "decay"]) / 1e9
        A = np.array([c["activation_ratio"] for c in r.checkpoints if c["stage"] != "decay"])
        by_hand = fitting.fit_law(D, A, r.activation, n_bootstrap=0)
        assert fits[r.name].params == pytest.approx(by_hand.params, rel=1e-9) and fits[r.name].law == r.activation
    table = runs.limit_table(act, runs.fit_activation_laws(act[3:], n_bootstrap=8, seed=1))
    assert list(table["run"]) == ["relu-law"] and table["law"].iloc[0] == "Eq. 4"
    row = table.iloc[0]
    assert row.A0_lo <= row.A0 <= row.A0_hi and row.DN_first == pytest.approx(1.0) and row.n_points == 24
    loss = runs.fit_loss_limits(act[:1], n_bootstrap=0)["relu-a"]
    assert loss.law == "loss" and loss.n_points == 6


def test_limit_points(tree):
    import pandas as pd

    t = pd.DataFrame({"activation": ["relu", "silu"], "n_params": [1e6, 2e6], "A0": [0.1, 0.4], "A0_lo": [0.09, 0.3],
                      "A0_hi": [0.12, 0.5], "A_last_stable": [0.11, 0.45]})
    ci = runs.limit_points(t, "fit")
    assert ci[["value", "lo", "hi"]].to_numpy().tolist() == [[0.1, 0.09, 0.12], [0.4, 0.3, 0.5]]
    sd = runs.limit_points(t, "last", "A_last_stable", sd=0.01)
    assert sd["lo"].tolist() == pytest.approx([0.10, 0.44]) and set(sd["source"]) == {"last"}
    assert runs.limit_points(t, "x", "A_last_stable")["lo"].isna().all()
    with pytest.raises(ValueError, match=r"lacks \['L0'\]"):
        runs.limit_points(t, "x", "L0")


# ---------------------------------------------------------------------------
# noise
# ---------------------------------------------------------------------------
def test_seed_spread_and_band(tree):
    seeds = list(runs.load_sweep("seeds", tree).values())
    spread = runs.seed_spread(seeds)
    last = [0.18, 0.19, 0.205]
    assert spread.loc["A_last_stable", ["seed0", "seed1", "seed2"]].tolist() == pytest.approx(last)
    assert spread.loc["A_last_stable", "std"] == pytest.approx(np.std(last, ddof=1))
    assert spread.loc["A_last_stable", "mean"] == pytest.approx(np.mean(last)) and spread.loc["A_min", "n"] == 3
    assert spread.loc["rise_from_min", "mean"] == pytest.approx(np.mean([0.03, 0.035, 0.0425]))
    band = runs.seed_band(seeds)
    assert band["max"].tolist() == pytest.approx([0.30, 0.22, 0.17, 0.1625, 0.185, 0.205, 0.215])
    assert band["std"].iloc[0] == 0.0 and band["stage"].iloc[-1] == "decay"


def test_seed_spread_refuses_what_is_not_a_seed_group(tree):
    act = runs.load_sweep("activation", tree)
    seeds = list(runs.load_sweep("seeds", tree).values())
    with pytest.raises(ValueError, match=r"differs from .* in \['activation'\], not only in the seed"):
        runs.seed_spread([act["relu-a"], act["silu-a"]])
    with pytest.raises(ValueError, match="repeat a seed"):
        runs.seed_spread([seeds[0], act["relu-a"]])  # the alias and its target: seed 0 twice
    with pytest.raises(ValueError, match="at least 2 runs"):
        runs.seed_band(seeds[:1])


# ---------------------------------------------------------------------------
# activation patterns (Figs. 9, 10)
# ---------------------------------------------------------------------------
def test_pattern_tables(tree):
    act = list(runs.load_sweep("activation", tree).values())
    a = act[0]
    assert runs.pattern_checkpoint(a)["name"] == a.checkpoints[-2]["name"]  # last stable
    assert runs.pattern_checkpoint(a, "final")["stage"] == "decay"
    with pytest.raises(ValueError, match="has no pattern for 'tokens-1'"):
        runs.pattern_checkpoint(a, "tokens-1")
    freq = runs.neuron_frequency_frame(act, domains=["prose"])
    assert len(freq) == 15 + 10 + 15 and set(freq["domain"]) == {"prose"}
    raw = np.array(a.data["patterns"]["checkpoints"][0]["domains"]["prose"]["neuron_frequency"])
    assert freq[freq["run"] == "relu-a"]["frequency"].tolist() == raw.ravel().tolist()
    t = runs.pattern_table(act).set_index(["run", "domain"])
    row = t.loc[("relu-a", "prose")]
    assert (row.n_neurons, row.dead_neurons) == (15, 1) and row.dead_share == pytest.approx(1 / 15)
    assert row.q50 == pytest.approx(np.quantile(raw, 0.5)) and row.activation_ratio == pytest.approx(raw.mean())
    with pytest.raises(ValueError, match="no pattern for domain 'math'"):
        runs.neuron_frequency_frame(act, domains=["math"])


def test_token_ratio_pairs_by_position_and_by_vocabulary(tree):
    act = runs.load_sweep("activation", tree)
    a, b = act["relu-a"], act["relu-b"]
    p = runs.token_ratio_pair(a, b, "prose")
    x = np.array(a.data["patterns"]["checkpoints"][0]["token_activation_ratio"]["prose"])
    y = np.array(b.data["patterns"]["checkpoints"][0]["token_activation_ratio"]["prose"])
    assert p["r"] == pytest.approx(np.corrcoef(x, y)[0, 1]) and p["n"] == 12 and p["by"] == "position"
    with pytest.raises(ValueError, match="records no token ids"):
        runs.token_ratios(a, "prose", by="vocabulary")
    with pytest.raises(ValueError, match="no per-token ratios for domain 'math'"):
        runs.token_ratios(a, "math")
    # with token ids: the mean per vocabulary id, and pairs only where both runs saw the same ids
    ids = {d: [5, 7, 5, 9, 7, 5, 11, 9, 13, 5, 7, 11] for d in DOMAINS}
    root = tree.parent / "ids"
    for r in (a, b):
        write(root / "activation" / f"{r.name}.json", {**r.data, "patterns": {**r.data["patterns"], "token_ids": ids}})
    ai, bi = runs.load_run("activation/relu-a", root), runs.load_run("activation/relu-b", root)
    by_id = runs.token_ratios(ai, "prose", by="vocabulary")
    assert by_id.index.tolist() == [5, 7, 9, 11, 13]
    assert by_id[5] == pytest.approx(x[[0, 2, 5, 9]].mean()) and by_id[13] == pytest.approx(x[8])
    pv = runs.token_ratio_pair(ai, bi, "prose", by="vocabulary")
    assert pv["n"] == 5 and pv["r"] == pytest.approx(np.corrcoef(by_id, runs.token_ratios(bi, "prose", by="vocabulary"))[0, 1])
    other = {**ids, "prose": [1] * 12}
    write(root / "activation" / "relu-c.json", {**b.data, "patterns": {**b.data["patterns"], "token_ids": other}})
    with pytest.raises(ValueError, match=r"different token sets \(token ids differ\)"):
        runs.token_ratio_pair(ai, runs.load_run("activation/relu-c", root), "prose")
    write(root / "activation" / "relu-d.json", payload("relu-d", block_len=32))
    with pytest.raises(ValueError, match=r"different token sets \(block length differ\)"):
        runs.token_ratio_pair(a, runs.load_run("activation/relu-d", root), "code")
    with pytest.raises(ValueError, match="by must be 'position' or 'vocabulary'"):
        runs.token_ratios(a, "code", by="sentence")


# ---------------------------------------------------------------------------
# the shipped files
# ---------------------------------------------------------------------------
def test_shipped_results_are_complete_and_not_duplicated():
    """data/runs/: 18 trained runs, each stored once; every other sweep place of a run is an alias;
    each file is what configs/plan.json says the sweeps hold, with the committed config, a converged
    Algorithm 1 and the same held-out token set, whose ids every file holds (recorded by track, or
    attached afterwards from the same corpus, and then equal to the recorded ones)."""
    plan = json.loads((ROOT / "configs" / "plan.json").read_text())
    entries = runs.load_runs()
    full = [r for r in entries if not r.is_alias]
    assert len(full) == 20 and len(entries) == 24
    by_key = {r.key: r for r in entries}
    shipped = [e for e in plan["runs"] if f"{next(iter(e['sweeps']))}/{e['sweeps'][next(iter(e['sweeps']))]}" in by_key]
    assert len(shipped) == 20
    for e in shipped:
        (home, name), *others = e["sweeps"].items()
        r = by_key[f"{home}/{name}"]
        assert not r.is_alias and r.data["sweep"] == home and r.data["run"] == name and r.config["name"] == e["run"]
        for sweep, alias in others:
            a = by_key[f"{sweep}/{alias}"]
            assert a.alias_of == f"{home}/{name}" and a.data is not None
            assert (ROOT / "data" / "runs" / sweep / f"{alias}.json").stat().st_size < 200
        trained, committed = TrainConfig.from_dict(r.config), TrainConfig.from_json(ROOT / e["config"])
        if committed.is_moe:  # the MoE runs (Fig. 2) were trained with the configs as committed
            assert trained.is_moe and r.config["num_experts"] == committed.num_experts >= 2
            skip = {"corpus"}
        else:
            # the dense runs were trained before issue 10 wrote dense configs as num_experts 0 / experts_top_k 0
            # (they say 1 / 1, the same dense model) and added the MoE-only fields: compare everything else
            assert not trained.is_moe and r.config["num_experts"] in (0, 1)
            skip = {"corpus", "num_experts", "experts_top_k", "moe_style", "router_aux_loss_coef"}
        assert {k: v for k, v in trained.to_dict().items() if k not in skip} == \
            {k: v for k, v in committed.to_dict().items() if k not in skip}
        assert r.n_params == e["non_embedding_params"] and r.checkpoints[-1]["tokens"] == e["total_tokens"]
        t = r.data["tracking"]
        assert t["converged"] and abs(t["mean_ppl_ratio"] - 1.01) <= t["tol"] + 1e-9
        assert [c["stage"] for c in r.checkpoints].count("decay") == 1 and len(r.checkpoints) == 26
        assert all(0 < c["activation_ratio"] < 1 for c in r.checkpoints)
        assert r.path.stat().st_size < 1_000_000
    ref = full[0]
    recorded = [r for r in full if "token_ids_source" not in r.data["patterns"]]
    assert len(recorded) == 6  # the runs of GPU sessions 4 and 6: ids written by track itself
    for r in full[1:]:  # all were measured on one corpus: their per-token ratios can be paired
        runs.token_ratio_pair(ref, r, "prose")
        runs.token_ratio_pair(ref, r, "code", by="vocabulary")
        assert r.data["corpus"]["unique_tokens"]["total"] == 148_704_201
        assert r.data["patterns"]["token_ids"] == recorded[0].data["patterns"]["token_ids"]


# ---------------------------------------------------------------------------
# the figures of notebooks 03-05 draw the tables they are given
# ---------------------------------------------------------------------------
def test_run_figures_draw_their_tables(tree):
    import matplotlib

    matplotlib.use("Agg")
    from sparsing_utils import analysis, plots

    act = list(runs.load_sweep("activation", tree).values())
    frame = runs.checkpoint_frame(act)
    fits = {"all": runs.fit_activation_laws(act, n_bootstrap=0)}
    fig = plots.plot_run_activation(frame, fits)
    relu_ax = fig.axes[0]
    filled = [ln for ln in relu_ax.get_lines() if ln.get_marker() == "o" and ln.get_label() == "relu-a"]
    assert filled[0].get_ydata().tolist() == [0.30, 0.22, 0.17, 0.15, 0.16, 0.18]  # pre-decay points
    curve = next(ln for ln in relu_ax.get_lines() if ln.get_linestyle() == "-" and len(ln.get_xdata()) == 200)
    np.testing.assert_allclose(curve.get_ydata(), fits["all"]["relu-a"].predict(curve.get_xdata()))
    seeds = list(runs.load_sweep("seeds", tree).values())
    band = runs.seed_band(seeds)
    fig = plots.plot_seed_band(runs.checkpoint_frame(seeds), band)
    (poly,) = fig.axes[0].collections
    ys = poly.get_paths()[0].vertices[:, 1]
    assert ys.max() == pytest.approx(band["max"].max()) and ys.min() == pytest.approx(band["min"].min())
    pair = runs.token_ratio_pair(act[0], act[1], "code")
    fig = plots.plot_token_ratio_pairs([pair])
    np.testing.assert_allclose(fig.axes[0].collections[0].get_offsets(), np.column_stack([pair["x"], pair["y"]]))
    assert f"r = {pair['r']:.2f}" in fig.axes[0].get_title()
    freq = runs.neuron_frequency_frame(act)
    fig = plots.plot_neuron_frequency(freq, bins=10)
    assert len(fig.axes) == 4  # (relu, silu) x (code, prose)
    assert len(fig.axes[0].patches) == 2  # relu-a, relu-b on code
    for patch in fig.axes[0].patches:  # step histograms with density=True enclose an area of 1 (shoelace)
        x, y = patch.get_path().vertices.T
        assert 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) == pytest.approx(1.0)
    points = runs.limit_points(runs.run_table(act), "ours", "A_last_stable", sd=0.01)
    fig = plots.plot_limit_vs_params(points)
    pts, _, (bars,) = fig.axes[0].containers[0]
    assert pts.get_ydata().tolist() == [0.18, 0.12]
    np.testing.assert_allclose(bars.get_segments()[0][:, 1], [0.17, 0.19])
    bfit = analysis.fit_bottleneck([1, 2, 4, 8, 16], [0.1, 0.2, 0.4, 0.45, 0.45])
    fig = plots.plot_bottleneck(bfit, yerr=0.02, xscale="log")
    pts, _, (bars,) = fig.axes[0].containers[0]
    assert fig.axes[0].get_xscale() == "log" and bars.get_segments()[0][:, 1].tolist() == pytest.approx([0.08, 0.12])
    loss = runs.compare_at_tokens(act[:2])
    fig = plots.plot_width_depth_loss(loss, y="value", yerr=0.01, fits=runs.fit_loss_limits(act[:2], n_bootstrap=0))
    assert fig.axes[0].containers[0][0].get_ydata().tolist() == pytest.approx(loss["value"].tolist())
    fig = plots.plot_loss_curves(runs.loss_curve_frame(act), frame)
    assert [ln.get_ydata().tolist() for ln in fig.axes[0].get_lines()[:1]] == [[6.0, 5.0]]
    fig = plots.plot_repetition(frame[frame["run"] == "relu-a"])
    assert fig.axes[0].get_lines()[0].get_ydata().tolist() == [0.30, 0.22, 0.17, 0.15, 0.16, 0.18, 0.19]
    import matplotlib.pyplot as plt

    plt.close("all")


def test_pareto_frame_reads_the_final_checkpoints_points(tree):
    """runs.pareto_frame: one row per recorded sparse pass, ordered by activation ratio per run; runs
    without points are left out, and none at all is an error that says how to get them."""
    a = runs.load_sweep("activation", tree)["relu-a"]
    rows = [{"rule": "cett", "value": c, "activation_ratio": ar, "ppl": 10 * pr, "ppl_ratio": pr}
            for c, ar, pr in ((0.2, 0.1, 1.1), (0.05, 0.3, 1.01), (0.1, 0.2, 1.03))]
    with pytest.raises(ValueError, match="--pareto"):
        runs.pareto_frame(runs.load_runs(tree))
    write(tree / "activation" / f"{a.name}.json", {**a.data, "pareto": {"name": "final", "ppl_dense": 10.0, "rows": rows}})
    frame = runs.pareto_frame(runs.load_runs(tree, distinct=True))
    assert frame["run"].unique().tolist() == [a.name]
    assert frame["activation_ratio"].tolist() == [0.1, 0.2, 0.3] and frame["value"].tolist() == [0.2, 0.1, 0.05]
    assert set(frame["activation"]) == {a.activation} and (frame["checkpoint"] == "final").all()




def test_pareto_frame_counts_neurons_for_fig2_and_the_figure_draws_them(tree):
    """Fig. 2 columns: a dense run's neurons are d_ff, an MoE run's num_experts x d_ff; active_neurons
    = activation_ratio x neurons; top_k the trained routing (0: dense). plot_moe_pareto draws each
    (run, rule) on both panels and stars the trained top-k."""
    import matplotlib.pyplot as plt

    from sparsing_utils import plots

    a = runs.load_sweep("activation", tree)["relu-a"]
    dense_rows = [{"rule": "cett", "value": c, "activation_ratio": ar, "ppl": 10 * pr, "ppl_ratio": pr}
                  for c, ar, pr in ((0.2, 0.2, 1.1), (0.05, 0.6, 1.01))]
    write(tree / "activation" / "relu-a.json", {**a.data, "pareto": {"name": "final", "ppl_dense": 10.0, "rows": dense_rows}})
    moe = payload("relu-moe")
    moe["config"].update(num_experts=3, experts_top_k=2)
    moe_rows = [{"rule": "cett", "value": 0.1, "activation_ratio": 0.3, "ppl": 8.4, "ppl_ratio": 1.05,
                 "activation_ratio_ran": 0.45}] + \
        [{"rule": "experts", "value": float(k), "activation_ratio": k / 3, "ppl": p, "ppl_ratio": p / 8.0,
          "activation_ratio_ran": 1.0} for k, p in ((1, 12.0), (2, 8.0), (3, 8.8))]
    write(tree / "moe" / "relu-moe.json", {**moe, "sweep": "moe", "pareto": {"name": "final", "ppl_dense": 8.0,
                                                                             "rows": moe_rows}})
    frame = runs.pareto_frame([runs.load_sweep("activation", tree)["relu-a"], runs.load_sweep("moe", tree)["relu-moe"]])
    d, m = frame[frame["run"] == "relu-a"], frame[frame["run"] == "relu-moe"]
    assert (d["neurons"] == 5).all() and (d["top_k"] == 0).all() and d["active_neurons"].tolist() == [1.0, 3.0]
    assert (m["neurons"] == 15).all() and (m["top_k"] == 2).all()
    assert m["active_neurons"].tolist() == pytest.approx([4.5, 5.0, 10.0, 15.0])  # cett 0.3 x 15, then k x 5
    assert m["activation_ratio_ran"].tolist() == [0.45, 1.0, 1.0, 1.0]
    fig = plots.plot_moe_pareto(frame)
    left, right = fig.axes
    drawn = {ln.get_label(): ln for ln in right.get_lines()}
    assert drawn["relu-moe: routed experts k"].get_xdata().tolist() == [5.0, 10.0, 15.0]
    assert drawn["relu-moe: routed experts k"].get_ydata().tolist() == [12.0, 8.0, 8.8]
    assert drawn["relu-a: CETT thresholds"].get_ydata().tolist() == [11.0, 10.1]
    stars = [ln for ln in left.get_lines() if ln.get_marker() == "*" and len(ln.get_xdata())]
    assert [(ln.get_xdata().tolist(), ln.get_ydata().tolist()) for ln in stars] == [([2 / 3], [1.0])]  # trained k = 2
    plt.close("all")

def test_run_sweeps_spreads_runs_over_the_gpus_of_one_machine(run_sweeps, tmp_path, monkeypatch, capsys):
    """The scheduler's real loop (not --simulate) on a machine of two GPUs, one slot each: three runs
    by priority, the first two at once on GPUs 0 and 1, the third on the first GPU to free up; each
    child process sees only its GPU (CUDA_VISIBLE_DEVICES) and is tracked with the --pareto targets.
    The training and tracking commands are replaced by stand-ins that record their environment."""
    spawned = []

    def fake_spawn(self, cmd):
        spawned.append((self.name, cmd[3], self._env()["CUDA_VISIBLE_DEVICES"], cmd))
        if cmd[3] == "track":
            write(self.tracked, payload(self.name))
        seconds = {"a": "2.0", "b": "0.1", "c": "0.1"}[self.name] if cmd[3] == "train" else "0"
        self.proc = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])

    monkeypatch.setattr(run_sweeps.Run, "_spawn", fake_spawn)
    entries = [{"run": n, "config": "configs/activation/relu-2m.json", "priority": i, "est_seconds": 1,
                "total_tokens": 1, "sweeps": {"activation": n}} for i, n in enumerate("abc")]
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"runs": entries}))
    work = tmp_path / "work"
    assert run_sweeps.main(["--plan", str(plan), "--corpus", str(tmp_path), "--work", str(work), "--device", "cuda",
                            "--gpus", "0,1", "--slots-per-gpu", "1", "--poll", "0.02", "--pareto", "0.05,0.1"]) == 0
    assert "finished: 3 done, 0 failed, 0 skipped" in capsys.readouterr().out
    train = [(name, gpu) for name, what, gpu, _ in spawned if what == "train"]
    assert train[:2] == [("a", "0"), ("b", "1")]  # both GPUs busy at once
    assert train[2] == ("c", "1")  # b finishes first: c takes its GPU while a still trains on GPU 0
    tracks = [cmd for _, what, _, cmd in spawned if what == "track"]
    assert len(tracks) == 3 and all(cmd[cmd.index("--pareto") + 1] == "0.05,0.1" for cmd in tracks)
    status = {r["run"]: r for r in json.loads((work / "status.json").read_text())["runs"]}
    assert {n: (r["state"], r["gpu"]) for n, r in status.items()} == {"a": ("done", 0), "b": ("done", 1),
                                                                     "c": ("done", 1)}
    assert sorted(p.name for p in (work / "results" / "activation").iterdir()) == ["a.json", "b.json", "c.json"]
