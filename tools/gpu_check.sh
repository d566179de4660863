#!/usr/bin/env bash
# GPU checks in one call (< 10 minutes on an H100): the training-core tests on the GPU, the GPU
# tests (bf16 training), and a bf16 bench of ours against TRL's DPOTrainer with tokens/s and
# model FLOPs utilisation. Writes into ${OUT:-gpu-results}/.
#
# The device machine has torch/transformers/peft but no registry: packages it lacks travel as
# wheels in .whl/ (see plan/performance.md for how they are fetched).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_DISABLED=true
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'; } 2>&1 | tee "$out/env.txt"
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_losses.py tests/test_logprobs.py \
    tests/test_tokenize.py tests/test_records.py tests/test_config.py tests/test_training_e2e.py tests/test_learning.py tests/test_trl_crosscheck.py 2>&1 | tee "$out/tests.txt"
tests_rc=${PIPESTATUS[0]}
timeout 420 python3 tools/bench.py --device cuda --configs full-v32k,lora-v32k --repeats 2 --pairs 512 --threads 8 \
    --out "$out/bench-gpu.json" 2>&1 | tee "$out/bench.txt"
bench_rc=${PIPESTATUS[0]}
echo "tests rc=$tests_rc bench rc=$bench_rc"
