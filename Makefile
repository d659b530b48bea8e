# The two commands of the README: `make main` (notebook 01 on the embedded default model)
# and `make test` (the test suite, as CI runs it). Both do the whole set-up first.
# `make figures` runs the notebooks with their defaults and refreshes docs/figures/ (README: 01-03).
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
# extra papermill parameters for notebook 01, e.g. PARAMS="-p tokens 8192" (the full budget, about twice the time)
PARAMS ?=
export HF_HUB_OFFLINE ?= 1

.PHONY: setup main test notebooks figures nbval

.venv/bin/python:
	@$(BASE_PYTHON) -m venv .venv || { echo "could not create .venv with $(BASE_PYTHON): on Debian/Ubuntu install" \
	  "the venv module (apt install python3-venv), or name a Python: make ... PYTHON=/path/to/python"; exit 1; }

setup: $(if $(filter .venv/bin/python,$(PY)),.venv/bin/python)
	PYTHON=$(PY) bash scripts/setup.sh

main: setup
	mkdir -p $(OUT)
	$(PY) -m papermill notebooks/01_ppl_p_sparsity.ipynb $(OUT)/01_ppl_p_sparsity.ipynb \
		--cwd notebooks -p output_dir ../$(OUT) $(PARAMS)
	@echo "executed notebook, figures and result.json in $(OUT)/"

test: setup
	$(PY) -m pytest tests -ra -q

notebooks: setup
	mkdir -p outputs/02_activation_vs_data
	$(PY) -m papermill notebooks/02_activation_vs_data.ipynb outputs/02_activation_vs_data/02_activation_vs_data.ipynb --cwd notebooks
	@for nb in 03_training_runs 04_width_depth 05_scale_and_patterns; do \
	  mkdir -p outputs/$$nb && $(PY) -m papermill notebooks/$$nb.ipynb outputs/$$nb/$$nb.ipynb --cwd notebooks || exit 1; \
	done
	mkdir -p outputs/06_evaluation
	$(PY) -m papermill notebooks/06_evaluation.ipynb outputs/06_evaluation/06_evaluation.ipynb --cwd notebooks

figures: main notebooks
	$(PY) scripts/figures.py --outputs outputs --dest docs/figures

# every notebook with its default parameters under nbval (lax): do they all still run? (not CI: a second execution)
nbval: setup
	$(PY) -m pytest --nbval-lax --nbval-current-env -q -p no:cacheprovider notebooks/*.ipynb  # kernels start in notebooks/
