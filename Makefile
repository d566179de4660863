# DPO fine-tuning microservice. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip
STAMP   := $(VENV)/.installed
PYTHON3 ?= python3
OUT     ?= .cache/runs/toy

export PYTHONPATH := $(CURDIR)
export HF_HUB_OFFLINE := 1
export WANDB_DISABLED := true
export TOKENIZERS_PARALLELISM := false

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-20s %s\n", $$1, $$2}'

$(STAMP): requirements.txt requirements-dev.txt
	@test -x $(PY) || $(PYTHON3) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements-dev.txt
	@touch $(STAMP)

.PHONY: setup
setup: $(STAMP) ## Create .venv/ and install pinned requirements (runtime + dev)

.PHONY: install
install: ## Reinstall the pinned requirements into .venv/
	@rm -f $(STAMP)
	@$(MAKE) --no-print-directory setup

.PHONY: validate-structure
validate-structure: setup ## Import every package and compose every model x loss config
	$(PY) tools/validate_structure.py

.PHONY: test
test: setup ## Run the whole test suite (CPU; slow and emulator tests included)
	$(PY) -m pytest

.PHONY: lint
lint: setup ## Ruff on the code
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

.PHONY: format
format: setup ## Format the code with ruff
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

.PHONY: toy-data
toy-data: setup ## Write the toy preference set in all three formats to .cache/toy/
	$(PY) tools/toy_data.py --n 256 --out-dir .cache/toy

.PHONY: toy-train
toy-train: toy-data ## Train the tiny model on the toy set via the CLI; prints held-out accuracy and artifact path
	$(PY) -m training data.path=.cache/toy/pairs.jsonl output_dir=$(OUT) | grep -v '^@progress'

.PHONY: toy-trigger
toy-trigger: setup ## The whole pipeline: server on loopback, signed toy trigger, job followed to success, server stopped
	$(PY) tools/toy_trigger.py --root .cache/toy-service

.PHONY: api
api: setup ## Run the service on :8000 (needs DPO_WEBHOOK_SECRET, or DPO_ALLOW_UNSIGNED=1 for local experiments)
	$(VENV)/bin/uvicorn webhook_handler:app --host $${HOST:-0.0.0.0} --port $${PORT:-8000}

.PHONY: test-api
test-api: setup ## Only the HTTP API tests (real uvicorn servers on loopback)
	$(PY) -m pytest tests/test_service.py

.PHONY: clean
clean: ## Remove caches and build outputs (never .cache/toy inputs you edited, never data/)
	rm -rf .pytest_cache .ruff_cache .cache/runs .cache/models .cache/toy-service bench-results
	find . -name __pycache__ -type d -not -path './$(VENV)/*' -prune -exec rm -rf {} +
