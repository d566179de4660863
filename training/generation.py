"""Evaluation by what the model says: greedy answers to held-out prompts, before and after.

Reward accuracy says the policy scores chosen above rejected; a user wants to see what it now
answers. At the baseline and at the end of a job the loop asks a `Sampler` for greedy answers to
the first `eval.samples` held-out prompts (the same prompt tokens training saw: chat template,
truncation), and, when the caller said what the preferred behaviour looks like (`eval.contains`,
a regex), the share of answers that show it.

torch is imported where it is used: the service reads this module's limits for its request schema
and must start even where torch cannot be imported (D10's fallback).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MAX_SAMPLES = 64  # eval.samples above this is a config error: generation is slow next to scoring
MAX_NEW_TOKENS = 256  # (a samples event then stays well under a Firestore document's 1 MiB)
SAMPLE_BATCH = 4  # prompts generated together: a small KV cache next to a training pass


def compile_contains(pattern: str | None) -> re.Pattern | None:
    if pattern is None:
        return None
    if not isinstance(pattern, str) or not pattern or len(pattern) > 500:
        raise ValueError(f"eval.contains: expected a regex of 1 to 500 characters, got {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"eval.contains: not a valid regex ({err}): {pattern!r}") from None


@dataclass
class Sampler:
    """Greedy answers of a model to prompts given as token ids, decoded to text."""

    samples: int
    max_new_tokens: int
    contains: re.Pattern | None = None
    tokenizer: object = None  # set once the job's tokenizer is loaded
    shown: list[str] = field(default_factory=list)  # per example index: the prompt as a person wrote it

    @classmethod
    def from_config(cls, eval_cfg) -> Sampler | None:
        samples, max_new = eval_cfg.samples, eval_cfg.max_new_tokens
        if isinstance(samples, bool) or not isinstance(samples, int) or not 0 <= samples <= MAX_SAMPLES:
            raise ValueError(f"eval.samples: expected an integer from 0 to {MAX_SAMPLES}, got {samples!r}")
        if isinstance(max_new, bool) or not isinstance(max_new, int) or not 1 <= max_new <= MAX_NEW_TOKENS:
            raise ValueError(f"eval.max_new_tokens: expected an integer from 1 to {MAX_NEW_TOKENS}, got {max_new!r}")
        contains = compile_contains(eval_cfg.contains)
        return cls(samples, max_new, contains) if samples else None

    def generation_config(self, model):
        from transformers import GenerationConfig

        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = {self.tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=sorted(eos),
        )

    def answers(self, model, prompts: list[list[int]], forward) -> list[str]:
        """Greedy answers to `prompts` (token ids), a few at a time, left-padded. `forward`: the
        job's compute context (bf16 autocast or nothing)."""
        import torch

        device = next(model.parameters()).device
        config = self.generation_config(model)
        was_training = model.training
        model.eval()
        out: list[str] = []
        try:
            for start in range(0, len(prompts), SAMPLE_BATCH):
                chunk = prompts[start : start + SAMPLE_BATCH]
                width = max(len(p) for p in chunk)
                pad = self.tokenizer.pad_token_id
                ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
                with torch.no_grad(), forward():
                    generated = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
                for row in generated[:, width:]:
                    out.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        finally:
            model.train(was_training)
        return out

    def shown_prompt(self, index: int) -> str:
        return self.shown[index] if index < len(self.shown) else ""

    def share(self, answers: list[str]) -> float | None:
        """The share of answers the preferred behaviour (eval.contains) matches, or None."""
        if self.contains is None or not answers:
            return None
        return sum(bool(self.contains.search(a)) for a in answers) / len(answers)


def prompt_text(pair) -> str:
    """What a person asked, for showing beside the answers: the prompt string, or the last user
    turn of a conversation."""
    if pair.messages is None:
        return pair.prompt
    users = [content for role, content in pair.messages if role == "user"]
    return users[-1] if users else pair.messages[-1][1]
