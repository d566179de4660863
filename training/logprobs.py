"""Per-sequence log-probabilities of the response tokens."""

from __future__ import annotations

import torch

from training.batching import IGNORE
from training.distributed import is_sharded


def row_token_logps(logits: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024):
    """log p(token | prefix) of every response token, in fp32, row by row in position order:
    (per-token logps (M,), the row of each (M,)). Only response positions are scored,
    `chunk_size` at a time, so a full-vocabulary fp32 log-softmax of the batch never exists."""
    shifted_labels = labels[:, 1:]
    rows, cols = (shifted_labels != IGNORE).nonzero(as_tuple=True)
    targets = shifted_labels[rows, cols]
    token_logps = []
    for start in range(0, rows.numel(), chunk_size):
        r, c = rows[start : start + chunk_size], cols[start : start + chunk_size]
        chunk = logits[r, c].float()  # (chunk, V): the position c predicts token c+1
        picked = chunk.gather(1, targets[start : start + chunk_size, None]).squeeze(1)
        token_logps.append(picked - torch.logsumexp(chunk, dim=-1))
    per_token = torch.cat(token_logps) if token_logps else logits.new_zeros(0, dtype=torch.float32)
    return per_token, rows


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool = False, chunk_size: int = 1024):
    """Sum (or mean) over response tokens of log p(token | prefix), per row.

    logits (N, T, V) from the model, labels (N, T) with IGNORE outside responses.
    Returns (logps (N,), token counts (N,)).
    """
    per_token, rows = row_token_logps(logits, labels, chunk_size)
    n = labels.shape[0]
    # Accumulate in float64: a sequence's sum of hundreds of terms then stays exact to fp32 precision.
    sums = torch.zeros(n, dtype=torch.float64, device=logits.device).index_add(0, rows, per_token.double()).float()
    counts = torch.zeros(n, dtype=torch.float32, device=logits.device).index_add(0, rows, torch.ones_like(per_token))
    if average:
        return sums / counts.clamp(min=1), counts
    return sums, counts


def naive_sequence_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """The textbook version (full log-softmax), for tests."""
    shifted_labels = labels[:, 1:].clone()
    mask = shifted_labels != IGNORE
    shifted_labels[~mask] = 0
    logp = logits[:, :-1].float().log_softmax(-1).gather(2, shifted_labels[..., None]).squeeze(2)
    sums = (logp.double() * mask).sum(-1).float()
    return sums / mask.sum(-1).clamp(min=1) if average else sums


def model_logps(model, batch: dict[str, torch.Tensor], average: bool = False, chunk_size: int = 1024):
    """One forward pass over a batch -> (chosen logps, rejected logps, chosen token counts).

    Two layouts (training/batching.py): shared-prefix rows [prompt|chosen|rejected], scored
    through the LM head at response positions only; or chosen rows then rejected rows.
    """
    if "score_seq" in batch:
        return shared_prefix_logps(model, batch, average, chunk_size)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logps, counts = sequence_logps(logits, batch["labels"], average=average, chunk_size=chunk_size)
    half = logps.shape[0] // 2
    return logps[:half], logps[half:], counts[:half]


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on hidden states, with the scaling some families apply to logits in their
    *ForCausalLM.forward (which the shared-prefix path does not call): Cohere's logit_scale,
    Granite's logits_scaling, Gemma 2's final_logit_softcapping. tests/test_families.py checks
    every family against its own forward; the per-job self-check (training/layout.py) catches
    any family added later that does something else."""
    config = model.config
    logits = model.get_output_embeddings()(hidden)
    if getattr(config, "logit_scale", None):
        logits = logits * config.logit_scale
    if getattr(config, "logits_scaling", None):
        logits = logits / config.logits_scaling
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def decoder_states(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The decoder's last hidden states for a batch. A model sharded with FSDP2 gathers its root
    weights (embeddings, final norm, a tied LM head) only in the model's own forward, and keeps
    them for the head below: its states are taken from that forward (the LM head on one position
    only) with a hook. Any other model calls its decoder directly, which every family allows."""
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "position_ids": batch["position_ids"],
        "use_cache": False,
    }
    if not is_sharded(model):
        return model.get_decoder()(**inputs).last_hidden_state
    captured = {}
    hook = model.get_decoder().register_forward_hook(
        lambda module, args, output: captured.__setitem__("hidden", output.last_hidden_state)
    )
    try:
        model(**inputs, logits_to_keep=1)
    finally:
        hook.remove()
    return captured["hidden"]


def shared_token_logps(model, batch: dict[str, torch.Tensor], chunk_size: int = 1024):
    """Per-token logps of a shared-prefix batch and the sequence of each (i chosen, B+i rejected)."""
    hidden = decoder_states(model, batch)
    picked = hidden[batch["score_rows"], batch["score_cols"]]  # (M, H)
    targets = batch["score_targets"]
    token_logps = []
    for start in range(0, targets.numel(), chunk_size):
        logits = head_logits(model, picked[start : start + chunk_size]).float()
        chosen = logits.gather(1, targets[start : start + chunk_size, None]).squeeze(1)
        token_logps.append(chosen - torch.logsumexp(logits, dim=-1))
    return torch.cat(token_logps), batch["score_seq"]


def token_logps(model, batch: dict[str, torch.Tensor], chunk_size: int = 1024) -> torch.Tensor:
    """Every response token's logp, sequence by sequence (chosen then rejected), in position
    order, whatever the layout: the two layouts' results compare element by element."""
    if "score_seq" in batch:
        per_token, seq = shared_token_logps(model, batch, chunk_size)
        return per_token[torch.argsort(seq, stable=True)]  # scored pair by pair -> sequence by sequence
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return row_token_logps(logits, batch["labels"], chunk_size)[0]


def shared_prefix_logps(model, batch: dict[str, torch.Tensor], average: bool = False, chunk_size: int = 1024):
    """The decoder runs once per pair; the LM head and the fp32 log-softmax run only on the
    positions that predict a response token, `chunk_size` at a time (prompt and padding
    positions never reach the vocabulary projection)."""
    per_token, seq = shared_token_logps(model, batch, chunk_size)
    n = 2 * batch["input_ids"].shape[0]
    sums = torch.zeros(n, dtype=torch.float64, device=per_token.device).index_add(0, seq, per_token.double()).float()
    counts = torch.zeros(n, dtype=torch.float32, device=per_token.device).index_add(0, seq, torch.ones_like(per_token))
    if average:
        sums = sums / counts.clamp(min=1)
    half = n // 2
    return sums[:half], sums[half:], counts[:half]
