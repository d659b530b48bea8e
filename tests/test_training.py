"""The training lab: config checks, schedule, checkpoint positions, parameter and FLOP accounting,
training on a tiny learnable corpus, exact resume, DDP (gloo, 2 processes) and bad input."""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _lab import VOCAB, recurrence, tiny_config, write_tiny_corpus

from sparsing_utils import cli
from sparsing_utils.checkpoints import list_checkpoints
from sparsing_utils.shards import PackedSampler, open_corpus
from sparsing_utils.trainer import train
from sparsing_utils.training import (
    TrainConfig,
    build_model,
    checkpoint_steps,
    flops_per_token,
    make_plan,
    non_embedding_params,
)

ROOT = Path(__file__).resolve().parents[1]


def _losses(run: Path) -> list[tuple[int, float]]:
    recs = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if r["event"] == "train"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_tiny_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def full_run(corpus, tmp_path_factory):
    """One uninterrupted 40-step run (the reference for resume and DDP)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("runs") / "full"
    return train(tiny_config(corpus), out, device="cpu", progress=False)


# -- config -------------------------------------------------------------------------------------

BAD_CONFIGS = [
    ({"activation": "gelu"}, "unknown activation 'gelu'"),
    ({"hidden_size": 25}, "hidden_size 25 is not divisible by num_heads 3"),
    ({"num_heads": 4, "hidden_size": 32, "num_kv_heads": 3}, "num_heads 4 is not divisible by num_kv_heads 3"),
    ({"hidden_size": 18, "num_heads": 2, "num_kv_heads": None}, "head dimension 9"),
    ({"global_batch_tokens": 130}, "not a multiple of seq_len 16"),
    ({"micro_batch_size": 3}, "gradient accumulation is not integral"),
    ({"total_tokens": 16 * 8 * 40 + 16}, "not a positive multiple of global_batch_tokens"),
    ({"total_tokens": None}, "exactly one of total_tokens and tokens_per_param"),
    ({"ffn_ratio": 2.5}, "give d_ff or ffn_ratio, not both"),
    ({"n_checkpoints": 5}, "n_checkpoints must be >= 20"),
    ({"warmup_fraction": 0.5, "decay_fraction": 0.5}, "leave a stable stage"),
    ({"decay_shape": "step"}, "unknown decay_shape"),
    ({"dtype": "float16"}, "unknown dtype"),
    ({"num_layers": 0}, "num_layers must be a positive integer"),
]


@pytest.mark.parametrize("change,message", BAD_CONFIGS, ids=[m for _, m in BAD_CONFIGS])
def test_config_errors_name_the_problem(change, message, tmp_path):
    cfg = tiny_config(tmp_path, **change)
    with pytest.raises(ValueError, match="invalid training config") as err:
        cfg.validate()
    assert message in str(err.value)


def test_config_errors_are_listed_together_and_by_world_size(tmp_path):
    cfg = tiny_config(tmp_path, activation="tanh", hidden_size=25)
    with pytest.raises(ValueError) as err:
        cfg.validate()
    assert "unknown activation 'tanh'" in str(err.value) and "hidden_size 25" in str(err.value)
    tiny_config(tmp_path).validate(world_size=2)  # 8 sequences: 4 per process, one micro-batch
    with pytest.raises(ValueError, match="do not split over 3 processes"):
        tiny_config(tmp_path).validate(world_size=3)


def test_config_json_round_trip_and_unknown_fields(tmp_path):
    cfg = tiny_config(tmp_path, betas=(0.8, 0.9))
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert TrainConfig.from_json(path) == cfg
    with pytest.raises(ValueError, match=r"unknown config field\(s\) 'hiden_size' \(did you mean 'hidden_size'\?\)"):
        TrainConfig.from_dict({"hiden_size": 64})


MOE_BAD = [
    ({"num_experts": 4, "experts_top_k": 5}, "experts_top_k must be in 1..num_experts=4"),
    ({"num_experts": 4, "experts_top_k": 0}, "experts_top_k must be in 1..num_experts=4"),
    ({"num_experts": 0, "experts_top_k": 2}, "num_experts=0 is a dense model: experts_top_k must be 0"),
    ({"num_experts": 1, "experts_top_k": 2}, "an MoE model needs num_experts >= 2"),
    ({"num_experts": 4, "experts_top_k": 2, "moe_style": "switch"}, "unknown moe_style 'switch'"),
    ({"num_experts": 4, "experts_top_k": 2, "router_aux_loss_coef": -1}, "router_aux_loss_coef must be >= 0"),
    ({"num_experts": -3}, "num_experts must be an integer >= 0"),
]


@pytest.mark.parametrize("change,message", MOE_BAD, ids=[m for _, m in MOE_BAD])
def test_mixture_of_experts_config_errors(change, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        tiny_config(tmp_path, **change).validate()
    assert cli.main(["train", "--config", str(_write(tmp_path / "moe.json", tiny_config(tmp_path, **change))),
                     "--out", str(tmp_path / "moe-run")]) == 2
    assert not (tmp_path / "moe-run").exists()


def test_dense_configs_old_and_new_and_the_shipped_runs_load(tmp_path):
    """0/0 (the default) and 1/1 (what configs before issue 10 wrote) are the dense Llama; every
    run JSON in data/runs still loads: the dense runs as dense models, the two MoE runs of Fig. 2 as
    MoE models with their experts."""
    from transformers import LlamaForCausalLM

    for n in (0, 1):
        cfg = tiny_config(tmp_path, num_experts=n, experts_top_k=n)
        cfg.validate()
        assert not cfg.is_moe and type(build_model(cfg, make_plan(cfg, VOCAB))) is LlamaForCausalLM
    runs = sorted((ROOT / "data" / "runs").rglob("*.json"))
    configs = [json.loads(p.read_text()).get("config") for p in runs]
    assert len([c for c in configs if c]) >= 10
    moe = {}
    for c in filter(None, configs):
        cfg = TrainConfig.from_dict(c)
        if cfg.is_moe:
            moe[cfg.name] = (cfg.num_experts, cfg.experts_top_k)
        else:
            assert c["num_experts"] in (0, 1)
    assert moe == {"relu-2m-moe8": (8, 4), "relu-2m-moe16": (16, 7)}


@pytest.mark.parametrize("style", ["mixtral", "qwen3_moe"])
def test_moe_model_parameters_and_flops_match_the_config(style, tmp_path):
    """num_experts=5 of width 19, top-2: the model's class and sizes, its non-embedding parameters
    (all experts + router) and its training FLOPs per token (the 2 experts that ran + router),
    counted by torch's FLOP counter on the eager expert loop."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from sparsing_utils.trainer import NextTokenLoss

    cfg = tiny_config(tmp_path, num_experts=5, experts_top_k=2, d_ff=19, moe_style=style, router_aux_loss_coef=0.0)
    plan = make_plan(cfg, VOCAB)
    model = build_model(cfg, plan)
    assert type(model).__name__ == {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}[style]
    sites = [s for s in __import__("sparsing_utils").find_ffn_sites(model) if s.moe is not None]
    assert len(sites) == 2 and {(s.moe.num_experts, s.moe.d_expert, s.moe.top_k) for s in sites} == {(5, 19, 2)}
    body = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
    assert body == non_embedding_params(cfg) == plan.non_embedding_params
    tokens = torch.randint(0, VOCAB, (2, 17))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        NextTokenLoss(model)(tokens).backward()
    assert counter.get_total_flops() / tokens[:, 1:].numel() == pytest.approx(flops_per_token(cfg, plan.vocab_size))


