# neurojepa_pl: `make help` lists the targets.
# Every target works on a fresh machine: it creates .venv and installs the project first.
#
# torch: TORCH_SPEC (default torch==2.13.0) is installed before the project. From the public PyPI index that pin is
# the CUDA 13 build (~0.5 GB + the CUDA libraries); a CPU-only machine gets the ~200 MB CPU build with
#   make install TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# (pip then takes torch from PyTorch's CPU index and everything else from PyPI). Bring your own torch instead with
#   make install TORCH_SPEC=    (an empty spec keeps whatever torch the venv already has; setup: README).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
# LitData (shard cache) is installed without dependencies: it declares torchvision, which would replace the torch above.
LITDATA_SPEC ?= litdata==0.2.76
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=
TORCH_INDEX_ARGS := $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL),)
# Typed packages: the pure rooms (no Lightning) that every other part builds on.
TYPED := neurojepa_pl/models neurojepa_pl/masks neurojepa_pl/losses

.DEFAULT_GOAL := help
.PHONY: help install demo test test-fast lint typecheck bench clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(if $(TORCH_SPEC),$(PY) -m pip install $(TORCH_INDEX_ARGS) "$(TORCH_SPEC)",@echo "TORCH_SPEC is empty: keeping the torch already in $(VENV)")
	$(PY) -m pip install -e ".[dev]"
	$(PY) -m pip install --no-deps "$(LITDATA_SPEC)"
	touch $@

install: $(VENV)/.installed ## create .venv and install the project (torch: see the top of this Makefile)

demo: install ## SynthBrain cohort -> JEPA pretraining -> probe table (~4-5 min on 2 CPU cores)
	$(VENV)/bin/neurojepa synth --out $(DEMO_DIR)/synthbrain --subjects 48 --seed 0 --grid model
	$(PY) -m neurojepa_pl.demos.pretrain_probe --workdir $(DEMO_DIR)

test: install ## run the test suite (the command CI runs)
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

test-fast: install ## tests without the slow tier
	$(PY) -m pytest -m "not gpu and not slow" $(PYTEST_ARGS)

lint: install ## ruff (lint + format check) and the type check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(MAKE) --no-print-directory typecheck

typecheck: install ## mypy on the pure packages (models, masks, losses)
	$(VENV)/bin/mypy $(TYPED)

bench: install ## CPU benchmarks (print JSON with ratios against in-run baselines)
	$(PY) benchmarks/moe_dispatch.py --device cpu
	$(PY) benchmarks/data_loader.py
	$(PY) benchmarks/pretrain_step.py --device cpu --preset tiny

clean: ## remove build artefacts, caches and demo runs (keeps .venv)
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache runs lightning_logs
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
