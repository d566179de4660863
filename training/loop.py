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
from training.errors import NonFiniteError
from training.generation import Sampler
from training.layout import choose_layout
from training.logprobs import model_logps
from training.losses import LossOutput, preference_loss
from training.model import Reference, enable_gradient_checkpointing
from training.precision import compute_context
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
    samples: list[dict] = field(default_factory=list)  # greedy answers to held-out prompts: prompt, before, after


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
    held-out loss or a lower reward margin (the policy moved towards the rejected answers).
    Written as "not as good", so a NaN anywhere counts as regressed, never as fine."""
    loss_held = final["eval/loss"] <= baseline["eval/loss"] + 1e-6
    margin_held = final["eval/rewards/margins"] >= baseline["eval/rewards/margins"] - 1e-6
    return not (loss_held and margin_held)


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


class ReferenceLogps:
    """A batch's reference log-probs: none (a reference-free loss), precomputed once before
    training (kept in checkpoints), or live from a Reference model each step."""

    def __init__(self, loss_cfg, chunk: int, live: Reference | None = None, precomputed=None):
        self.loss_cfg, self.chunk, self.live, self.precomputed = loss_cfg, chunk, live, precomputed

    def __call__(self, batch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.loss_cfg.reference_free:
            return None, None
        if self.precomputed is not None:
            return self.precomputed[0][batch["index"]], self.precomputed[1][batch["index"]]
        with self.live.active() as ref_model:
            chosen, rejected, _ = model_logps(ref_model, batch, self.loss_cfg.average_log_prob, self.chunk)
        return chosen, rejected


def setup_reference(policy, batches: PairBatches, n: int, cfg, resume: dict | None, forward, ranks: Ranks):
    """Where reference log-probs come from. LoRA: the policy with adapters disabled; a full
    fine-tune: a frozen copy (live) or the policy itself before its first step (precompute,
    or the values a checkpoint kept)."""
    tcfg, loss_cfg, chunk = cfg.train, cfg.loss, cfg.train.logprob_chunk_size
    if loss_cfg.reference_free:
        return ReferenceLogps(loss_cfg, chunk)
    if tcfg.reference not in ("precompute", "live"):
        raise ValueError(f"train.reference: expected precompute | live, got {tcfg.reference!r}")
    is_lora = hasattr(policy, "disable_adapter")
    mode = "adapter" if is_lora else "copy" if tcfg.reference == "live" else "self"
    if mode == "copy" and ranks.distributed:
        raise ValueError(
            "train.reference: live needs a frozen copy of the model, not offered on several processes; use precompute"
        )
    reference = Reference(policy, mode)  # before a checkpoint's weights load: the reference is the initial policy
    if tcfg.reference == "live":
        return ReferenceLogps(loss_cfg, chunk, live=reference)
    if resume is not None and resume["precomputed"] is not None:
        return ReferenceLogps(loss_cfg, chunk, precomputed=tuple(t.to(batches.device) for t in resume["precomputed"]))
    precomputed = precompute_reference(reference, batches, n, tcfg.batch_size, loss_cfg, chunk, forward, ranks)
    return ReferenceLogps(loss_cfg, chunk, precomputed=precomputed)


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
    chosen, rejected = distributed.sum_across(chosen, ranks), distributed.sum_across(rejected, ranks)
    if not bool(torch.isfinite(chosen).all() and torch.isfinite(rejected).all()):
        raise NonFiniteError(0, "reference log-probs")
    return chosen, rejected


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


@dataclass
class PairScores:
    """One (micro-)batch scored: the loss terms, and the policy's log-probs (detached)."""

    loss: LossOutput
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor

    def metric_sums(self) -> torch.Tensor:
        """The sums over pairs behind each of METRICS, then the number of pairs (float64, on the
        device): sums from several passes or ranks add up, and the means come from one host sync."""
        out = self.loss
        values = (
            out.losses,
            out.chosen_rewards,
            out.rejected_rewards,
            (out.chosen_rewards > out.rejected_rewards).float(),
            out.chosen_rewards - out.rejected_rewards,
            self.chosen_logps,
            self.rejected_logps,
        )
        sums = [v.detach().double().sum() for v in values]
        pairs = torch.tensor(float(out.losses.numel()), dtype=torch.float64, device=out.losses.device)
        return torch.stack([*sums, pairs])


def batch_loss(policy, batch, reference: ReferenceLogps, loss_cfg, chunk: int) -> PairScores:
    """Forward the policy on one (micro-)batch and score it."""
    chosen, rejected, counts = model_logps(policy, batch, loss_cfg.average_log_prob, chunk)
    ref_chosen, ref_rejected = reference(batch)
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
    return PairScores(out, chosen.detach(), rejected.detach())


METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def summarise(sums: list[float], prefix: str = "") -> dict:
    """The standard DPO metrics (means over pairs) from PairScores.metric_sums values, summed
    over passes and ranks and read to the host."""
    *totals, n = sums
    return {f"{prefix}{name}": total / max(n, 1.0) for name, total in zip(METRICS, totals, strict=True)}


# -- a run: setup, then steps -------------------------------------------------------------------
@dataclass
class Run:
    """What a training run holds from its setup to its end (setup_run builds it)."""

    policy: torch.nn.Module
    cfg: object
    ranks: Ranks
    device: torch.device
    forward: Callable  # the compute context: bf16 autocast around forward passes, or nothing
    batches: PairBatches
    reference: ReferenceLogps
    train_idx: list[int]
    eval_idx: list[int]
    params: list[torch.nn.Parameter]
    replicated: bool  # several ranks, LoRA: gradients are averaged here, not by FSDP2
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator  # the epochs' shuffling
    state: TrainState
    fingerprint: str
    checkpoint_dir: Path | None
    emit: ProgressFn
    eval_at: set[int]
    sampler: Sampler | None = None  # greedy answers to held-out prompts at the baseline and the end
    start_epoch: int = 0
    skip: int = 0  # steps of start_epoch done before the checkpoint resumed from

    @property
    def total(self) -> int:
        return self.state.total_steps


def setup_run(policy, examples: list[TokenizedPair], pad_id: int, cfg, on_progress, eval_examples, sampler=None) -> Run:
    """Everything before the first step: the split, the model's placement and batch layout, the
    reference log-probs, the optimizer and schedule, and a checkpoint's state when resuming."""
    tcfg = cfg.train
    ranks = distributed.current()  # one process, or this one's place among torchrun's
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
    forward = compute_context(tcfg.precision, device)
    budget = check_forward_budget(cfg.model.max_forward_tokens)
    shared, layout = choose_layout(policy, examples, pad_id, tcfg.shared_prefix, budget, forward)
    shared, layout = distributed.from_rank0((shared, layout), ranks)  # a close call must not split the ranks
    distributed.reshard(policy)
    emit({"kind": "layout", **layout})
    if tcfg.shared_prefix and not shared:
        emit({"kind": "warning", "message": f"using separate chosen/rejected rows: {layout['reason']}"})
    batches = PairBatches(examples, pad_id, device, shared, budget)

    checkpoint_dir = Path(tcfg.checkpoint_dir) if tcfg.checkpoint_dir else None
    resume = load_checkpoint(checkpoint_dir)
    fingerprint = run_fingerprint(cfg, examples, layout)
    if resume is not None and resume.get("fingerprint") != fingerprint:
        emit({"kind": "warning", "message": CHECKPOINT_DISCARDED})
        resume = None
    reference = setup_reference(policy, batches, len(examples), cfg, resume, forward, ranks)

    total = math.ceil(len(train_idx) / tcfg.batch_size) * tcfg.epochs
    if tcfg.max_steps:
        total = min(total, tcfg.max_steps)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, tcfg)
    run = Run(
        policy=policy,
        cfg=cfg,
        ranks=ranks,
        device=device,
        forward=forward,
        batches=batches,
        reference=reference,
        train_idx=train_idx,
        eval_idx=eval_idx,
        params=params,
        replicated=ranks.distributed and not distributed.is_sharded(policy),
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg.scheduler, tcfg.warmup_steps, total)),
        generator=torch.Generator().manual_seed(tcfg.seed),
        state=TrainState(total_steps=total, layout=layout),
        fingerprint=fingerprint,
        checkpoint_dir=checkpoint_dir,
        emit=emit,
        eval_at=eval_steps(total, tcfg.evals),  # checked even without an eval split: a bad value fails fast
        sampler=sampler if eval_idx and not ranks.distributed else None,
    )
    if sampler is not None and eval_idx and ranks.distributed:
        emit(
            {
                "kind": "warning",
                "message": "eval.samples: answers are not generated when a job runs on several processes",
            }
        )
    if resume is not None:
        restore(run, resume)
    return run


