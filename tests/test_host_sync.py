"""The search's hot paths read the device from the host a fixed number of times per pass, whatever
the model's depth (issue 10: on a GPU each read, and each copy from pageable host memory inside a
hook, makes the host wait for the device queue to drain, exposing kernel-launch latency per layer).

On the CPU the reads are counted by patching the ``Tensor`` methods that return host values
(``item``, ``tolist``, ``cpu``, ``numpy``, ``nonzero``, ``bool``/``float``/``int``/``index``)
during one phase on tiny random Llamas of 2 and 5 layers: the counts must be equal. Copies from
the host inside hooks do not show on the CPU; the CETT rule is checked to compute every layer's
limits before the forward instead, and on CUDA the same phases are counted with
``torch.cuda.set_sync_debug_mode`` (benchmarks/count_syncs.py prints them for a real shape).
"""
from __future__ import annotations

import collections
import warnings

import pytest
import torch
from conftest import Blocks

import sparsing_utils.rules as rules_module
from sparsing_utils.cett import NormHistogram, sketch_projection, sketch_weight
from sparsing_utils.ffn import find_ffn_sites
from sparsing_utils.probe import SparsityProbe
from sparsing_utils.rules import CETTRule, apply_rule

HOST_READS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__float__", "__int__", "__index__")


def tiny_llama(layers: int, device: str = "cpu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=24, num_hidden_layers=layers, intermediate_size=37, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=101, max_position_embeddings=64, bos_token_id=None,
                      eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval().to(device)


def blocks() -> Blocks:
    """5 blocks of 17 tokens, one padded: three batches of 2 with ``batch_size=2``."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 101, (5, 17), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    return Blocks(ids, mask)


def _phases(probe: SparsityProbe, layers: int):
    """The hot paths of the search, in order (each runs after the previous ones)."""
    eps = torch.full((layers,), 0.01)
    return [
        ("prepare", probe.prepare),
        ("layer_cett", lambda: probe.layer_cett(eps)),
        ("exact_curve", lambda: probe.exact_curve(layers=[0])),
        ("sparse pass", lambda: probe.sparse_pass(CETTRule(eps))),
    ]


def host_reads(monkeypatch, layers: int, mode: str) -> dict[str, collections.Counter]:
    counts: collections.Counter = collections.Counter()

    def counted(name, method):
        def wrapper(self, *args, **kwargs):
            counts[name] += 1
            return method(self, *args, **kwargs)
        return wrapper

    probe = SparsityProbe(tiny_llama(layers), blocks(), mode=mode, batch_size=2, curve_tokens=20)
    out = {}
    with monkeypatch.context() as m:
        for name in HOST_READS:
            m.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
        for phase, fn in _phases(probe, layers):
            counts.clear()
            fn()
            out[phase] = collections.Counter(counts)
    return out


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_host_reads_do_not_grow_with_depth(monkeypatch, mode):
    shallow = host_reads(monkeypatch, 2, mode)
    deep = host_reads(monkeypatch, 5, mode)
    assert set(shallow) == {"prepare", "layer_cett", "exact_curve", "sparse pass"}
    for phase in shallow:
        assert deep[phase] == shallow[phase], (phase, dict(shallow[phase]), dict(deep[phase]))
    # per pass, not per batch either: the sparse pass reads the device a handful of times in all
    # (the per-batch reads counted here are of the CPU attention mask, TokenRows and transformers')
    assert deep["sparse pass"]["tolist"] + deep["sparse pass"]["cpu"] + deep["sparse pass"]["item"] <= 4


def test_cett_rule_limits_are_ready_before_the_forward(monkeypatch):
    model = tiny_llama(3)
    sites = find_ffn_sites(model)
    rule = CETTRule([0.01, 0.02, 0.03])
    calls = []
    real = rules_module.activation_limits
    monkeypatch.setattr(rules_module, "activation_limits", lambda *a: calls.append(1) or real(*a))
    ids = blocks().input_ids
    with apply_rule(model, rule, sites=sites):
        before = len(calls)
        assert before == 3  # one per layer, before any hook runs
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        assert len(calls) == before  # nothing computed (or copied) inside the forward
    for s in sites:
        want = real(s.column_norms(), torch.tensor([rule.thresholds[s.index]]))[0]
        assert torch.equal(rule._limits[s.index], want)


def test_cett_rule_with_too_few_thresholds_is_refused_before_the_forward():
    model = tiny_llama(3)
    with pytest.raises(ValueError, match="2 thresholds, the model 3 FFN layers"), apply_rule(model, CETTRule([0.1, 0.2])):
        raise AssertionError("the forward must not start")


def test_sketch_with_a_given_projection_and_histogram_on_the_cpu():
    g = torch.Generator().manual_seed(3)
    w_t = torch.randn(37, 24, generator=g)
    proj = sketch_projection(24, 8, seed=5)
    assert torch.equal(sketch_weight(w_t, 8, seed=5, proj=proj), sketch_weight(w_t, 8, seed=5))
    hist = NormHistogram(2)
    hist.add(0, torch.rand(300, generator=g) * torch.randint(0, 2, (300,), generator=g))
    hist.add(1, torch.rand(50, generator=g) * 1e-3)
    levels = torch.tensor([0.1, 0.5, 0.9])
    cpu = hist.cpu()
    assert torch.equal(cpu.counts, hist.counts) and torch.equal(cpu.zeros, hist.zeros)
    assert torch.equal(cpu.quantiles(levels), hist.quantiles(levels))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts CUDA synchronisations (torch.cuda.set_sync_debug_mode)")
@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_cuda_synchronisations_do_not_grow_with_depth(mode):
    def syncs(layers: int) -> dict[str, int]:
        probe = SparsityProbe(tiny_llama(layers, "cuda"), blocks(), mode=mode, batch_size=2, curve_tokens=20)
        out = {}
        for phase, fn in _phases(probe, layers):
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    fn()
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            out[phase] = sum("synchronizing" in str(w.message) for w in caught)
        return out

    # The first probe of a process pays one-off synchronisations (on the H200: one more in `prepare`,
    # inside torch.cuda, 11 against 10 when [memory] ran first, while [stream], run second, agreed):
    # counted after a throwaway run, so that only a growth with depth fails the test.
    syncs(2)
    shallow, deep = syncs(2), syncs(5)
    assert deep == shallow, (shallow, deep)
