"""Precision (training/precision.py): bf16-mixed keeps small updates, follows fp32, saves the
dtype the model came in. CPU autocast runs bf16, so these run here; tests/test_gpu.py repeats
the training on CUDA."""

import json
import math

import pytest
import torch
from safetensors import safe_open

from tests.conftest import make_cfg
from training import run_training
from training.loop import train_policy
from training.model import load_policy, load_tokenizer
from training.records import normalise_records
from training.tokenize import tokenize_pairs


def test_pure_bf16_adamw_loses_most_small_updates():
    """Why there is no pure-bf16 mode: AdamW's first steps move each weight by ~lr, and at DPO's
    learning rates that is below half a bf16 ulp of a weight of size ~0.02, so it rounds away."""
    torch.manual_seed(0)
    init = torch.randn(4096) * 0.02
    changed = {}
    for dtype in (torch.bfloat16, torch.float32):
        weight = torch.nn.Parameter(init.to(dtype, copy=True))
        optimizer = torch.optim.AdamW([weight], lr=1e-6, weight_decay=0.0)
        for _ in range(10):
            weight.grad = torch.randn_like(weight)
            optimizer.step()
        changed[dtype] = (weight.detach() != init.to(dtype)).float().mean().item()
    assert changed[torch.bfloat16] < 0.1
    assert changed[torch.float32] > 0.99


def _train(precision: str, lr: float, toy, lora: bool = False, steps: int = 24):
    cfg = make_cfg(
        lora=lora,
        **{
            "train.precision": precision,
            "train.learning_rate": lr,
            "train.max_steps": steps,
            "train.epochs": 10,
            "train.evals": 0,
            "data.eval_fraction": 0.0,
        },
    )
    policy, path, _ = load_policy(cfg.model, cfg.train.precision, torch.device("cpu"))
    tokenizer = load_tokenizer(path)
    pairs, _ = normalise_records(toy(64))
    examples = tokenize_pairs(tokenizer, pairs, cfg.data.max_length, cfg.data.max_prompt_length, "keep_end")
    initial = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    state = train_policy(policy, examples, tokenizer.pad_token_id, cfg)
    trained = {n: p.detach() for n, p in policy.named_parameters() if p.requires_grad}
    return policy, state, initial, trained


def test_bf16_mixed_keeps_small_updates_and_follows_fp32(toy):
    """At lr 1e-6 over 24 steps: the fp32 master weights move as many entries as fp32 training does
    (not all: embedding rows of tokens the data never uses get no gradient), and the loss curve
    stays within 0.005 of the fp32 run's at every step (measured: 2e-4 at lr 1e-6, 1e-4 and 1e-3)."""
    curves, moved = {}, {}
    for precision in ("fp32", "bf16-mixed"):
        policy, state, initial, trained = _train(precision, 1e-6, toy)
        assert all(p.dtype == torch.float32 for p in trained.values())  # the master copy
        changed = sum((trained[n] != initial[n]).sum().item() for n in trained)
        moved[precision] = changed / sum(t.numel() for t in trained.values())
        curves[precision] = [h["loss"] for h in state.history]
    assert moved["fp32"] > 0.8
    assert moved["bf16-mixed"] > 0.99 * moved["fp32"], moved
    assert len(curves["fp32"]) == 24
    assert curves["fp32"][-1] < curves["fp32"][0]  # it learns, slowly
    for step, (a, b) in enumerate(zip(curves["fp32"], curves["bf16-mixed"], strict=True), 1):
        assert abs(a - b) < 5e-3, f"step {step}: fp32 loss {a:.5f}, bf16-mixed {b:.5f}"