def restore(run: Run, resume: dict) -> None:
    """Continue where a checkpoint left off: weights, optimizer, schedule, random state, position."""
    restore_training_state(run.checkpoint_dir, resume, run.policy, run.optimizer)
    run.scheduler.load_state_dict(resume["scheduler"])
    torch.set_rng_state(resume["torch_rng"])
    if resume["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(resume["cuda_rng"])
    run.generator.set_state(resume["position"]["generator_state"])
    run.start_epoch, run.skip = resume["position"]["epoch"], resume["position"]["batches_done"]
    run.state.step, run.state.history, run.state.evals = resume["step"], resume["history"], resume["evals"]
    run.state.samples = resume.get("samples", [])
    run.emit({"kind": "resumed", "step": run.state.step, "total_steps": run.total})


def scheduled_steps(run: Run):
    """(epoch, position, steps in the epoch, pair indices, the epoch's generator state) for each
    step still to run: a fresh shuffle every epoch; on resume, the epoch's shuffle is replayed
    from the checkpoint's generator state and the steps done before it are skipped."""
    for epoch in range(run.start_epoch, run.cfg.train.epochs):
        generator_state = run.generator.get_state()
        order = [run.train_idx[i] for i in torch.randperm(len(run.train_idx), generator=run.generator).tolist()]
        steps = step_batches(order, run.cfg.train.batch_size)
        for position, indices in enumerate(steps):
            if epoch == run.start_epoch and position < run.skip:
                continue  # done before the checkpoint
            if run.state.step >= run.total:
                return
            yield epoch, position, len(steps), indices, generator_state


def train_step(run: Run, indices: list[int]) -> dict:
    """One optimizer step on the pairs `indices` (this rank's share of them, in passes within the
    forward budget); returns the step's metrics, read from the device in one host sync."""
    ranks, loss_cfg, chunk = run.ranks, run.cfg.loss, run.cfg.train.logprob_chunk_size
    sums = torch.zeros(len(METRICS) + 2, dtype=torch.float64, device=run.device)  # + the step's tokens
    for micro, counts in run.batches.rank_passes(indices, ranks):
        batch = run.batches(micro)
        with run.forward():
            scores = batch_loss(run.policy, batch, run.reference, loss_cfg, chunk)
        # the step's mean over its pairs, times the ranks averaging the gradients; outside autocast, as torch advises
        (scores.loss.losses.sum() * (ranks.world if counts else 0.0) / len(indices)).backward()
        if counts:
            sums[:-1] += scores.metric_sums()
            sums[-1] += batch_tokens(batch)
    if run.replicated:
        distributed.average_gradients(run.params, ranks)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, run.cfg.train.max_grad_norm or float("inf"))
    lr = run.scheduler.get_last_lr()[0]
    distributed.sum_across(sums, ranks)
    norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: a DTensor
    *pair_sums, tokens, norm = torch.cat([sums, norm.detach().double().reshape(1)]).tolist()  # one host sync
    metrics = summarise(pair_sums)
    check_finite({**metrics, "gradient norm": norm}, run.state.step + 1)  # before the step: no weight takes it
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.state.step += 1
    return {**metrics, "step": run.state.step, "grad_norm": norm, "lr": lr, "tokens": int(tokens)}


def check_finite(values: dict, step: int, prefix: str = "") -> None:
    """Raise NonFiniteError naming the first of `values` that is inf or NaN, causes first: the
    policy's log-probs, then the rewards and loss built on them, then the gradient."""
    causes = [f"{prefix}{name}" for name in FINITE_ORDER if f"{prefix}{name}" in values]
    for name in causes + [n for n in values if n not in causes]:
        if isinstance(values[name], float) and not math.isfinite(values[name]):
            raise NonFiniteError(step, name)


FINITE_ORDER = ("logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected", "loss", "gradient norm")


@torch.no_grad()  # not inference_mode: FSDP2 reuses buffers gathered here when training
def evaluate(run: Run) -> dict:
    """Held-out metrics of the policy now (means over the held-out pairs)."""
    policy, batches, ranks = run.policy, run.batches, run.ranks
    was_training = policy.training
    policy.eval()
    sums = torch.zeros(len(METRICS) + 1, dtype=torch.float64, device=batches.device)
    batch_size = run.cfg.train.batch_size
    for start in range(0, len(run.eval_idx), batch_size):
        for idx, counts in batches.rank_passes(run.eval_idx[start : start + batch_size], ranks):
            with run.forward():
                scores = batch_loss(policy, batches(idx), run.reference, run.cfg.loss, run.cfg.train.logprob_chunk_size)
            if counts:
                sums += scores.metric_sums()
    distributed.reshard(policy)
    policy.train(was_training)
    metrics = summarise(distributed.sum_across(sums, ranks).tolist(), prefix="eval/")
    check_finite(metrics, run.state.step, prefix="eval/")
    return metrics


