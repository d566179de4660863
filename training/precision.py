"""Numeric precision: what the trained weights are kept in and what the forward pass computes in.

- fp32: weights, gradients, optimizer state and compute in fp32 (the CPU default).
- bf16-mixed: the trainable weights and the optimizer state stay in fp32 (the master copy) and
  the forward pass runs under bf16 autocast. Pure bf16 training is not offered: an AdamW update
  smaller than half a bf16 unit in the last place of a weight rounds away, which at DPO's usual
  full fine-tuning learning rates (5e-7 to 5e-6) is most updates (plan/decisions.md D21).
  LoRA under bf16-mixed keeps the frozen base in bf16 (half the memory) and the adapters in fp32.

Saved full weights go back to the dtype the model came in (bf16 for a bf16 hub model).
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16-mixed")


def check_precision(name: str) -> str:
    if name not in PRECISIONS:
        raise ValueError(f"train.precision: expected {' | '.join(PRECISIONS)}, got {name!r}")
    return name


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