def test_bf16_mixed_lora_keeps_a_bf16_base_and_fp32_adapters(toy):
    policy, state, initial, trained = _train("bf16-mixed", 1e-4, toy, lora=True, steps=4)
    frozen = [p for p in policy.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert trained and all(p.dtype == torch.float32 for p in trained.values())
    assert all(math.isfinite(h["loss"]) for h in state.history)


@pytest.fixture(scope="module")
def bf16_model_path(tiny_model_path, tmp_path_factory):
    """The tiny model saved as a bf16 checkpoint, like most hub models."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("bf16-tiny")
    AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.bfloat16).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_path).save_pretrained(path)
    return path


@pytest.mark.parametrize("source", ["fp32", "bf16"])
@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_saved_weights_keep_the_dtype_the_model_came_in(
    tmp_path, toy, tiny_model_path, bf16_model_path, source, precision
):
    path = bf16_model_path if source == "bf16" else tiny_model_path
    cfg = make_cfg(
        **{"model.name_or_path": str(path), "model.build": None, "train.precision": precision, "train.max_steps": 2}
    )
    result = run_training(cfg, toy(24), tmp_path / "out")
    want = torch.bfloat16 if source == "bf16" else torch.float32
    with safe_open(result.output_dir / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {want}
    assert json.loads((result.output_dir / "config.json").read_text())["dtype"] == str(want).removeprefix("torch.")
    assert result.metrics["model"]["saved_dtype"] == str(want).removeprefix("torch.")
    assert result.metrics["model"]["precision"] == precision


def test_bf16_mixed_lora_saves_fp32_adapters(tmp_path, toy, bf16_model_path):
    cfg = make_cfg(
        lora=True,
        **{"model.name_or_path": str(bf16_model_path), "model.build": None, "train.precision": "bf16-mixed"},
        **{"train.max_steps": 2},
    )
    result = run_training(cfg, toy(24), tmp_path / "out")
    with safe_open(result.output_dir / "adapter_model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


def test_unknown_precision_is_refused(tmp_path, toy):
    with pytest.raises(ValueError, match=r"train.precision: expected auto \| fp32 \| bf16-mixed, got 'bf16'"):
        run_training(make_cfg(**{"train.precision": "bf16"}), toy(8), tmp_path / "out")
    with pytest.raises(ValueError, match=r"train.gradient_checkpointing: expected auto \| true \| false, got 'yes'"):
        run_training(make_cfg(**{"train.gradient_checkpointing": "yes"}), toy(8), tmp_path / "out")


def test_auto_follows_the_device_and_a_given_value_wins():
    """The GPU presets (and `custom`) say `auto`: bf16-mixed and gradient checkpointing on a CUDA
    GPU with bf16 (compute capability 8.0+), checkpointing in fp32 on an older one, fp32 without
    checkpointing on the CPU. There is no GPU here: the CUDA cases pass the device's capability
    instead of reading it (resolve_auto reads it from the device when none is given)."""
    from training.config import compose_config
    from training.precision import resolve_auto

    cfg = compose_config(model="custom", values={"model.name_or_path": "org/m"})
    assert (cfg.train.precision, cfg.train.gradient_checkpointing) == ("auto", "auto")
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    for device, capability, want in (
        (cpu, None, ("fp32", False)),
        (cuda, (9, 0), ("bf16-mixed", True)),  # H100 / H200
        (cuda, (8, 0), ("bf16-mixed", True)),  # A100
        (cuda, (7, 5), ("fp32", True)),  # T4: no bf16 units
    ):
        resolved = resolve_auto(cfg, device, capability)
        assert (resolved.train.precision, resolved.train.gradient_checkpointing) == want, (device, capability)
    assert cfg.train.precision == "auto"  # the caller's config is left as it was
    given = compose_config(
        model="custom",
        values={"model.name_or_path": "org/m", "train.precision": "fp32", "train.gradient_checkpointing": False},
    )
    assert resolve_auto(given, cuda, (9, 0)) is given  # nothing to resolve
    one = compose_config(model="custom", values={"model.name_or_path": "org/m", "train.precision": "bf16-mixed"})
    resolved = resolve_auto(one, cpu)
    assert (resolved.train.precision, resolved.train.gradient_checkpointing) == ("bf16-mixed", False)


@pytest.mark.parametrize("reference", ["precompute", "live"])
def test_bf16_mixed_runs_every_forward_pass_under_autocast(toy, reference):
    """Policy steps, reference log-probs (precomputed or live), held-out evals and the answers
    generated compute in bf16; the weights stay fp32. The layout self-check, first, compares the
    fp32 weights in fp32: the layouts' difference, not bf16's rounding (D34)."""
    cfg = make_cfg(**{"train.precision": "bf16-mixed", "train.max_steps": 2, "train.reference": reference})
    policy, path, _ = load_policy(cfg.model, cfg.train.precision, torch.device("cpu"))
    tokenizer = load_tokenizer(path)
    examples = tokenize_pairs(tokenizer, normalise_records(toy(24))[0], 128, 64, "keep_end")
    seen = []  # (grad enabled, training mode, output dtype) of each pass through one projection

    def hook(module, args, output):
        seen.append((torch.is_grad_enabled(), module.training, output.dtype))

    # the live reference is a deep copy of the policy: the hook travels with it
    policy.model.layers[0].mlp.down_proj.register_forward_hook(hook)
    train_policy(policy, examples, tokenizer.pad_token_id, cfg)
    self_check, job = seen[:2], seen[2:]  # the self-check: separate rows, then shared-prefix rows
    assert [dtype for *_, dtype in self_check] == [torch.float32, torch.float32]
    assert {dtype for *_, dtype in job} == {torch.bfloat16}
    assert any(grad for grad, *_ in seen) and any(not grad for grad, *_ in seen)  # training and no-grad passes
    assert policy.model.layers[0].mlp.down_proj.weight.dtype == torch.float32
