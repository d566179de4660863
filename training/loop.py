"""The DPO training loop: setup -> (reference log-probs) -> train -> evaluate.

`train_policy` is a plain function; the facade (training/facade.py) wraps it with record
normalisation and saving, and the CLI and the service call the facade.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from training import distributed
from training.batching import batch_tokens, check_forward_budget, collate, collate_shared_prefix
from training.checkpoint import load_checkpoint, restore_training_state, run_fingerprint, save_checkpoint
from training.distributed import Ranks
from training.layout import choose_layout
from training.logprobs import model_logps
from training.losses import preference_loss
from training.model import Reference, enable_gradient_checkpointing
from training.precision import compute_context, compute_dtype
from training.tokenize import TokenizedPair

ProgressFn = Callable[[dict], None]
CHECKPOINT_DISCARDED = (
    "a checkpoint from a different configuration, data or batch layout was discarded; training starts over"
)
StopFn = Callable[[], bool]


class TrainingCancelled(Exception):
    """should_stop() returned True at a step boundary; nothing was saved."""


@dataclass
class TrainState:
    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    step: int = 0
    total_steps: int = 0
    layout: dict = field(default_factory=dict)  # which batch layout the job used, and why


def split_train_eval(n: int, eval_fraction: float, max_eval: int, seed: int) -> tuple[list[int], list[int]]:
    """Disjoint train / held-out indices. A single example cannot be split: it trains, no eval."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = 0 if n < 2 or eval_fraction <= 0 else min(max_eval, max(1, round(n * eval_fraction)), n - 1)
    return order[n_eval:], order[:n_eval]


def eval_steps(total: int, evals: int) -> set[int]:
    """The steps after which held-out metrics are computed: `evals` points spread evenly over
    the job, the last at its end (0: only at the end). Step 0 (the baseline) is always added."""
    if isinstance(evals, bool) or not isinstance(evals, int) or evals < 0:
        raise ValueError(f"train.evals: expected a non-negative integer, got {evals!r}")
    points = max(1, min(evals, total))
    return {0} | {round(total * k / points) for k in range(1, points + 1)}  # k = points: the end


def heldout_regressed(baseline: dict, final: dict) -> bool:
    """True when training made the held-out set worse than the initial policy had it: a higher
    held-out loss or a lower reward margin (the policy moved towards the rejected answers)."""
    return final["eval/loss"] > baseline["eval/loss"] + 1e-6 or (
        final["eval/rewards/margins"] < baseline["eval/rewards/margins"] - 1e-6
    )


