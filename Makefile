# im-repro: `make help` lists the targets. Every target sets itself up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
ARTIFACTS := artifacts/.complete
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= true
PYTEST_ARGS ?=

.PHONY: help setup demo test test-slow test-slurm test-all bench-prepare bench-train inspect-demo clean
# The paper's LIMA file when ../shared is beside the checkout; otherwise data=lima downloads it.
LIMA := $(wildcard ../shared/data/paper/lima_data.jsonl)
DATA_PATH := $(if $(LIMA),data.path=$(abspath $(LIMA)),)

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

setup: $(STAMP) $(ARTIFACTS)  ## create .venv with the CPU pins and build the offline artifacts (idempotent)

$(STAMP): pyproject.toml constraints-cpu.txt requirements-offline.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-cpu.txt -e '.[test,slurm]'
	$(PY) -m pip install -q --no-deps -r requirements-offline.txt
	touch $@

$(ARTIFACTS): $(STAMP) scripts/fetch_artifacts.py
	$(PY) scripts/fetch_artifacts.py
	touch $@

demo: setup  ## the main job on a CPU-sized default (today: IT vs IM through the prepare stage)
	$(PY) -m im_repro -m experiment=demo $(DATA_PATH)
	$(PY) scripts/summarize_prepare.py runs/demo

test: setup  ## run the default test suite (slow and SLURM tests excluded)
	$(PY) -m pytest -m "not slow and not slurm" $(PYTEST_ARGS)

test-slow: setup  ## run only the slow tests (SmolLM2 fine-tuning and evaluation, DeepSpeed on CPU)
	$(PY) -m pytest -m "slow and not slurm" $(PYTEST_ARGS)

test-slurm: setup  ## the real SLURM test: starts (as root) and stops a one-node local cluster if none answers
	$(PY) -m pytest -m slurm -rs $(PYTEST_ARGS) tests/test_slurm.py

test-all: setup  ## run every test except the SLURM one (make test-slurm)
	$(PY) -m pytest -m "not slurm" $(PYTEST_ARGS)

bench-prepare: setup  ## time masking against bare tokenization and the paper's prefix re-tokenization
	$(PY) scripts/bench_prepare.py

bench-train: setup  ## training tokens/s: micro-batch 1, padded, length-grouped, packed, dense floor; IT vs IM
	$(PY) scripts/bench_train.py

inspect-demo: setup  ## show which tokens of a LIMA example carry the loss under IT and IM
	$(PY) -m im_repro.inspect data=lima $(DATA_PATH) loss=it --index 30
	$(PY) -m im_repro.inspect data=lima $(DATA_PATH) loss=im --index 30

clean:  ## remove the virtual environment, artifacts and runs
	rm -rf $(VENV) artifacts runs
