"""Which batch layout a job uses: shared-prefix rows, or chosen rows and rejected rows.

The shared-prefix layout (training/batching.py) is only right when the model honours our 4D
attention mask and restarted position ids exactly. tests/test_families.py measures that for
every decoder family people fine-tune; two families give different log-probs (tenths of a nat),
and any model with a sliding window shorter than a shared row would too. So each job:

1. refuses the shared layout up front for a known family or a too-short sliding window, and
2. otherwise compares both layouts on one batch of its own data, on the actual model (one extra
   forward pass each, no gradients), and uses separate rows on a mismatch.

Either way the choice and its reason are reported (an event, and metrics.json "layout").
"""

from __future__ import annotations

import torch

from training.batching import collate, collate_shared_prefix
from training.logprobs import model_logps
from training.tokenize import TokenizedPair

# Families whose log-probs differ between the layouts (measured by tests/test_families.py with
# transformers 5.23): gemma2 (eager attention) does not apply our mask as given.
SEPARATE_ROWS_FAMILIES = {"gemma2"}

# Largest per-token difference (nats) that still counts as the same result: fp32 differs only in
# summation order (~1e-6 measured); a bf16 base rounds each layout's activations differently.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}
CHECK_PAIRS = 4  # at most this many of the longest pairs: the likeliest to expose a window or position problem


def _config(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config


def sliding_window(model) -> int | None:
    """The attention window of a model that uses one, else None."""
    config = _config(model)
    config = getattr(config, "text_config", None) or config
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


def known_reason(model, longest_row: int) -> str | None:
    """Why the shared layout cannot be right for this model, known before running it."""
    config = _config(model)
    if config.model_type in SEPARATE_ROWS_FAMILIES:
        return f"model family {config.model_type!r} does not honour a custom 4D attention mask"
    if getattr(config, "_attn_implementation", None) in ("flash_attention_2", "flash_attention_3"):
        return f"attention implementation {config._attn_implementation!r} ignores custom 4D masks"
    window = sliding_window(model)
    if window is not None and longest_row > window:
        return f"sliding window ({window} tokens) is shorter than the longest shared row ({longest_row} tokens)"
    return None


@torch.no_grad()
def layout_difference(model, examples: list[TokenizedPair], pad_id: int) -> float:
    """Largest per-token difference (nats) of a sequence's log-prob between the two layouts."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        results = []
        for collate_fn in (collate, collate_shared_prefix):
            batch = {k: v.to(device) for k, v in collate_fn(examples, pad_id).items()}
            chosen, rejected, _ = model_logps(model, batch)
            results.append(torch.cat([chosen, rejected]))
    finally:
        model.train(was_training)
    lengths = [len(e.chosen_ids) for e in examples] + [len(e.rejected_ids) for e in examples]
    counts = torch.tensor(lengths, device=device).clamp(min=1)
    return ((results[0] - results[1]).abs() / counts).max().item()


def check_sample(examples: list[TokenizedPair], budget: int | None) -> list[TokenizedPair]:
    """The longest pairs, at most CHECK_PAIRS, whose separate rows fit one forward pass of
    `budget` tokens (at least one pair)."""
    longest = sorted(examples, key=lambda e: len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids)))[::-1]
    sample = longest[:1]
    for pair in longest[1:CHECK_PAIRS]:
        width = len(sample[0].prompt_ids) + max(len(sample[0].chosen_ids), len(sample[0].rejected_ids))
        if budget is not None and 2 * (len(sample) + 1) * width > budget:
            break
        sample.append(pair)
    return sample


def choose_layout(
    model, examples: list[TokenizedPair], pad_id: int, requested: bool, budget: int | None = None
) -> tuple[bool, dict]:
    """(use the shared layout?, a report for events and metrics). `budget`: tokens in one pass."""
    if not requested:
        return False, {"layout": "separate_rows", "reason": "train.shared_prefix is false"}
    longest_row = max(len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in examples)
    reason = known_reason(model, longest_row)
    if reason is not None:
        return False, {"layout": "separate_rows", "reason": reason}
    dtype = min((p.dtype for p in model.parameters() if p.is_floating_point()), key=lambda d: torch.finfo(d).bits)
    tolerance = TOLERANCE[dtype]
    difference = layout_difference(model, check_sample(examples, budget), pad_id)
    report = {"self_check_difference": difference, "self_check_tolerance": tolerance}
    if difference > tolerance:
        reason = (
            f"shared-prefix log-probs differ from separate rows by {difference:.3g} nats a token"
            f" (tolerance {tolerance:g}) on this model"
        )
        return False, {"layout": "separate_rows", "reason": reason, **report}
    return True, {"layout": "shared_prefix", **report}
