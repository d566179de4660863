"""Numeric precision: what the trained weights are kept in and what the forward pass computes in.

- fp32: weights, gradients, optimizer state and compute in fp32 (the CPU default).
- bf16-mixed: the trainable weights and the optimizer state stay in fp32 (the master copy) and
  the forward pass runs under bf16 autocast. Pure bf16 training is not offered: an AdamW update
  smaller than half a bf16 unit in the last place of a weight rounds away, which at DPO's usual
  full fine-tuning learning rates (5e-7 to 5e-6) is most updates (plan/decisions.md D21).
  LoRA under bf16-mixed keeps the frozen base in bf16 (half the memory) and the adapters in fp32.

Saved full weights go back to the dtype the model came in (bf16 for a bf16 hub model).

A preset may leave `train.precision` and `train.gradient_checkpointing` at `auto`: resolve_auto
picks them for the device the job runs on, once, before anything reads them (plan/decisions.md D33).
"""

from __future__ import annotations

import contextlib
import copy

import torch

PRECISIONS = ("fp32", "bf16-mixed")
AUTO = "auto"
BF16_CAPABILITY = (8, 0)  # Ampere and newer compute in bf16 natively; older GPUs emulate it slowly


def check_precision(name: str) -> str:
    if name not in PRECISIONS:
        raise ValueError(f"train.precision: expected {' | '.join(PRECISIONS)}, got {name!r}")
    return name


def auto_settings(device: torch.device, capability: tuple[int, int] | None = None) -> tuple[str, bool]:
    """(precision, gradient checkpointing) that suit `device`: on a CUDA device of compute
    capability 8.0 or newer bf16-mixed, else fp32; checkpointing on any CUDA device (GPU memory is
    what long sequences run out of), off on the CPU (RAM is larger, and it costs ~30% more
    compute). `capability`: the CUDA device's, read from it when None (given by tests)."""
    if device.type != "cuda":
        return "fp32", False
    if capability is None:
        capability = torch.cuda.get_device_capability(device)
    return ("bf16-mixed" if tuple(capability) >= BF16_CAPABILITY else "fp32"), True


def resolve_auto(cfg, device: torch.device, capability: tuple[int, int] | None = None):
    """`cfg` with `auto` in train.precision and train.gradient_checkpointing replaced by what
    suits `device` (auto_settings); a copy when anything changed. Given values are checked and
    kept: the code after this (memory estimate, model loading, the loop, the checkpoint
    fingerprint, the saved config and metrics) sees only fp32 | bf16-mixed and true | false."""
    tcfg = cfg.train
    precision, checkpointing = tcfg.precision, tcfg.gradient_checkpointing
    if precision != AUTO and precision not in PRECISIONS:
        raise ValueError(f"train.precision: expected {' | '.join((AUTO, *PRECISIONS))}, got {precision!r}")
    if checkpointing != AUTO and not isinstance(checkpointing, bool):
        raise ValueError(f"train.gradient_checkpointing: expected auto | true | false, got {checkpointing!r}")
    if AUTO not in (precision, checkpointing):
        return cfg
    auto_precision, auto_checkpointing = auto_settings(device, capability)
    cfg = copy.deepcopy(cfg)
    if precision == AUTO:
        cfg.train.precision = auto_precision
    if checkpointing == AUTO:
        cfg.train.gradient_checkpointing = auto_checkpointing
    return cfg


def load_dtype(precision: str, lora: bool) -> torch.dtype:
    """The dtype to load the model in: fp32 master weights, except a frozen LoRA base under bf16."""
    return torch.bfloat16 if check_precision(precision) == "bf16-mixed" and lora else torch.float32


def compute_context(precision: str, device: torch.device):
    """A factory of context managers for forward passes: bf16 autocast, or nothing for fp32."""
    if check_precision(precision) == "bf16-mixed":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def compute_dtype(precision: str, model) -> torch.dtype:
    """The dtype the job's forward passes compute in: bf16 under autocast, else the weights'."""
    if check_precision(precision) == "bf16-mixed":
        return torch.bfloat16
    floating = [p.dtype for p in model.parameters() if p.is_floating_point()]
    return min(floating, key=lambda d: torch.finfo(d).bits)


def declared_dtype(model_config) -> torch.dtype:
    """The dtype a checkpoint declares for its weights (its config.json), fp32 when silent."""
    value = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else torch.float32
