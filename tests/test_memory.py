"""Memory knobs: gradient checkpointing gives the same gradients; the memory estimate fails a job
that cannot fit before any weight is loaded, with the numbers."""

import json

import pytest
import torch

from tests.conftest import make_cfg
from training import run_training
from training.batching import collate, collate_shared_prefix
from training.logprobs import model_logps
from training.memory import GIB, InsufficientMemory, estimate_memory
from training.model import enable_gradient_checkpointing, load_policy, load_tokenizer
from training.records import normalise_records
from training.tokenize import tokenize_pairs


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("shared", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(toy, lora, shared):
    cfg = make_cfg(lora=lora)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same LoRA initialisation both times
        policy, path, _ = load_policy(cfg.model, "fp32", torch.device("cpu"))
        if checkpointing:
            enable_gradient_checkpointing(policy)
        policy.train()
        tokenizer = load_tokenizer(path)
        examples = tokenize_pairs(tokenizer, normalise_records(toy(6))[0], 128, 64, "keep_end")
        batch = (collate_shared_prefix if shared else collate)(examples, tokenizer.pad_token_id)
        chosen, rejected, _ = model_logps(policy, batch)
        (chosen - rejected).sum().backward()
        grads.append({n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_a_run_with_gradient_checkpointing_learns_like_one_without(tmp_path, toy):
    losses = []
    for on in (False, True):
        cfg = make_cfg(**{"train.gradient_checkpointing": on, "train.epochs": 1})
        losses.append([h["loss"] for h in run_training(cfg, toy(48), tmp_path / str(on)).metrics["history"]])
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)


def big_model_dir(tmp_path, tiny_model_path):
    """A config of Llama-3-70B's shape beside the tiny tokenizer: no weights, which the estimate
    never needs (it builds the model on the meta device)."""
    from transformers import AutoTokenizer, LlamaConfig

    LlamaConfig(
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        dtype="bfloat16",
    ).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_model_path).save_pretrained(tmp_path)
    return tmp_path


def test_a_job_that_cannot_fit_fails_before_loading_with_the_numbers(tmp_path, toy, tiny_model_path):
    path = big_model_dir(tmp_path / "llama-70b-shape", tiny_model_path)
    cfg = make_cfg(**{"model.name_or_path": str(path), "model.build": None, "train.device": "cpu"})
    with pytest.raises(InsufficientMemory) as info:
        run_training(cfg, toy(8), tmp_path / "out")  # no weights exist: loading would fail differently
    message = str(info.value)
    assert message.startswith("the job needs about ")
    assert "weights 262." in message and "optimizer 788." in message  # 70.6e9 params: 4 and 8 + 4 bytes each
    assert "GiB free on cpu" in message and "model.lora.enabled=true" in message and "adamw8bit" in message


def test_estimate_parts_follow_precision_lora_and_reference(tmp_path, tiny_model_path):
    path = str(big_model_dir(tmp_path / "m", tiny_model_path))
    n = estimate_memory(make_cfg(), path).weights / 4
    assert n == pytest.approx(70.55e9, rel=1e-3)
    full = estimate_memory(make_cfg(), path)  # fp32
    assert (full.weights, full.gradients, full.optimizer, full.reference) == (4 * n, 4 * n, 12 * n, 0)
    mixed = estimate_memory(make_cfg(**{"train.precision": "bf16-mixed"}), path)
    assert mixed.weights == 6 * n  # fp32 master weights and autocast's bf16 copies
    live = estimate_memory(make_cfg(**{"train.reference": "live"}), path)
    assert live.reference == 4 * n
    lora = estimate_memory(make_cfg(lora=True, **{"train.precision": "bf16-mixed", "model.lora.r": 16}), path)
    assert lora.weights == pytest.approx(2 * n, rel=0.01)  # a bf16 base, and small fp32 adapters
    assert lora.optimizer < full.optimizer / 100
    ckpt = estimate_memory(make_cfg(**{"train.gradient_checkpointing": True}), path)
    assert ckpt.activations < full.activations / 3  # the logits chunk stays
    assert full.total / GIB > 1000


def test_the_estimate_is_recorded(tmp_path, toy):
    result = run_training(make_cfg(**{"train.epochs": 1}), toy(16), tmp_path / "out")
    recorded = json.loads((result.output_dir / "metrics.json").read_text())["memory_estimate_gib"]
    assert recorded["total"] > 0 and set(recorded) >= {"weights", "gradients", "optimizer", "activations"}


def test_the_check_can_be_turned_off(tmp_path, toy, tiny_model_path, monkeypatch):
    def not_called(*args):
        raise AssertionError("the estimate ran with train.memory_check=false")

    monkeypatch.setattr("training.memory.estimate_memory", not_called)
    path = big_model_dir(tmp_path / "m", tiny_model_path)
    values = {"model.name_or_path": str(path), "model.build": None, "train.device": "cpu", "train.memory_check": False}
    with pytest.raises(OSError, match="model.safetensors|pytorch_model.bin"):  # it went on to load the weights
        run_training(make_cfg(**values), toy(8), tmp_path / "out")


def test_8bit_optimizer_and_4bit_base_shrink_the_estimate(tmp_path, tiny_model_path):
    path = str(big_model_dir(tmp_path / "m", tiny_model_path))
    adamw = estimate_memory(make_cfg(), path)
    eight = estimate_memory(make_cfg(**{"train.optimizer": "adamw8bit"}), path)
    n = adamw.weights / 4
    assert eight.optimizer == 2 * n  # two 8-bit moments, no fp32 temporaries
    lora = estimate_memory(make_cfg(lora=True, **{"train.precision": "bf16-mixed"}), path)
    qlora = estimate_memory(
        make_cfg(lora=True, **{"train.precision": "bf16-mixed", "model.quantization": "4bit"}), path
    )
    assert qlora.weights < 0.35 * lora.weights  # ~0.56 bytes for most weights instead of 2
    assert qlora.total / GIB < 80  # a 70B model's QLoRA fits one 80 GB GPU's weights and state


@pytest.mark.parametrize("optimizer", ["adamw8bit", "paged_adamw8bit"])
def test_8bit_adamw_learns_the_toy_task(tmp_path, toy, optimizer):
    cfg = make_cfg(**{"train.optimizer": optimizer, "train.epochs": 2})
    result = run_training(cfg, toy(128), tmp_path / "out")
    assert result.metrics["final_eval"]["eval/rewards/accuracies"] >= 0.9


def test_qlora_trains_adapters_over_a_4bit_base(tmp_path, toy):
    cfg = make_cfg(lora=True, **{"model.quantization": "4bit", "train.epochs": 2, "train.learning_rate": 3e-3})
    events = []
    result = run_training(cfg, toy(128), tmp_path / "out", on_progress=events.append)
    assert result.metrics["final_eval"]["eval/rewards/accuracies"] >= 0.9
    assert "adapter_model.safetensors" in result.files and "model.safetensors" not in result.files
    layout = next(e for e in events if e["kind"] == "layout")
    assert layout["layout"] == "shared_prefix", layout


def test_4bit_without_lora_is_refused(tmp_path, toy):
    with pytest.raises(ValueError, match="model.quantization: 4bit needs model.lora.enabled=true"):
        run_training(make_cfg(**{"model.quantization": "4bit"}), toy(8), tmp_path / "out")
