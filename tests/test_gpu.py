"""GPU checks (skipped without CUDA): bf16-mixed training on the device, shared-prefix log-probs
in bf16, the model-family layout matrix in bf16.
Run by tools/gpu_check.sh on a CUDA machine; `make test` runs them wherever a GPU exists."""

import math

import pytest
import torch

from tests.conftest import make_cfg
from tests.test_families import FAMILIES, family_model, random_pairs
from training.layout import SEPARATE_ROWS_FAMILIES, choose_layout

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("lora", [False, True])
def test_bf16_training_on_the_gpu(tmp_path, toy, lora):
    from safetensors import safe_open

    from training import run_training

    cfg = make_cfg(
        lora=lora,
        **{
            "train.precision": "bf16-mixed",
            "train.device": "cuda",
            "train.epochs": 2,
            "train.learning_rate": 3e-3 if lora else 1e-3,
        },
    )
    result = run_training(cfg, toy(128), tmp_path / "out")
    history = result.metrics["history"]
    assert all(math.isfinite(h["loss"]) for h in history)
    assert abs(history[0]["loss"] - math.log(2)) < 1e-2  # bf16 log-probs are scored in fp32, the policy runs in bf16
    assert result.metrics["final_eval"]["eval/rewards/accuracies"] >= 0.9
    # the tiny model is an fp32 checkpoint, so full weights go back to fp32; LoRA adapters are fp32
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    with safe_open(result.output_dir / weights, "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float32


def test_shared_prefix_bf16_on_gpu_matches_separate_rows(tiny_model_path, tokenizer, toy):
    from transformers import AutoModelForCausalLM

    from training.batching import collate, collate_shared_prefix
    from training.logprobs import model_logps
    from training.records import normalise_records
    from training.tokenize import tokenize_pairs

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.bfloat16).cuda().eval()
    pairs, _ = normalise_records(toy(8))
    examples = tokenize_pairs(tokenizer, pairs, 128, 64, "keep_end")
    with torch.no_grad():
        a = model_logps(model, {k: v.cuda() for k, v in collate(examples, tokenizer.pad_token_id).items()})
        b = model_logps(
            model, {k: v.cuda() for k, v in collate_shared_prefix(examples, tokenizer.pad_token_id).items()}
        )
    for x, y in zip(a[:2], b[:2], strict=True):
        torch.testing.assert_close(x, y, rtol=2e-2, atol=0.5)  # bf16 activations: different layouts round differently


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_layouts_in_bf16_on_the_gpu(name, capsys):
    """The CPU matrix (tests/test_families.py) again with bf16 weights on CUDA: the self-check's
    bf16 tolerance keeps the shared layout for every family that honours it, and refuses gemma2."""
    model = family_model(name, dtype=torch.bfloat16, device="cuda").eval()
    use_shared, report = choose_layout(model, random_pairs(8, longest=40), 0, requested=True)
    with capsys.disabled():
        print(f"\n[bf16 layouts] {name}: {report}")
    assert use_shared == (name not in SEPARATE_ROWS_FAMILIES), report