def test_tiny_moe_trains_and_is_measured(corpus, tmp_path):
    """A Mixtral-style run (4 experts, top-2, the load-balancing loss on) learns, writes HF checkpoints,
    and its last checkpoint is measured: PPL-p% with both activation ratios, and the routed-experts
    curve of Fig. 2."""
    from transformers import AutoModelForCausalLM

    import sparsing_utils as su

    torch.set_num_threads(1)
    cfg = tiny_config(corpus, num_experts=4, experts_top_k=2, d_ff=13, activation="silu", total_tokens=16 * 8 * 24)
    run = train(cfg, tmp_path / "moe", device="cpu", progress=False)
    losses = [x for _, x in _losses(run)]
    assert len(losses) == 24 and losses[-1] < losses[0] - 0.5
    last = list_checkpoints(run)[-1]
    model = AutoModelForCausalLM.from_pretrained(last.path).eval()
    assert model.config.num_local_experts == 4 and model.config.num_experts_per_tok == 2
    ids = torch.as_tensor(recurrence(16 * 33, 9, 7)).view(16, 33)
    probe = su.SparsityProbe(model, _blocks(ids))
    result = su.search_ppl_p(probe, 5, tol=5e-3)
    assert 0 < result.activation_ratio < result.activation_ratio_ran <= 1
    assert len(result.layer_activation_ratio_ran) == 2
    curve = su.pareto_sweep(probe, "experts", [1, 2, 3, 4])
    assert curve["activation_ratio"].tolist() == pytest.approx([0.25, 0.5, 0.75, 1.0], abs=1e-6)


