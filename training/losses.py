"""Preference losses as pure functions of per-example log-prob tensors (shape (B,)).

Conventions (eric-mitchell/direct-preference-optimization):
  pi_logratios  = policy_chosen - policy_rejected
  ref_logratios = reference_chosen - reference_rejected     (0 when reference-free)
  rewards       = beta * (policy - reference), detached
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSSES = ("dpo", "ipo", "hinge", "sft", "dpo_sft")


@dataclass
class LossOutput:
    losses: torch.Tensor  # (B,) per example
    chosen_rewards: torch.Tensor  # (B,) detached
    rejected_rewards: torch.Tensor  # (B,) detached


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor | None,
    reference_rejected: torch.Tensor | None,
    *,
    name: str = "dpo",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    sft_weight: float = 0.0,
    chosen_token_counts: torch.Tensor | None = None,
) -> LossOutput:
    """Per-example loss and rewards.

    dpo      -(1-ls) * logsigmoid(beta*h) - ls * logsigmoid(-beta*h), h = pi - ref logratios
             (label_smoothing > 0 is conservative DPO)
    ipo      (h - 1/(2*beta))^2
    hinge    relu(1 - beta*h)
    sft      NLL of the chosen response (per token when counts are given)
    dpo_sft  dpo + sft_weight * sft
    """
    if name not in LOSSES:
        raise ValueError(f"loss name: expected one of {list(LOSSES)}, got {name!r}")
    if reference_free or reference_chosen is None:
        reference_chosen = torch.zeros_like(policy_chosen)
        reference_rejected = torch.zeros_like(policy_rejected)
    h = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)

    if name in ("dpo", "dpo_sft"):
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    elif name == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif name == "hinge":
        losses = torch.relu(1 - beta * h)
    else:  # sft
        losses = torch.zeros_like(policy_chosen)

    if name in ("sft", "dpo_sft"):
        nll = -policy_chosen
        if chosen_token_counts is not None:
            nll = nll / chosen_token_counts.clamp(min=1)
        losses = losses + (1.0 if name == "sft" else sft_weight) * nll

    chosen_rewards = beta * (policy_chosen - reference_chosen).detach()
    rejected_rewards = beta * (policy_rejected - reference_rejected).detach()
    return LossOutput(losses, chosen_rewards, rejected_rewards)
