"""Notebook 01's Mixture-of-Experts branch (issue 10, section 1), executed once with CI parameters on a
tiny random Qwen2-MoE saved as a local model folder (7 experts of width 11, top-3, a gated shared
expert of width 17, a dense first layer; the character-level test tokenizer). The default model is
dense, so tests/test_notebook_01.py covers the notebook unchanged; here: the Fig. 2 curve of the
number of routed experts in the Pareto comparison, and both activation ratios in the results."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from _notebooks import ROOT, assert_figures, execute_once, headline_text, numbers_in
from conftest import build_tiny_tokenizer

from sparsing_utils.results import SparsityReport

NOTEBOOK = ROOT / "notebooks" / "01_ppl_p_sparsity.ipynb"
E, D_E, K, D_S = 7, 11, 3, 17
pytestmark = [pytest.mark.notebook]


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory):
    import transformers as tf

    config = tf.Qwen2MoeConfig(vocab_size=101, hidden_size=24, num_hidden_layers=3, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=512, intermediate_size=19,
                               moe_intermediate_size=D_E, shared_expert_intermediate_size=D_S, num_experts=E,
                               num_experts_per_tok=K, mlp_only_layers=[0], initializer_range=0.2,
                               bos_token_id=None, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-moe")
    tf.Qwen2MoeForCausalLM(config).eval().save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory, moe_folder):
    return execute_once(tmp_path_factory, NOTEBOOK, {"smoke": True, "model": str(moe_folder)})


def test_results_carry_both_activation_ratios(run):
    executed, out = run
    report = SparsityReport.load(out / "result.json")
    for r in report.results:
        assert 0 < r.activation_ratio < r.activation_ratio_ran <= 1
        assert len(r.layer_activation_ratio_ran) == 3
        # the dense first layer counts the same both ways
        assert r.layer_activation_ratio_ran[0] == pytest.approx(r.layer_activation_ratio[0], abs=1e-6)
    text = "\n".join(headline_text(executed))
    assert "over the experts that ran:" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("over the experts that ran"))
    assert numbers_in(line.split(":", 1)[1])[1::2] == pytest.approx([round(r.activation_ratio_ran, 4)
                                                                     for r in report.results], abs=1e-4)


def test_pareto_holds_the_routed_experts_curve(run):
    """The experts rows: k from 1 up (placed from the lowest CETT ratio to 1), each with the all-expert
    ratio (k d_e + d_s) / (E d_e + d_s) in the MoE layers and 1 in the dense one, averaged; rising in k."""
    _, out = run
    pareto = pd.read_csv(out / "pareto.csv")
    assert list(pareto["rule"].unique()) == ["cett", "topk", "topk_global_official", "fat", "experts"]
    experts = pareto[pareto["rule"] == "experts"]
    ks = [int(v) for v in experts["value"]]
    assert ks == sorted(set(ks)) and ks[-1] == E and len(ks) >= 2
    expected = [(1 + 2 * (k * D_E + D_S) / (E * D_E + D_S)) / 3 for k in ks]
    assert list(experts["activation_ratio"]) == pytest.approx(expected, abs=1e-6)
    assert list(experts["activation_ratio_ran"]) == pytest.approx([1.0] * len(ks))
    cett = pareto[pareto["rule"] == "cett"]
    assert cett["activation_ratio_ran"].notna().all() and (cett["activation_ratio_ran"] > cett["activation_ratio"]).all()
    assert_figures(out, ("fig3_pareto", "cett_vs_threshold", "layer_profile"))
