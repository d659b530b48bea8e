# The two commands of the README: `make main` (notebook 01 on the embedded default model)
# and `make test` (the test suite, as CI runs it). Both do the whole set-up first.
#
# Which Python: the one you name (`make test PYTHON=/path/to/python`), else the active virtual or
# conda environment, else a project environment `.venv/` made here with `python3 -m venv` (a stock
# Debian/Ubuntu Python refuses `pip install` outside one: PEP 668).
BASE_PYTHON ?= python3
ifneq ($(origin PYTHON), undefined)
  PY := $(PYTHON)
else ifneq ($(VIRTUAL_ENV),)
  PY := $(VIRTUAL_ENV)/bin/python
else ifneq ($(CONDA_PREFIX),)
  PY := $(CONDA_PREFIX)/bin/python
else
  PY := .venv/bin/python
endif

OUT ?= outputs/01_ppl_p_sparsity
export HF_HUB_OFFLINE ?= 1

.PHONY: setup main test notebooks

.venv/bin/python:
	@$(BASE_PYTHON) -m venv .venv || { echo "could not create .venv with $(BASE_PYTHON): on Debian/Ubuntu install" \
	  "the venv module (apt install python3-venv), or name a Python: make ... PYTHON=/path/to/python"; exit 1; }

setup: $(if $(filter .venv/bin/python,$(PY)),.venv/bin/python)
	PYTHON=$(PY) bash scripts/setup.sh

main: setup
	mkdir -p $(OUT)
	$(PY) -m papermill notebooks/01_ppl_p_sparsity.ipynb $(OUT)/01_ppl_p_sparsity.ipynb \
		--cwd notebooks -p output_dir ../$(OUT)
	@echo "executed notebook, figures and result.json in $(OUT)/"

test: setup
	$(PY) -m pytest tests -ra -q

notebooks: setup
	$(PY) -m papermill notebooks/02_activation_vs_data.ipynb outputs/02_activation_vs_data/02_activation_vs_data.ipynb --cwd notebooks
	$(PY) -m papermill notebooks/06_evaluation.ipynb outputs/06_evaluation/06_evaluation.ipynb --cwd notebooks