def _blocks(ids):
    from types import SimpleNamespace

    return SimpleNamespace(input_ids=ids, attention_mask=torch.ones_like(ids))


# -- schedule and checkpoint positions -------------------------------------------------------------

def test_warmup_stable_decay_values(tmp_path):
    cfg = tiny_config(tmp_path, global_batch_tokens=16, micro_batch_size=None, total_tokens=16 * 100, lr=2e-3,
                      warmup_fraction=0.1, decay_fraction=0.2, min_lr_ratio=0.1)
    plan = make_plan(cfg, VOCAB)
    assert (plan.total_steps, plan.warmup_steps, plan.decay_start) == (100, 10, 80)
    expected = {0: 2e-4, 4: 1e-3, 9: 2e-3, 10: 2e-3, 50: 2e-3, 79: 2e-3,
                80: 2e-3 * (0.1 + 0.9 * (1 - 1 / 20)), 89: 2e-3 * (0.1 + 0.9 * 0.5), 99: 2e-4}
    for step, lr in expected.items():
        assert plan.lr_at(step) == pytest.approx(lr, rel=1e-12), step
    assert [plan.stage_at(s) for s in (0, 9, 10, 79, 80, 99)] == ["warmup", "warmup", "stable", "stable", "decay", "decay"]
    assert plan.checkpoint_stage(80) == "stable" and plan.checkpoint_stage(81) == "decay"
    assert 80 in plan.checkpoint_steps  # the last stable step is always a checkpoint
    cos = make_plan(dataclasses.replace(cfg, decay_shape="cosine"), VOCAB)
    assert cos.lr_at(89) == pytest.approx(2e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))


@pytest.mark.parametrize("total", [21, 37, 100, 3052, 10**6])
def test_checkpoint_positions_are_log_spaced(total):
    steps = checkpoint_steps(total, 20, 0.005, extra=(int(total * 0.9),))
    assert len(steps) >= 21 and steps[-1] == total and steps[0] >= 1  # 20 before the final one
    assert all(a < b for a, b in itertools.pairwise(steps))  # monotone and unique
    assert int(total * 0.9) in steps
    if total >= 10**6:
        gaps = np.diff(np.log([s for s in steps if s != int(total * 0.9)]))
        assert gaps.std() < 0.01 * gaps.mean()  # geometric
    with pytest.raises(ValueError, match="cannot hold 20 checkpoints"):
        checkpoint_steps(20, 20, 0.005)


# -- accounting ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [{"hidden_size": 24, "num_heads": 3, "num_kv_heads": 1, "d_ff": 37, "num_layers": 2},
                                   {"hidden_size": 40, "num_heads": 5, "num_kv_heads": None, "d_ff": None, "ffn_ratio": 2.7,
                                        "num_layers": 3, "tie_embeddings": False}])
def test_non_embedding_parameters_match_the_model(shape, tmp_path):
    cfg = tiny_config(tmp_path, **shape)
    plan = make_plan(cfg, VOCAB)
    model = build_model(cfg, plan)
    counted = {"body": 0, "embedding": 0}
    for name, p in model.named_parameters():  # tied weights appear once
        counted["embedding" if ("embed_tokens" in name or "lm_head" in name) else "body"] += p.numel()
    assert counted["body"] == non_embedding_params(cfg) == plan.non_embedding_params
    assert counted["embedding"] == plan.embedding_params
    assert model.config.hidden_act == cfg.activation and model.config._attn_implementation == "sdpa"