def lr_lambda(scheduler: str, warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:  # step = optimizer steps taken so far
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        if scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if scheduler == "linear":
            return max(0.0, 1.0 - progress)
        if scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        raise ValueError(f"train.scheduler: expected constant | linear | cosine, got {scheduler!r}")

    return factor


OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit", "rmsprop")


def make_optimizer(params, cfg):
    """AdamW, its 8-bit variants (bitsandbytes: block-wise quantized moments, 2 bytes a parameter
    instead of 8; "paged" also lets the state spill to host memory under pressure), or RMSprop."""
    kwargs = {"lr": cfg.learning_rate, "weight_decay": cfg.weight_decay}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, **kwargs)
    if cfg.optimizer in ("adamw8bit", "paged_adamw8bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit if cfg.optimizer == "adamw8bit" else bnb.optim.PagedAdamW8bit
        return cls(params, **kwargs)
    raise ValueError(f"train.optimizer: expected {' | '.join(OPTIMIZERS)}, got {cfg.optimizer!r}")


class PairBatches:
    """Turns example indices into device batches (shared-prefix rows, or chosen rows then
    rejected rows); the indices travel with them to look up precomputed reference log-probs.
    `passes` splits a batch into forward passes of at most `max_forward_tokens` tokens."""

    def __init__(
        self,
        examples: list[TokenizedPair],
        pad_id: int,
        device: torch.device,
        shared_prefix: bool = True,
        max_forward_tokens: int | None = None,
    ):
        budget = check_forward_budget(max_forward_tokens)
        self.examples, self.pad_id, self.device, self.budget = examples, pad_id, device, budget
        self.collate = collate_shared_prefix if shared_prefix else collate
        self.rows_per_pair = 1 if shared_prefix else 2

    def length(self, i: int) -> int:
        ex = self.examples[i]
        return len(ex.prompt_ids) + len(ex.chosen_ids) + len(ex.rejected_ids)

    def width(self, i: int) -> int:
        """The row width pair i needs in this layout."""
        if self.rows_per_pair == 1:
            return self.length(i)
        ex = self.examples[i]
        return len(ex.prompt_ids) + max(len(ex.chosen_ids), len(ex.rejected_ids))

    def passes(self, indices: list[int]) -> list[list[int]]:
        """A step's pairs, widest first, in passes of at most `budget` tokens: sorting inside the
        step cuts padding and leaves the step's gradient (a sum over its pairs) unchanged."""
        by_width = sorted(indices, key=self.width, reverse=True)
        return micro_batches(by_width, self.width, self.rows_per_pair, self.budget)

    def rank_passes(self, indices: list[int], ranks: Ranks) -> list[tuple[list[int], bool]]:
        """This rank's share of `indices` in passes, with whether each counts: with several ranks,
        passes that count for nothing pad a rank to the busiest rank's number (distributed.lockstep)."""
        return distributed.lockstep(self.passes(distributed.shard(indices, ranks)), indices[:1], ranks, self.device)

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        batch = self.collate([self.examples[i] for i in indices], self.pad_id)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        batch["index"] = torch.tensor(indices, device=self.device)
        return batch


def reference_logps_for(reference: Reference | None, precomputed, batch, loss_cfg, chunk: int):
    """(chosen, rejected) reference log-probs for a batch, or (None, None) when reference-free."""
    if loss_cfg.reference_free:
        return None, None
    if precomputed is not None:
        return precomputed[0][batch["index"]], precomputed[1][batch["index"]]
    with reference.active() as ref_model:
        chosen, rejected, _ = model_logps(ref_model, batch, loss_cfg.average_log_prob, chunk)
    return chosen, rejected


@torch.no_grad()  # not inference_mode: FSDP2 reuses buffers gathered here when training
def precompute_reference(
    reference: Reference, batches: PairBatches, n: int, batch_size: int, loss_cfg, chunk: int, forward, ranks: Ranks
):
    """Reference log-probs of every example, once, before training starts (sorted by length so
    batches carry almost no padding; no autograd bookkeeping). `forward`: the compute context.
    Several ranks each score their share of every batch; the sum over ranks fills in the rest."""
    chosen = torch.zeros(n, device=batches.device)
    rejected = torch.zeros(n, device=batches.device)
    order = sorted(range(n), key=batches.length)
    for start in range(0, n, batch_size):
        for idx, counts in batches.rank_passes(order[start : start + batch_size], ranks):
            batch = batches(idx)
            with reference.active() as ref_model, forward():
                c, r, _ = model_logps(ref_model, batch, loss_cfg.average_log_prob, chunk)
            if counts:
                chosen[batch["index"]], rejected[batch["index"]] = c, r
    distributed.reshard(reference.model)
    return distributed.sum_across(chosen, ranks), distributed.sum_across(rejected, ranks)


def step_batches(order: list[int], batch_size: int) -> list[list[int]]:
    """Split an epoch's shuffled order into optimizer steps. A step is a uniform random sample of
    the training pairs, whatever their lengths: steps built from pairs of similar length are
    correlated (e.g. the longer answer preferred in every pair of a step) and slow learning of
    what the data says (plan/decisions.md D18). Padding is reduced inside a step instead."""
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def micro_batches(
    indices: list[int], width: Callable[[int], int], rows_per_pair: int, budget: int | None
) -> list[list[int]]:
    """Split one step's pairs into consecutive runs whose forward pass (rows x padded width)
    stays within `budget` tokens (at least one pair each; None: one pass). Gradients accumulate
    over the runs, so the step is the same; only the activation memory of a pass is bounded."""
    if budget is None:
        return [indices]
    out, widest = [], 0
    for i in indices:
        w = max(widest, width(i))
        if out and rows_per_pair * (len(out[-1]) + 1) * w <= budget:
            out[-1].append(i)
            widest = w
        else:
            out.append([i])
            widest = width(i)
    return out


def batch_loss(policy, batch, reference, precomputed, loss_cfg, chunk: int):
    """Forward the policy on one (micro-)batch and score it. Returns (LossOutput, policy logps)."""
    chosen, rejected, counts = model_logps(policy, batch, loss_cfg.average_log_prob, chunk)
    ref_chosen, ref_rejected = reference_logps_for(reference, precomputed, batch, loss_cfg, chunk)
    out = preference_loss(
        chosen,
        rejected,
        ref_chosen,
        ref_rejected,
        name=loss_cfg.name,
        beta=loss_cfg.beta,
        label_smoothing=loss_cfg.label_smoothing,
        reference_free=loss_cfg.reference_free,
        sft_weight=loss_cfg.sft_weight,
        chosen_token_counts=None if loss_cfg.average_log_prob else counts,
    )
    return out, chosen.detach(), rejected.detach()


METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def metric_sums(losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> torch.Tensor:
    """The sums over pairs behind each of METRICS, then the number of pairs (float64, on the
    device): sums from several passes or ranks add up, and the means come from one host sync."""
    values = (
        losses,
        chosen_rewards,
        rejected_rewards,
        (chosen_rewards > rejected_rewards).float(),
        chosen_rewards - rejected_rewards,
        chosen_logps,
        rejected_logps,
    )
    sums = [v.detach().double().sum() for v in values]
    return torch.stack([*sums, torch.tensor(float(losses.numel()), dtype=torch.float64, device=losses.device)])


def summarise(sums, prefix: str = "") -> dict:
    """The standard DPO metrics (means over pairs) from metric_sums (a tensor, or its values),
    summed over passes and ranks."""
    *totals, n = sums.tolist() if isinstance(sums, torch.Tensor) else sums
    return {f"{prefix}{name}": total / max(n, 1.0) for name, total in zip(METRICS, totals, strict=True)}


@torch.no_grad()  # not inference_mode: FSDP2 reuses buffers gathered here when training
def evaluate(
    policy, batches, indices, reference, precomputed, loss_cfg, batch_size: int, chunk: int, forward, ranks: Ranks
) -> dict:
    was_training = policy.training
    policy.eval()
    sums = torch.zeros(len(METRICS) + 1, dtype=torch.float64, device=batches.device)
    for start in range(0, len(indices), batch_size):
        for idx, counts in batches.rank_passes(indices[start : start + batch_size], ranks):
            with forward():
                out, c, r = batch_loss(policy, batches(idx), reference, precomputed, loss_cfg, chunk)
            if counts:
                sums += metric_sums(out.losses, out.chosen_rewards, out.rejected_rewards, c, r)
    distributed.reshard(policy)
    policy.train(was_training)
    return summarise(distributed.sum_across(sums, ranks), prefix="eval/")


def train_policy(
    policy,
    examples: list[TokenizedPair],
    pad_id: int,
    cfg,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    eval_examples: list[TokenizedPair] | None = None,
) -> TrainState:
    """Train `policy` in place on `examples` with DPO-family losses. cfg is the composed config.
    Held-out metrics come from `eval_examples` when given (all of `examples` then train), else
    from a split of `examples` (data.eval_fraction).

    With train.checkpoint_dir set, a checkpoint is written every train.checkpoint_every steps and
    when should_stop() stops the run; a run started on a directory holding one resumes from it.
    """
    tcfg, loss_cfg = cfg.train, cfg.loss
    ranks = distributed.current()  # one process, or this one's place among torchrun's
    chunk = tcfg.logprob_chunk_size
    torch.manual_seed(tcfg.seed)
    if eval_examples is None:
        train_idx, eval_idx = split_train_eval(
            len(examples), cfg.data.eval_fraction, cfg.data.max_eval_examples, tcfg.seed
        )
    else:  # one list, so the reference pass and the batches serve both
        train_idx, eval_idx = list(range(len(examples))), list(range(len(examples), len(examples) + len(eval_examples)))
        examples = [*examples, *eval_examples]
    emit = on_progress if on_progress is not None and ranks.main else (lambda event: None)

    if tcfg.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    if ranks.distributed and "8bit" in tcfg.optimizer and not hasattr(policy, "peft_config"):
        raise ValueError(f"train.optimizer: {tcfg.optimizer} cannot update FSDP2's sharded parameters; use adamw")
    # several ranks: FSDP2 for a full fine-tune (moving a model loaded on the CPU to this rank's device)
    distributed.parallelize(policy, tcfg.precision, ranks, distributed.rank_device(tcfg.device))
    device = next(policy.parameters()).device
    forward = compute_context(tcfg.precision, device)  # bf16 autocast around forward passes, or nothing
    budget = check_forward_budget(cfg.model.max_forward_tokens)
    shared, layout = choose_layout(
        policy, examples, pad_id, tcfg.shared_prefix, budget, forward, compute_dtype(tcfg.precision, policy)
    )
    shared, layout = distributed.from_rank0((shared, layout), ranks)  # a close call must not split the ranks
    distributed.reshard(policy)
    emit({"kind": "layout", **layout})
    if tcfg.shared_prefix and not shared:
        emit({"kind": "warning", "message": f"using separate chosen/rejected rows: {layout['reason']}"})
    batches = PairBatches(examples, pad_id, device, shared, budget)

    # Reference log-probs: none (reference-free), precomputed once before training, or live each
    # step. LoRA: the policy with adapters disabled; full fine-tuning: a frozen copy (live) or the
    # policy itself before its first step (precompute).
    checkpoint_dir = Path(tcfg.checkpoint_dir) if tcfg.checkpoint_dir else None
    resume = load_checkpoint(checkpoint_dir)
    fingerprint = run_fingerprint(cfg, examples, layout)
    if resume is not None and resume.get("fingerprint") != fingerprint:
        emit({"kind": "warning", "message": CHECKPOINT_DISCARDED})
        resume = None
    reference, precomputed = None, None
    if not loss_cfg.reference_free:
        if tcfg.reference not in ("precompute", "live"):
            raise ValueError(f"train.reference: expected precompute | live, got {tcfg.reference!r}")
        is_lora = hasattr(policy, "disable_adapter")
        mode = "adapter" if is_lora else "copy" if tcfg.reference == "live" else "self"
        if mode == "copy" and ranks.distributed:
            raise ValueError(
                "train.reference: live needs a frozen copy of the model, not offered on several processes; use precompute"
            )
        reference = Reference(policy, mode)  # before a checkpoint's weights load: the reference is the initial policy
        if tcfg.reference == "precompute":
            if resume is not None and resume["precomputed"] is not None:
                precomputed = tuple(t.to(device) for t in resume["precomputed"])
            else:
                precomputed = precompute_reference(
                    reference, batches, len(examples), tcfg.batch_size, loss_cfg, chunk, forward, ranks
                )
            reference = None

    batch_size = tcfg.batch_size
    steps_per_epoch = math.ceil(len(train_idx) / batch_size)
    total = steps_per_epoch * tcfg.epochs
    if tcfg.max_steps:
        total = min(total, tcfg.max_steps)
    state = TrainState(total_steps=total, layout=layout)

    params = [p for p in policy.parameters() if p.requires_grad]
    replicated = ranks.distributed and not distributed.is_sharded(policy)  # LoRA: gradients averaged here
    optimizer = make_optimizer(params, tcfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg.scheduler, tcfg.warmup_steps, total))
    generator = torch.Generator().manual_seed(tcfg.seed)
    start_epoch, skip = 0, 0
    if resume is not None:
        restore_training_state(checkpoint_dir, resume, policy, optimizer)
        scheduler.load_state_dict(resume["scheduler"])
        torch.set_rng_state(resume["torch_rng"])
        if resume["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(resume["cuda_rng"])
        generator.set_state(resume["position"]["generator_state"])
        start_epoch, skip = resume["position"]["epoch"], resume["position"]["batches_done"]
        state.step, state.history, state.evals = resume["step"], resume["history"], resume["evals"]
        emit({"kind": "resumed", "step": state.step, "total_steps": total})
    eval_at = eval_steps(total, tcfg.evals)  # checked even without an eval split: a bad value fails fast

    def run_eval() -> None:
        """Held-out metrics now, recorded in state.evals (kept in checkpoints) and emitted."""
        result = evaluate(
            policy, batches, eval_idx, reference, precomputed, loss_cfg, batch_size, chunk, forward, ranks
        )
        if state.evals and state.step == total:  # the end: flag a job that made the held-out set worse
            result["eval/regressed"] = heldout_regressed(state.evals[0], result)
        state.evals.append({"step": state.step, **result})
        emit({"kind": "eval", "step": state.step, "total_steps": total, "metrics": result})

    def stop() -> bool:  # every rank stops at the same step boundary, or none does
        return distributed.any_across(should_stop is not None and should_stop(), ranks, device)

    if eval_idx and not state.evals:
        run_eval()  # the baseline: held-out metrics of the initial policy
    policy.train()
    start_time = time.perf_counter()

    def checkpoint(epoch: int, batches_done: int, generator_state) -> None:
        if checkpoint_dir is not None:
            position = {"epoch": epoch, "batches_done": batches_done, "generator_state": generator_state}
            save_checkpoint(
                checkpoint_dir, policy, optimizer, scheduler, state, position, precomputed, fingerprint, ranks
            )
            emit({"kind": "checkpoint", "step": state.step, "total_steps": total})  # a shared store copies it now

    for epoch in range(start_epoch, tcfg.epochs):
        epoch_generator_state = generator.get_state()  # replaying it rebuilds this epoch's batches on resume
        order = [train_idx[i] for i in torch.randperm(len(train_idx), generator=generator).tolist()]
        steps = step_batches(order, batch_size)
        for position, indices in enumerate(steps):
            if epoch == start_epoch and position < skip:
                continue  # done before the checkpoint
            if state.step >= total:
                break
            if stop():
                checkpoint(epoch, position, epoch_generator_state)
                raise TrainingCancelled(f"cancelled before step {state.step + 1} of {total}")
            step_start = time.perf_counter()
            sums = torch.zeros(len(METRICS) + 2, dtype=torch.float64, device=device)  # + the step's tokens
            for micro, counts in batches.rank_passes(indices, ranks):
                batch = batches(micro)
                with forward():
                    out, c, r = batch_loss(policy, batch, reference, precomputed, loss_cfg, chunk)
                # the step's mean over its pairs, times the ranks averaging the gradients; outside autocast, as torch advises
                (out.losses.sum() * (ranks.world if counts else 0.0) / len(indices)).backward()
                if counts:
                    sums[:-1] += metric_sums(out.losses, out.chosen_rewards, out.rejected_rewards, c, r)
                    sums[-1] += batch_tokens(batch)
            if replicated:
                distributed.average_gradients(params, ranks)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, tcfg.max_grad_norm or float("inf"))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            distributed.sum_across(sums, ranks)
            norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: a DTensor
            *pair_sums, tokens, norm = torch.cat([sums, norm.detach().double().reshape(1)]).tolist()  # one host sync
            metrics = summarise(pair_sums)
            elapsed = time.perf_counter() - step_start
            metrics.update(
                step=state.step,
                epoch=epoch + (position + 1) / len(steps),
                grad_norm=norm,
                lr=lr,
                tokens=int(tokens),
                tokens_per_s=tokens / elapsed if elapsed > 0 else 0.0,
                elapsed_s=time.perf_counter() - start_time,
            )
            state.history.append(metrics)
            emit(
                {
                    "kind": "step",
                    "step": state.step,
                    "total_steps": total,
                    "epoch": metrics["epoch"],
                    "metrics": metrics,
                }
            )
            if tcfg.checkpoint_every and state.step % tcfg.checkpoint_every == 0 and state.step < total:
                checkpoint(epoch, position + 1, epoch_generator_state)
            if eval_idx and state.step in eval_at and state.step < total:
                run_eval()

    if eval_idx:
        run_eval()
    return state
