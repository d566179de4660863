"""Tokenized pairs -> padded tensors, chosen and rejected concatenated for one forward pass."""

from __future__ import annotations

import torch

from training.tokenize import TokenizedPair

IGNORE = -100  # label value for positions that are not response tokens


def collate(pairs: list[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected; padding on the right.

    labels hold the token ids at response positions and IGNORE elsewhere (prompt, padding).
    """
    sequences, labels = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for pair in pairs:
            response = getattr(pair, side)
            sequences.append(pair.prompt_ids + response)
            labels.append([IGNORE] * len(pair.prompt_ids) + response)
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    label_ids = torch.full((len(sequences), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (seq, lab) in enumerate(zip(sequences, labels, strict=True)):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        label_ids[row, : len(lab)] = torch.tensor(lab)
        attention_mask[row, : len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_ids}


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-pad tokens in a batch (the throughput unit)."""
    return int(batch["attention_mask"].sum())