def test_flops_per_token_against_a_hand_count_and_the_flop_counter(tmp_path):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from sparsing_utils.trainer import NextTokenLoss

    cfg = tiny_config(tmp_path, hidden_size=48, num_heads=3, num_kv_heads=1, d_ff=80, num_layers=2, seq_len=16,
                      global_batch_tokens=32, micro_batch_size=None, total_tokens=32 * 40)
    # By hand, per layer: q 48x48, k and v 48x16 (one kv head of 16), o 48x48, gate/up/down 48x80 -> 17,664
    # weights; 2 layers + LM head 48x100 -> 40,128; x6 = 240,768; attention 12 * 2 layers * 48 * 16 = 18,432.
    assert flops_per_token(cfg, 100) == 259_200
    model = build_model(cfg, make_plan(cfg, 100))
    tokens = torch.randint(0, 100, (2, 17))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # attention as counted bmm's
        NextTokenLoss(model)(tokens).backward()
    assert counter.get_total_flops() / tokens[:, 1:].numel() == 259_200


# -- data ---------------------------------------------------------------------------------------

def test_batches_are_a_pure_function_of_step_and_cover_each_epoch(tmp_path):
    from sparsing_utils.shards import write_corpus

    # token = its own position (+ 30,000 for code): every window says where it was cut
    c = open_corpus(write_corpus(tmp_path, train={"prose": np.arange(20000), "code": 30000 + np.arange(9000)},
                                 heldout={"prose": np.arange(100)}, vocab_size=65536, eos_id=0))
    a = PackedSampler(c, seq_len=16, batch_seqs=8, seed=1)
    b = PackedSampler(c, seq_len=16, batch_seqs=8, seed=1)
    assert np.array_equal(a.batch(7), b.batch(7))
    assert np.array_equal(np.concatenate([a.batch(7, r, 2) for r in range(2)]), a.batch(7))
    assert not np.array_equal(a.batch(7), PackedSampler(c, seq_len=16, batch_seqs=8, seed=2).batch(7))
    assert a.mixture == {"code": 0.25, "prose": 0.75}  # 9,000 and 20,000 tokens, largest remainder of 8 sequences
    rows = np.concatenate([a.batch(step) for step in range(281)])
    assert (np.diff(rows, axis=1) == 1).all()  # contiguous windows of 17 tokens
    code = rows[rows[:, 0] >= 30000, 0] - 30000
    # code: 2 sequences per step, (9000 - 1) // 16 = 562 blocks; 281 steps = one epoch, each block once
    assert sorted(code.tolist()) == [16 * i for i in range(562)]
    assert a.epochs(281)["code"] == pytest.approx(1.0)
    nxt = np.concatenate([a.batch(step) for step in range(281, 562)])
    assert sorted((nxt[nxt[:, 0] >= 30000, 0] - 30000).tolist()) == [16 * i for i in range(562)]  # epoch 2
    assert not np.array_equal(nxt[nxt[:, 0] >= 30000, 0], rows[rows[:, 0] >= 30000, 0])  # in a new order
    small = PackedSampler(c, seq_len=16, batch_seqs=8, seed=1, train_fraction=0.1)
    assert small.batch(0)[:, -1].max() < 30000 + 900 and small.n_blocks == {"code": 56, "prose": 124}


def test_corpus_files_are_written_whole_with_the_usual_permissions(tmp_path):
    """write_corpus goes through jsonio's atomic writer: no temporary file is left, every file
    has the umask's permissions (not mkstemp's 0600), and the token files hold the ids given."""
    from sparsing_utils.shards import write_corpus

    out = write_corpus(tmp_path / "c", train={"prose": np.arange(300) % 97}, heldout={"prose": np.arange(40)},
                       vocab_size=97, eos_id=0, tokenizer_json="{}")
    mask = os.umask(0o022)
    os.umask(mask)
    files = sorted(out.iterdir())
    assert [f.name for f in files] == ["heldout_prose.bin", "meta.json", "tokenizer.json", "train_prose.bin"]
    assert {oct(f.stat().st_mode & 0o777) for f in files} == {oct(0o666 & ~mask)}
    assert np.array_equal(np.fromfile(out / "train_prose.bin", dtype="<u2"), np.arange(300) % 97)
    assert (out / "tokenizer.json").read_text() == "{}"


