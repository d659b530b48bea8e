# The two commands of the README: `make main` (notebook 01 on the embedded default model)
# and `make test` (the test suite, as CI runs it). Both do the whole set-up first.
PYTHON ?= python3
OUT ?= outputs/01_ppl_p_sparsity
export HF_HUB_OFFLINE ?= 1

.PHONY: setup main test notebooks

setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

main: setup
	mkdir -p $(OUT)
	$(PYTHON) -m papermill notebooks/01_ppl_p_sparsity.ipynb $(OUT)/01_ppl_p_sparsity.ipynb \
		--cwd notebooks -p output_dir ../$(OUT)
	@echo "executed notebook, figures and result.json in $(OUT)/"

test: setup
	$(PYTHON) -m pytest tests -ra -q

notebooks: setup
	$(PYTHON) -m papermill notebooks/02_activation_vs_data.ipynb outputs/02_activation_vs_data/02_activation_vs_data.ipynb --cwd notebooks
