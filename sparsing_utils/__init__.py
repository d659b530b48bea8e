"""sparsing-law: PPL-p% activation sparsity and the Sparsing Law.

Implements Luo et al., *Sparsing Law: Towards Large Language Models with Greater
Activation Sparsity*, arXiv:2411.02335 (2024). Modules, one concept each:

- ``models``   load a causal LM (hub id, local folder, GGUF file, the embedded SmolLM2)
- ``corpora``  offline and online text sources, deterministic token blocks
- ``ffn``      find each layer's FFN; hooks that read or edit the activation vector ``a``
- ``cett``     tensor math: neuron norms, CETT, thresholds (no model)
- ``rules``    sparsification rules: CETT thresholds, Top-k, FAT-eps, ReLU
- ``metric``   PPL-p% search (Algorithm 1), Pareto sweeps, results
- ``measure``  model + text -> report, end to end (the ``sparsing measure`` command)
- ``laws`` / ``fitting``  the activation-vs-data laws (Eq. 4, Eq. 5), fits, limits, forecasts
- ``plots``    one function per figure
- ``training`` / ``shards`` / ``checkpoints`` / ``tracking``  the training lab: pre-train small models
  on packed token shards, checkpoints, Algorithm 1 through training (``sparsing train`` / ``track``)
"""

__version__ = "0.1.0"

from .cett import (CETTCurve, NormHistogram, cett_per_token, cett_statistics, interpolate_thresholds,  # noqa: E402
                   neuron_norms, refine_thresholds, truncated_norms)
from .checkpoints import list_checkpoints  # noqa: E402
from .corpora import BUILTIN_SOURCES, TokenBlocks, blocks_from_text, load_text, make_blocks  # noqa: E402
from .ffn import FFNSite, count_hooks, edit_activations, find_ffn_sites, read_activations  # noqa: E402
from .measure import check_p_values, measure_probe, measure_sparsity  # noqa: E402
from .metric import (CheckpointResult, PassStats, PPLPResult, SparsityProbe, SparsityReport,  # noqa: E402
                     pareto_sweep, search_checkpoints, search_ppl_p, sparse_inference)
from .models import DEFAULT_MODEL, LoadedModel, describe_model, load_model, smollm2_gguf_path  # noqa: E402
from .rules import CETTRule, DenseRule, FATRule, ReLURule, SparsityRule, TopKRule, apply_rule  # noqa: E402
from .shards import open_corpus  # noqa: E402
from .tracking import track  # noqa: E402
from .training import TrainConfig, train  # noqa: E402

__all__ = [
    "__version__",
    "CETTCurve",
    "NormHistogram",
    "cett_per_token",
    "cett_statistics",
    "interpolate_thresholds",
    "neuron_norms",
    "refine_thresholds",
    "truncated_norms",
    "BUILTIN_SOURCES",
    "TokenBlocks",
    "blocks_from_text",
    "load_text",
    "make_blocks",
    "FFNSite",
    "count_hooks",
    "edit_activations",
    "find_ffn_sites",
    "read_activations",
    "check_p_values",
    "measure_probe",
    "measure_sparsity",
    "CheckpointResult",
    "PassStats",
    "PPLPResult",
    "SparsityProbe",
    "SparsityReport",
    "pareto_sweep",
    "search_checkpoints",
    "search_ppl_p",
    "sparse_inference",
    "DEFAULT_MODEL",
    "LoadedModel",
    "describe_model",
    "load_model",
    "smollm2_gguf_path",
    "CETTRule",
    "DenseRule",
    "FATRule",
    "ReLURule",
    "SparsityRule",
    "TopKRule",
    "apply_rule",
    "list_checkpoints",
    "open_corpus",
    "track",
    "TrainConfig",
    "train",
]

# Figures and fits need matplotlib/seaborn and lmfit; import them on first use so the
# measuring code also runs where only torch and transformers are installed (GPU boxes).
_LAZY = {"plots": "sparsing_utils.plots", "fitting": "sparsing_utils.fitting", "laws": "sparsing_utils.laws"}


def __getattr__(name: str):
    import importlib

    for module in _LAZY.values():
        mod = importlib.import_module(module)
        if name in getattr(mod, "__all__", ()):
            return getattr(mod, name)
    raise AttributeError(f"module 'sparsing_utils' has no attribute {name!r}")
