"""Which batch layout a job uses: shared-prefix rows, or chosen rows and rejected rows.

The shared-prefix layout (training/batching.py) is only right when the model honours our 4D
attention mask and restarted position ids exactly. tests/test_families.py measures that for
every decoder family people fine-tune; two families give different log-probs (tenths of a nat),
and any model with a sliding window shorter than a shared row would too. So each job:

1. refuses the shared layout up front for a known family or a too-short sliding window, and
2. otherwise compares both layouts on one batch of its own data, on the actual model (one extra
   forward pass each, no gradients), token by token, and uses separate rows on a mismatch.
   What is compared is what differs between the layouts, not precision noise: a model whose
   weights are fp32 (any full fine-tune, bf16-mixed included) is compared in fp32, without
   autocast; a model with bf16 weights (a LoRA base under bf16-mixed) is compared in its own
   precision, against the noise that precision alone makes (the same separate rows batched
   together and one pair a pass), since bf16 rounding differs with the batch's shape by as much
   as a layout mismatch would (0.25 nats a token on SmolLM2-135M, plan/decisions.md D34).

Either way the choice and its reason are reported (an event, and metrics.json "layout").
"""

from __future__ import annotations

import contextlib

import torch

from training.batching import collate, collate_shared_prefix
from training.logprobs import token_logps
from training.tokenize import TokenizedPair

# Families whose log-probs differ between the layouts (measured by tests/test_families.py with
# transformers 5.23): gemma2 (eager attention) does not apply our mask as given.
SEPARATE_ROWS_FAMILIES = {"gemma2"}

# Largest difference (nats) of one response token's log-prob between the layouts that still
# counts as the same result: fp32 differs only in summation order (~1e-6 measured); bf16 compute
# (autocast, or a bf16 LoRA base) rounds each layout's activations differently (6e-4 measured on
# a 0.5B model, plan/performance.md).
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}
NOISE_FACTOR = 2.0  # low-precision weights: the layouts may differ by this many times the rounding noise
CHECK_PAIRS = 4  # at most this many of the longest pairs: the likeliest to expose a window or position problem
CHECK_TOKENS = 2048  # at most this many tokens in the check's separate rows (their full-vocabulary logits)


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


def shared_row(pair: TokenizedPair) -> int:
    return len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)


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
def _token_logps(model, examples: list[TokenizedPair], pad_id: int, collate_fn, forward) -> torch.Tensor:
    """Every response token's log-prob of `examples` in one layout, chosen sequences then rejected."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        batch = {k: v.to(device) for k, v in collate_fn(examples, pad_id).items()}
        with forward():
            return token_logps(model, batch)
    finally:
        model.train(was_training)


def layout_difference(model, examples: list[TokenizedPair], pad_id: int, forward=contextlib.nullcontext) -> float:
    """Largest difference (nats) of one response token's log-prob between the two layouts, both
    run in the compute context `forward` (e.g. bf16 autocast, or nothing: the weights' dtype)."""
    separate = _token_logps(model, examples, pad_id, collate, forward)
    shared = _token_logps(model, examples, pad_id, collate_shared_prefix, forward)
    return (separate - shared).abs().max().item()


def rounding_noise(model, examples: list[TokenizedPair], pad_id: int, forward=contextlib.nullcontext) -> float:
    """Largest difference (nats) of one response token's log-prob between the same separate rows
    batched together and one pair a pass: what the compute precision alone changes when only the
    batch's shape does."""
    batched = _token_logps(model, examples, pad_id, collate, forward)
    chosen, rejected = [], []
    for example in examples:
        alone = _token_logps(model, [example], pad_id, collate, forward)
        chosen.append(alone[: len(example.chosen_ids)])
        rejected.append(alone[len(example.chosen_ids) :])
    return (batched - torch.cat(chosen + rejected)).abs().max().item()


def check_sample(examples: list[TokenizedPair], budget: int | None) -> list[TokenizedPair]:
    """The pairs with the longest shared rows, at most CHECK_PAIRS, whose separate rows stay within
    one pass of `budget` tokens and CHECK_TOKENS (at least one pair)."""
    longest = sorted(examples, key=shared_row, reverse=True)
    limit = min(budget or CHECK_TOKENS, CHECK_TOKENS)
    sample = longest[:1]
    for pair in longest[1:CHECK_PAIRS]:
        width = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in [*sample, pair])
        if 2 * (len(sample) + 1) * width > limit:
            break
        sample.append(pair)
    return sample


def choose_layout(
    model,
    examples: list[TokenizedPair],
    pad_id: int,
    requested: bool,
    budget: int | None = None,
    forward=contextlib.nullcontext,
) -> tuple[bool, dict]:
    """(use the shared layout?, a report for events and metrics). `budget`: tokens in one pass;
    `forward`: the job's compute context, used only for a model with low-precision weights."""
    if not requested:
        return False, {"layout": "separate_rows", "reason": "train.shared_prefix is false"}
    reason = known_reason(model, max(shared_row(e) for e in examples))
    if reason is not None:
        return False, {"layout": "separate_rows", "reason": reason}
    floating = [p.dtype for p in model.parameters() if p.is_floating_point()]
    weights_dtype = min(floating, key=lambda d: torch.finfo(d).bits)
    sample = check_sample(examples, budget)
    report = {"self_check_dtype": str(weights_dtype).removeprefix("torch.")}
    if weights_dtype == torch.float32:  # exact up to summation order: no autocast for the check
        tolerance = TOLERANCE[torch.float32]
        difference = layout_difference(model, sample, pad_id)
    else:
        noise = rounding_noise(model, sample, pad_id, forward)
        tolerance = max(TOLERANCE[weights_dtype], NOISE_FACTOR * noise)
        difference = layout_difference(model, sample, pad_id, forward)
        report["self_check_noise"] = noise
    report |= {"self_check_difference": difference, "self_check_tolerance": tolerance}
    if difference > tolerance:
        reason = (
            f"shared-prefix log-probs differ from separate rows by up to {difference:.3g} nats a token"
            f" (tolerance {tolerance:g}) on this model"
        )
        return False, {"layout": "separate_rows", "reason": reason, **report}
    return True, {"layout": "shared_prefix", **report}
