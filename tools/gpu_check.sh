#!/usr/bin/env bash
# GPU checks in one call (~6 minutes on an H100/H200), each part writing its results into
# ${OUT:-gpu-results}/ as it finishes:
#   1. tests/test_gpu.py: bf16-mixed training on CUDA, shared-prefix log-probs in bf16, and the
#      model-family layout matrix in bf16 (each family's self-check report is printed);
#   2. tools/gpu_real_shape.py: random-init models of published shapes (Qwen2.5-0.5B full
#      fine-tuning in bf16-mixed at lr 1e-6, with and without gradient checkpointing, with 8-bit
#      AdamW; LoRA over a bf16 base; QLoRA over a 4-bit base; Gemma-2-2B, whose layout falls back
#      to separate rows) with peak memory against the estimate;
#   3. the precision, family, memory, checkpoint and chat-template tests (on CUDA where they
#      pick the device themselves);
#   4. tools/bench_gpu.py: speed at real shapes (Qwen2.5-0.5B and -1.5B, bf16-mixed, max_length
#      1024), ours against TRL's DPOTrainer: tokens/s, MFU, peak GPU memory (~6 minutes).
# PARTS picks parts (default "tests shapes core"; the speed part needs its own call under the
# 10-minute limit): PARTS=speed tools/gpu_check.sh
#
# The device machine has torch/transformers/peft but no package registry: Hydra, OmegaConf,
# bitsandbytes and the pinned transformers/peft travel in .gpu-site/ (git-ignored; `make gpu-site`).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_DISABLED=true
export PYTHONPATH=$PWD
if ls .gpu-site/wheels/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu-site/wheels/*.whl || exit 1
    cp -r .gpu-site/antlr4 /tmp/site/  # antlr4-python3-runtime has no wheel: its package folder travels
    export PYTHONPATH=/tmp/site:$PWD
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c 'import torch, transformers, peft, hydra; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "hydra", hydra.__version__)'
} 2>&1 | tee "$out/env.txt"

parts=${PARTS:-tests shapes core}
gpu_rc=- shape_rc=- core_rc=- speed_rc=-
if [[ " $parts " == *" tests "* ]]; then
    timeout 150 python3 -m pytest -q -p no:cacheprovider -s -rA tests/test_gpu.py 2>&1 | tee "$out/gpu-tests.txt"
    gpu_rc=${PIPESTATUS[0]}
fi
if [[ " $parts " == *" shapes "* ]]; then
    timeout 200 python3 tools/gpu_real_shape.py --out "$out/real-shape.json" 2>&1 | tee "$out/real-shape.txt"
    shape_rc=${PIPESTATUS[0]}
fi
if [[ " $parts " == *" core "* ]]; then
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_precision.py tests/test_families.py tests/test_memory.py \
        tests/test_checkpoint.py tests/test_chat_templates.py 2>&1 | tee "$out/core-tests.txt"
    core_rc=${PIPESTATUS[0]}
fi
if [[ " $parts " == *" speed "* ]]; then
    timeout 480 python3 tools/bench_gpu.py --out "$out/speed.json" 2>&1 | tee "$out/speed.txt"
    speed_rc=${PIPESTATUS[0]}
fi
echo "gpu tests rc=$gpu_rc real shapes rc=$shape_rc core tests rc=$core_rc speed rc=$speed_rc" | tee "$out/summary.txt"
