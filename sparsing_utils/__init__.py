"""sparsing-law: PPL-p% activation sparsity and the Sparsing Law.

Implements Luo et al., *Sparsing Law: Towards Large Language Models with Greater
Activation Sparsity*, arXiv:2411.02335 (2024). Modules, one concept each:

- ``models``        load a causal LM (hub id, local folder, GGUF file, the embedded 4-bit SmolLM2)
- ``gguf_convert``  GGUF files as float models: quantization type, de-quantizing conversion, its cache
- ``hub``           local path or Hugging Face hub: reading a spec, offline mode
- ``sources``       text sources: built-in pydoc/stdlib, local files, ``hf:`` datasets
- ``blocks``        deterministic fixed-length token blocks cut from a source
- ``ffn``           find each layer's FFN; hooks that read or edit the activation vector ``a``
- ``moe``           Mixture-of-Experts layers as one virtual FFN each (every expert's neurons, routing
  weights folded in, held per expert as ``ExpertRows``); the number of routed experts (Fig. 2)
- ``cett``          tensor math: neuron norms, CETT, thresholds (no model)
- ``rules``         sparsification rules: CETT thresholds, Top-k, FAT-eps, ReLU
- ``probe``         ``SparsityProbe``: one model on one set of blocks (dense pass, exact CETT, sparse passes)
- ``search``        the PPL-p% search on the CETT target and Algorithm 1 (``EvaluationTable``)
- ``pareto``        PPL-vs-activation sweeps of each rule family (Fig. 3; routed experts, Fig. 2)
- ``results``       result objects (JSON, atomic) and ``sparse_inference``
- ``jsonio``        the one atomic file writer (JSON or bytes), and the check that an output path can be written
- ``measure``       model + text -> report, end to end (the ``sparsing measure`` command)
- ``laws``          the laws (Eq. 4, Eq. 5, alternatives), one table entry each; the paper's tables
- ``series`` / ``prefit`` / ``fitting``  series input, starting points, lmfit fits with bootstrap CIs
- ``analysis``      notebook 02's analyses: Table 2 explained, forecasts, derived laws (Figs. 5, 8, 12)
- ``plots``         one function per figure
- ``training`` / ``trainer`` / ``shards`` / ``checkpoints`` / ``tracking``  the training lab: what a run
  is (config, schedule, accounting) and how it is trained, on packed token shards, with checkpoints;
  Algorithm 1 through training (``sparsing train`` / ``track``)
- ``runs``          the shipped results of our runs (``data/runs/``): loading, tables, series, seed spread
- ``textclean``     markup -> plain text for the training corpus (``scripts/build_corpus.py``)
- ``evaluation`` / ``eval_tasks``  what sparsity costs on benchmarks: lm-evaluation-harness on a dense or
  PPL-p% sparse model, the offline tasks of Tables 4-5 (``sparsing evaluate``; needs ``lm-eval``)

The measuring names are importable from the package itself (``sparsing_utils.SparsityProbe``);
the laws, fits and figures from their modules (``from sparsing_utils import fitting, laws, plots``),
which need lmfit, matplotlib and seaborn; evaluation from ``from sparsing_utils import evaluation``
(it needs lm-eval, the ``eval`` extra).
"""

__version__ = "0.1.0"

from .blocks import TokenBlocks, blocks_from_text, make_blocks
from .cett import (
    CETTCurve,
    NormHistogram,
    cett_per_token,
    cett_statistics,
    interpolate_thresholds,
    neuron_norms,
    refine_thresholds,
    truncated_norms,
)
from .checkpoints import list_checkpoints
from .ffn import (
    FFNSite,
    count_hooks,
    edit_activations,
    find_ffn_sites,
    read_activations,
)
from .jsonio import atomic_write_json, check_writable
from .measure import check_p_values, measure_probe, measure_sparsity
from .models import (
    DEFAULT_MODEL,
    LoadedModel,
    describe_model,
    load_model,
    smollm2_gguf_path,
)
from .moe import ExpertRows, MoELayer, moe_layers, routed_top_k
from .pareto import experts_for, fat_eps_for, pareto_from_search, pareto_sweep
from .probe import PassStats, SparsityProbe
from .results import CheckpointResult, PPLPResult, SparsityReport, sparse_inference
from .rules import (
    CETTRule,
    DenseRule,
    FATRule,
    ReLURule,
    RoutedExpertsRule,
    SparsityRule,
    TopKRule,
    apply_rule,
)
from .search import EvaluationTable, search_checkpoints, search_ppl_p
from .shards import open_corpus
from .sources import BUILTIN_SOURCES, load_text
from .tracking import track
from .trainer import train
from .training import TrainConfig

__all__ = [
    "BUILTIN_SOURCES",
    "DEFAULT_MODEL",
    "CETTCurve",
    "CETTRule",
    "CheckpointResult",
    "DenseRule",
    "EvaluationTable",
    "ExpertRows",
    "FATRule",
    "FFNSite",
    "LoadedModel",
    "MoELayer",
    "NormHistogram",
    "PPLPResult",
    "PassStats",
    "ReLURule",
    "RoutedExpertsRule",
    "SparsityProbe",
    "SparsityReport",
    "SparsityRule",
    "TokenBlocks",
    "TopKRule",
    "TrainConfig",
    "__version__",
    "apply_rule",
    "atomic_write_json",
    "blocks_from_text",
    "cett_per_token",
    "cett_statistics",
    "check_p_values",
    "check_writable",
    "count_hooks",
    "describe_model",
    "edit_activations",
    "experts_for",
    "fat_eps_for",
    "find_ffn_sites",
    "interpolate_thresholds",
    "list_checkpoints",
    "load_model",
    "load_text",
    "make_blocks",
    "measure_probe",
    "measure_sparsity",
    "moe_layers",
    "neuron_norms",
    "open_corpus",
    "pareto_from_search",
    "pareto_sweep",
    "read_activations",
    "refine_thresholds",
    "routed_top_k",
    "search_checkpoints",
    "search_ppl_p",
    "smollm2_gguf_path",
    "sparse_inference",
    "track",
    "train",
    "truncated_norms",
]
