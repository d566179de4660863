"""Tokenized pairs -> padded tensors for one forward pass: one shared-prefix row per pair
(collate_shared_prefix, the default, D15) or chosen rows then rejected rows (collate)."""

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


def check_forward_budget(budget):
    """model.max_forward_tokens: tokens (rows x padded width) in one forward pass, or None."""
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise ValueError(f"model.max_forward_tokens: expected a positive integer or null, got {budget!r}")
    return budget


def batch_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Tokens the batch stands for: non-pad tokens of the chosen + rejected sequences (the
    throughput unit, the same however the batch is laid out). A tensor where the batch is: read
    it with the step's other metrics, not one host sync a pass."""
    if "sequence_tokens" in batch:  # shared prefix: the prompt still counts once per sequence
        return batch["sequence_tokens"]
    return batch["attention_mask"].sum()


def collate_shared_prefix(pairs: list[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """One row per pair: [prompt | chosen | rejected], the prompt computed once for both.

    A 4D attention mask keeps the responses apart (rejected tokens see the prompt and earlier
    rejected tokens, never the chosen ones) and the rejected positions continue from the prompt's
    end, so every response token gets exactly the logits it would get in its own sequence.

    Besides input_ids / attention_mask (B, 1, L, L) / position_ids, the batch lists the scored
    tokens: the position whose output predicts it (score_rows, score_cols), the token
    (score_targets) and the sequence it belongs to (score_seq: i chosen, B+i rejected).

    >>> batch = collate_shared_prefix([TokenizedPair([5, 6], [7], [8, 9]), TokenizedPair([5], [7, 2], [2])], 0)
    >>> batch["input_ids"].tolist()  # [prompt | chosen | rejected], padded on the right
    [[5, 6, 7, 8, 9], [5, 7, 2, 2, 0]]
    >>> batch["position_ids"].tolist()  # the rejected answer continues from the prompt's end
    [[0, 1, 2, 2, 3], [0, 1, 2, 1, 0]]
    >>> batch["attention_mask"][0, 0].int().tolist()  # row 0: 8 and 9 see the prompt, never 7
    [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 0, 1, 0], [1, 1, 0, 1, 1]]
    >>> [batch[k].tolist() for k in ("score_rows", "score_cols", "score_targets", "score_seq")]
    [[0, 0, 0, 1, 1, 1], [1, 1, 3, 0, 1, 0], [7, 8, 9, 7, 2, 2], [0, 2, 2, 1, 1, 3]]

    (Token 8, rejected pair 0's first, is predicted from position 1, the prompt's last, as 7 is.)
    """
    b = len(pairs)
    width = max(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((b, width), dtype=torch.long)
    segment = torch.full((b, width), -1, dtype=torch.long)  # 0 prompt, 1 chosen, 2 rejected, -1 pad
    rows, cols, targets, seqs = [], [], [], []
    for i, pair in enumerate(pairs):
        n_p, n_c, n_r = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
        row = pair.prompt_ids + pair.chosen_ids + pair.rejected_ids
        input_ids[i, : len(row)] = torch.tensor(row)
        position_ids[i, : n_p + n_c] = torch.arange(n_p + n_c)
        position_ids[i, n_p + n_c : len(row)] = torch.arange(n_p, n_p + n_r)
        segment[i, :n_p], segment[i, n_p : n_p + n_c], segment[i, n_p + n_c : len(row)] = 0, 1, 2
        # chosen token k (at n_p + k) is predicted by position n_p + k - 1;
        # rejected token k (at n_p + n_c + k) by the prompt's last position, then its own previous one
        chosen_pred = list(range(n_p - 1, n_p + n_c - 1))
        rejected_pred = [n_p - 1] + list(range(n_p + n_c, n_p + n_c + n_r - 1))
        for preds, tokens, seq in ((chosen_pred, pair.chosen_ids, i), (rejected_pred, pair.rejected_ids, b + i)):
            rows += [i] * len(tokens)
            cols += preds
            targets += tokens
            seqs += [seq] * len(tokens)
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    same_or_prompt = (segment[:, None, :] == 0) | (segment[:, :, None] == segment[:, None, :])
    mask = causal[None] & same_or_prompt & (segment[:, None, :] >= 0)
    mask |= torch.eye(width, dtype=torch.bool)[None]  # padding rows attend to themselves (no empty softmax)
    return {
        "input_ids": input_ids,
        "attention_mask": mask[:, None],
        "position_ids": position_ids,
        "score_rows": torch.tensor(rows),
        "score_cols": torch.tensor(cols),
        "score_targets": torch.tensor(targets),
        "score_seq": torch.tensor(seqs),
        "sequence_tokens": torch.tensor(sum(p.chosen_length + p.rejected_length for p in pairs)),
    }
