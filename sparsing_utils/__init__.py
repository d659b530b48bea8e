"""sparsing-law: PPL-p% activation sparsity and the Sparsing Law.

Implements Luo et al., *Sparsing Law: Towards Large Language Models with Greater
Activation Sparsity*, arXiv:2411.02335 (2024).
"""

__version__ = "0.1.0"
