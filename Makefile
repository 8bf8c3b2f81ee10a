# Two commands set everything up on a fresh machine:
#   make app    start the app on the embedded default
#   make test   lint and run the whole test suite
# Both create the virtual environment on first use (and again when a requirements file changes).

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PORT ?= 8501

# Never wait on a model hub: nothing here downloads weights unless a user asks for them.
export HF_HUB_OFFLINE ?= 1
# Real data slices beside the checkout (see ../shared/data/README.md), when present.
LOSSATTN_DATA ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)
export LOSSATTN_DATA

.PHONY: app test lint bench perf setup gpu-check

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt requirements-cluster.txt requirements-oracles.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-oracles.txt
	touch $(STAMP)

app: $(STAMP)
	$(PY) -m streamlit run app.py --server.port $(PORT) --browser.gatherUsageStats false

lint: $(STAMP)
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m engine bench

# The Performance table of docs/performance.md (--readme is bench_perf's older name for --docs),
# measured on this machine (quiet it first): about 15 minutes.
perf: $(STAMP)
	$(PY) tests/bench_perf.py --readme --out perf.json

# The CUDA paths on one GPU, in one table (bf16 vs fp32, img/s, MFU, runs): under 8 minutes.
gpu-check: $(STAMP)
	$(PY) -m engine gpu-check --json gpu-check.json