def test_corpus_errors_say_what_is_missing(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_corpus(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "train_prose.bin").write_bytes(b"\0\0")
    with pytest.raises(FileNotFoundError, match="incomplete: no meta.json"):
        open_corpus(tmp_path / "half")
    cut = write_tiny_corpus(tmp_path / "cut")
    with open(cut / "train_code.bin", "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(ValueError, match="truncated"):
        open_corpus(cut)


# -- training, resume, DDP ------------------------------------------------------------------------

def test_training_learns_and_writes_checkpoints(full_run):
    losses = [x for _, x in _losses(full_run)]
    assert len(losses) == 40 and losses[0] > math.log(VOCAB) - 0.3 and losses[-1] < losses[0] - 1.5
    ckpts = list_checkpoints(full_run)
    assert len(ckpts) >= 22 and ckpts[-1].step == 40 and ckpts[-1].stage == "decay"
    held = [c.state["heldout_loss"] for c in ckpts]
    assert held[-1] < held[0] - 1.5
    assert [c.resumable for c in ckpts] == [False] * (len(ckpts) - 1) + [True]  # optimizer kept for the newest only
    assert all((c.path / "model.safetensors").is_file() for c in ckpts)
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(ckpts[-1].path)  # a plain HF folder
    assert hf.config.hidden_act == "relu" and hf.config.num_hidden_layers == 2
    saved = json.loads((full_run / "config.json").read_text())
    assert saved["plan"]["grad_accum"] == 2 and saved["code_version"]["package"]


def test_resume_after_a_kill_gives_the_same_losses(full_run, corpus, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "killed"
    cfg = tiny_config(corpus)
    train(cfg, out, device="cpu", progress=False, stop_after_steps=26)  # "killed" 2 steps after the checkpoint at 24
    assert list_checkpoints(out)[-1].step == 24 and max(s for s, _ in _losses(out)) == 26
    train(cfg, out, resume=True, device="cpu", progress=False)
    assert _losses(out) == _losses(full_run)  # bit-identical float32 losses, each step once
    from safetensors.torch import load_file

    a = load_file(str(list_checkpoints(full_run)[-1].path / "model.safetensors"))
    b = load_file(str(list_checkpoints(out)[-1].path / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _write(path: Path, cfg: TrainConfig) -> Path:
    path.write_text(json.dumps(cfg.to_dict()))
    return path


def test_ddp_two_processes_match_one(full_run, corpus, tmp_path):
    """torchrun, 2 CPU processes (gloo), same global batch: the same losses within float tolerance."""
    cfg = _write(tmp_path / "cfg.json", tiny_config(corpus))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "sparsing_utils.cli", "train", "--config", str(cfg), "--out", str(tmp_path / "ddp"),
                        "--device", "cpu", "--quiet"], env=env, capture_output=True, text=True, timeout=240, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[:4000]
    one, two = _losses(full_run), _losses(tmp_path / "ddp")
    assert [s for s, _ in one] == [s for s, _ in two]
    np.testing.assert_allclose([x for _, x in two], [x for _, x in one], rtol=2e-5)
    saved = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert saved["world_size"] == 2 and saved["plan"]["grad_accum"] == 1


# -- bad input through the command line ------------------------------------------------------------

def _snapshot(run: Path) -> dict:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*")}


def test_cli_bad_input_fails_early_and_leaves_checkpoints_intact(full_run, corpus, tmp_path, capsys):
    before = _snapshot(full_run)
    good = _write(tmp_path / "good.json", tiny_config(corpus))
    # --out exists without --resume
    assert cli.main(["train", "--config", str(good), "--out", str(full_run)]) == 2
    assert "exists and is not empty: pass --resume" in capsys.readouterr().err
    # unknown activation / shapes that do not divide
    for change, msg in (({"activation": "swish"}, "unknown activation 'swish'"),
                        ({"hidden_size": 26}, "hidden_size 26 is not divisible by num_heads 3")):
        bad = _write(tmp_path / "bad.json", tiny_config(corpus, **change))
        assert cli.main(["train", "--config", str(bad), "--out", str(full_run), "--resume"]) == 2
        assert msg in capsys.readouterr().err
        assert cli.main(["train", "--config", str(bad), "--out", str(tmp_path / "new")]) == 2
        assert not (tmp_path / "new").exists()
    # resuming with a different config
    other = _write(tmp_path / "other.json", tiny_config(corpus, lr=5e-3))
    assert cli.main(["train", "--config", str(other), "--out", str(full_run), "--resume"]) == 2
    assert "lr: 0.01 -> 0.005" in capsys.readouterr().err
    # missing / incomplete corpus
    assert cli.main(["train", "--config", str(good), "--out", str(tmp_path / "x"), "--corpus", str(tmp_path)]) == 2
    assert "incomplete: no meta.json" in capsys.readouterr().err
    assert _snapshot(full_run) == before and not (tmp_path / "x").exists()


def test_resume_refuses_a_corrupt_checkpoint(full_run, corpus, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(full_run, run)
    last = list_checkpoints(run)[-1].path / "model.safetensors"
    with open(last, "r+b") as fh:
        fh.truncate(last.stat().st_size - 10)
    before = _snapshot(run)
    good = _write(tmp_path / "good.json", tiny_config(corpus))
    assert cli.main(["train", "--config", str(good), "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint" in err and "is corrupt" in err and "tokens-000000005120" in err and "delete the folder" in err
    assert _snapshot(run) == before


def test_dry_run_prints_the_plan(corpus, tmp_path, capsys):
    cfg = _write(tmp_path / "c.json", tiny_config(corpus, total_tokens=None, tokens_per_param=30))
    assert cli.main(["train", "--config", str(cfg), "--out", str(tmp_path / "dry"), "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    n = plan["non_embedding_params"]
    assert plan["total_steps"] == math.ceil(30 * n / 128) and plan["total_tokens"] >= 30 * n
    assert not (tmp_path / "dry").exists()


def test_recurrence_is_learnable_by_construction():
    x = recurrence(1000, 0, 7)
    follows = np.mean((5 * x[:-1] + 7) % VOCAB == x[1:])
    assert 0.85 < follows < 0.95


# -- the sweeps and the benchmark, as the GPU session will run them --------------------------------

def test_sweep_configs_are_in_sync_and_meet_the_issue():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import make_sweeps
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    files = make_sweeps.build()
    for rel, payload in files.items():
        assert json.loads((ROOT / rel).read_text()) == json.loads(json.dumps(payload)), f"{rel}: run scripts/make_sweeps.py"
    plan = files["configs/plan.json"]
    runs = {r["run"]: r for r in plan["runs"]}
    for r in plan["runs"]:
        cfg = TrainConfig.from_json(ROOT / r["config"])
        p = make_plan(cfg, make_sweeps.VOCAB)
        if cfg.is_moe:  # Fig. 2: the dense 2M run's active FFN width and tokens
            dense = TrainConfig.from_json(ROOT / runs["relu-2m"]["config"])
            assert cfg.experts_top_k * cfg.d_ff == dense.d_ff and p.total_tokens == runs["relu-2m"]["total_tokens"]
            assert len(p.checkpoint_steps) >= 21
        else:
            assert p.total_tokens >= 200 * p.non_embedding_params and len(p.checkpoint_steps) >= 21
        assert p.decay_start in p.checkpoint_steps and p.grad_accum == 1 and cfg.compile
    sizes = {runs[f"{a}-{s}"]["non_embedding_params"] for a in ("relu", "silu") for s in ("1m", "2m", "4m")}
    assert len(sizes) == 3
    wd = [r for r in plan["runs"] if "width_depth" in r["sweeps"]]
    ratios = sorted(r["width_depth_ratio"] for r in wd)
    assert len(wd) >= 6 and ratios[0] <= 2 and ratios[-1] >= 140
    assert all(abs(r["non_embedding_params"] / 2e6 - 1) < 0.12 for r in wd)
    assert len([r for r in plan["runs"] if "seeds" in r["sweeps"]]) == 3
    assert len([r for r in plan["runs"] if "seeds_silu" in r["sweeps"]]) == 3
    assert {r["run"] for r in plan["runs"] if "moe" in r["sweeps"]} == {"relu-2m-rerun", "relu-2m-moe8", "relu-2m-moe16"}
    assert TrainConfig.from_json(ROOT / runs["relu-2m-frac005"]["config"]).train_fraction == 0.05
    assert [r["priority"] for r in plan["runs"]] == sorted(r["priority"] for r in plan["runs"])


def test_benchmark_runs_on_cpu(tmp_path):
    """The speed benchmark's CPU path: one tiny config, one step after one warmup step."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_training.py"), "--device", "cpu",
                        "--configs", "tiny-a", "--steps", "1", "--warmup", "1", "--vocab", "256", "--no-scaling",
                        "--no-share", "--out", str(out)], env=env, capture_output=True, text=True, timeout=240,
                       check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads(out.read_text())["per_config"][0]
    assert "error" not in row, row
    assert row["tokens_per_s"] > 0 and row["flops_per_token"] > 0 and row["steps"] == 1
    assert "training speed on cpu" in r.stdout
