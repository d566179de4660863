"""Every decoder family people fine-tune: the shared-prefix layout gives the same log-probs and
gradients as separate rows, or training/layout.py refuses it for that model.

Tiny random models of each family's architecture are built from configs here (no download).
tests/test_gpu.py runs the same matrix in bf16 on CUDA.
"""

from __future__ import annotations

import random

import pytest
import torch

from training.batching import collate, collate_shared_prefix
from training.layout import SEPARATE_ROWS_FAMILIES, TOLERANCE, choose_layout, known_reason, layout_difference
from training.logprobs import model_logps
from training.tokenize import TokenizedPair

SMALL = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
# name -> (transformers model_type, settings beyond SMALL that the family needs or is known for)
FAMILIES = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 16}),
    "qwen3_moe": (
        "qwen3_moe",
        {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    ),
    "mistral": ("mistral", {}),
    "gemma": ("gemma", {"head_dim": 16}),
    "gemma2": ("gemma2", {"head_dim": 16, "final_logit_softcapping": 30.0}),
    "gemma3": ("gemma3_text", {"head_dim": 16, "final_logit_softcapping": 30.0}),
    "phi3": ("phi3", {}),
    "phi": ("phi", {}),
    "gpt_neox": ("gpt_neox", {}),
    "gpt2": ("gpt2", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512}),
    "olmo": ("olmo", {}),
    "olmo2": ("olmo2", {}),
    "smollm3": ("smollm3", {}),
    "starcoder2": ("starcoder2", {}),
    "falcon": ("falcon", {}),
    "stablelm": ("stablelm", {}),
    "granite": ("granite", {"logits_scaling": 8.0}),  # scales logits in its forward
    "cohere": ("cohere", {"logit_scale": 0.0625}),  # likewise
}


def family_model(name: str, dtype=torch.float32, device="cpu", **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, settings = FAMILIES[name]
    config = AutoConfig.for_model(model_type, **{**SMALL, **settings, **extra})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)


def random_pairs(n: int = 4, seed: int = 0, longest: int = 12) -> list[TokenizedPair]:
    rng = random.Random(seed)

    def ids(lo, hi):
        return [rng.randrange(3, 256) for _ in range(rng.randint(lo, hi))]

    return [TokenizedPair(ids(min(3, longest), longest), ids(1, longest), ids(1, longest)) for _ in range(n)]


def both_layouts(model, pairs, device="cpu"):
    """(separate rows, shared prefix): each (chosen logps, rejected logps) with gradients."""
    out = []
    for collate_fn in (collate, collate_shared_prefix):
        batch = {k: v.to(device) for k, v in collate_fn(pairs, 0).items()}
        chosen, rejected, _ = model_logps(model, batch)
        out.append(torch.cat([chosen, rejected]))
    return out


def gradients(model, logps: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    (logps * torch.linspace(-1, 1, logps.numel(), device=logps.device)).sum().backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_shared_prefix_equals_separate_rows_or_is_refused(name):
    model = family_model(name).eval()
    pairs = random_pairs()
    separate, shared = both_layouts(model, pairs)
    use_shared, report = choose_layout(model, pairs, 0, requested=True)
    if name in SEPARATE_ROWS_FAMILIES:
        assert not use_shared and "does not honour" in report["reason"]
        # the list stays honest: the family really differs (drop it from the list when fixed)
        assert (separate - shared).abs().max().item() > 0.05
        return
    assert use_shared, report
    torch.testing.assert_close(shared, separate, rtol=0, atol=1e-4)
    want, got = gradients(model, separate), gradients(model, shared)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-3, atol=1e-5, msg=lambda m, k=key: f"{name} {k}: {m}")


@pytest.mark.parametrize("name", ["mistral", "qwen2", "gemma3"])
def test_a_sliding_window_shorter_than_a_shared_row_is_refused(name):
    extra = {"use_sliding_window": True, "max_window_layers": 0} if name == "qwen2" else {}
    model = family_model(name, sliding_window=8, **extra).eval()
    pairs = random_pairs(longest=12)
    separate, shared = both_layouts(model, pairs)
    assert (separate - shared).abs().max().item() > 0.05  # the window really changes the result
    use_shared, report = choose_layout(model, pairs, 0, requested=True)
    assert not use_shared and report["reason"].startswith("sliding window (8 tokens) is shorter")
    # pairs that fit the window keep the shared layout, and it is exact
    short = random_pairs(longest=2)
    assert choose_layout(model, short, 0, requested=True)[0]
    torch.testing.assert_close(*both_layouts(model, short), rtol=0, atol=1e-4)


def test_the_self_check_catches_a_family_it_does_not_know(monkeypatch):
    """With gemma2 taken off the known list, the one-batch comparison still refuses it."""
    monkeypatch.setattr("training.layout.SEPARATE_ROWS_FAMILIES", set())
    model = family_model("gemma2").eval()
    pairs = random_pairs()
    assert known_reason(model, 40) is None
    use_shared, report = choose_layout(model, pairs, 0, requested=True)
    assert not use_shared
    assert report["self_check_difference"] > report["self_check_tolerance"] == TOLERANCE[torch.float32]
    assert report["reason"].startswith("shared-prefix log-probs differ from separate rows by")


def test_layout_difference_is_zero_for_identical_layouts():
    model = family_model("llama").eval()
    assert layout_difference(model, random_pairs(), 0) < 1e-5