def record_samples(run: Run, result: dict) -> None:
    """At the baseline and at the end: greedy answers to the first eval.samples held-out prompts
    (kept in state.samples, emitted), and the share showing the preferred behaviour in `result`."""
    sampler, state = run.sampler, run.state
    indices = run.eval_idx[: sampler.samples]
    prompts = [run.batches.examples[i].prompt_ids for i in indices]
    answers = sampler.answers(run.policy, prompts, run.forward)
    phase = "after" if state.evals else "before"
    if phase == "before":
        state.samples = [
            {"prompt": sampler.shown_prompt(i), "before": a} for i, a in zip(indices, answers, strict=True)
        ]
    else:
        if len(state.samples) != len(answers):  # resumed from a checkpoint that kept no baseline answers
            state.samples = [{"prompt": sampler.shown_prompt(i), "before": None} for i in indices]
        for sample, answer in zip(state.samples, answers, strict=True):
            sample["after"] = answer
    share = sampler.share(answers)
    if share is not None:
        result["eval/contains_share"] = share
        before = state.evals[0].get("eval/contains_share") if phase == "after" else None
        if before is not None:
            result["eval/contains_share_before"] = before
    run.emit({"kind": "samples", "step": state.step, "phase": phase, "samples": state.samples})


def record_eval(run: Run, final: bool = False) -> None:
    """Held-out metrics now, recorded in state.evals (kept in checkpoints) and emitted; at the
    baseline and the end (`final`) with the sampler's answers too."""
    state = run.state
    result = evaluate(run)
    if run.sampler is not None and (final or not state.evals):
        record_samples(run, result)
    if state.evals and state.step == run.total:  # the end: flag a job that made the held-out set worse
        result["eval/regressed"] = heldout_regressed(state.evals[0], result)
    state.evals.append({"step": state.step, **result})
    run.emit({"kind": "eval", "step": state.step, "total_steps": run.total, "metrics": result})


def save(run: Run, epoch: int, batches_done: int, generator_state) -> None:
    """A checkpoint at this step boundary (with train.checkpoint_dir set)."""
    if run.checkpoint_dir is None:
        return
    position = {"epoch": epoch, "batches_done": batches_done, "generator_state": generator_state}
    save_checkpoint(
        run.checkpoint_dir,
        run.policy,
        run.optimizer,
        run.scheduler,
        run.state,
        position,
        run.reference.precomputed,
        run.fingerprint,
        run.ranks,
    )
    run.emit({"kind": "checkpoint", "step": run.state.step, "total_steps": run.total})  # a shared store copies it now


def train_policy(
    policy,
    examples: list[TokenizedPair],
    pad_id: int,
    cfg,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    eval_examples: list[TokenizedPair] | None = None,
    sampler: Sampler | None = None,
) -> TrainState:
    """Train `policy` in place on `examples` with DPO-family losses. cfg is the composed config.
    Held-out metrics come from `eval_examples` when given (all of `examples` then train), else
    from a split of `examples` (data.eval_fraction).

    With train.checkpoint_dir set, a checkpoint is written every train.checkpoint_every steps and
    when should_stop() stops the run; a run started on a directory holding one resumes from it.
    """
    run = setup_run(policy, examples, pad_id, cfg, on_progress, eval_examples, sampler)
    tcfg, state, total = cfg.train, run.state, run.total

    def stop() -> bool:  # every rank stops at the same step boundary, or none does
        return distributed.any_across(should_stop is not None and should_stop(), run.ranks, run.device)

    if run.eval_idx and not state.evals:
        record_eval(run)  # the baseline: held-out metrics of the initial policy
    policy.train()
    start_time = time.perf_counter()
    for epoch, position, steps_in_epoch, indices, generator_state in scheduled_steps(run):
        if stop():
            save(run, epoch, position, generator_state)
            raise TrainingCancelled(f"cancelled before step {state.step + 1} of {total}")
        step_start = time.perf_counter()
        metrics = train_step(run, indices)
        elapsed = time.perf_counter() - step_start
        metrics.update(
            epoch=epoch + (position + 1) / steps_in_epoch,
            tokens_per_s=metrics["tokens"] / elapsed if elapsed > 0 else 0.0,
            elapsed_s=time.perf_counter() - start_time,
        )
        state.history.append(metrics)
        run.emit(
            {"kind": "step", "step": state.step, "total_steps": total, "epoch": metrics["epoch"], "metrics": metrics}
        )
        if tcfg.checkpoint_every and state.step % tcfg.checkpoint_every == 0 and state.step < total:
            save(run, epoch, position + 1, generator_state)
        if run.eval_idx and state.step in run.eval_at and state.step < total:
            record_eval(run)

    if run.eval_idx:
        record_eval(run, final=True)
    return state
