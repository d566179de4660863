"""run_training: the one entry point the CLI, the service and tests use.

records (any accepted format) -> normalised pairs -> tokens -> trained policy -> files in output_dir
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from training import distributed
from training.artifacts import save_run
from training.generation import Sampler, prompt_text
from training.loop import ProgressFn, StopFn, train_policy
from training.memory import check_memory
from training.model import load_policy, load_tokenizer, model_path, set_threads
from training.precision import resolve_auto
from training.records import normalise_records
from training.tokenize import tokenize_pairs

log = logging.getLogger(__name__)


@dataclass
class TrainingResult:
    output_dir: Path
    metrics: dict
    files: list[str]


def run_training(
    cfg: DictConfig,
    records: Sequence[Any],
    output_dir: str | Path | None = None,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    record_ids: Sequence[str] | None = None,
    validation_records: Sequence[Any] | None = None,
) -> TrainingResult:
    """Train on `records` with the composed config `cfg`; write the artifact to output_dir.

    `validation_records` (any format): the held-out set, instead of a split of `records`.
    Raises RecordError for bad data (before any model is loaded), TrainingCancelled when
    should_stop() turns true (nothing is written), ValueError/KeyError for a bad config.
    """
    started = time.perf_counter()
    if output_dir is not None:
        cfg = cfg.copy()
        OmegaConf.update(cfg, "output_dir", str(output_dir), merge=False)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(f"config values required but missing: {', '.join(missing)}")
    check_merge(cfg.model)
    sampler = Sampler.from_config(cfg.eval)  # None with eval.samples 0; a bad eval config fails here
    data = cfg.data
    pairs, skipped = normalise_records(records, ids=record_ids, skip_invalid=data.skip_invalid)
    for err in skipped:
        log.warning("skipped invalid record: %s", err)
    held_out = None
    if validation_records is not None:  # named "validation[i]" in errors, apart from the training records
        ids = [f"validation[{i}]" for i in range(len(validation_records))]
        held_out, _ = normalise_records(validation_records, ids=ids)

    set_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    ranks, device = distributed.init(cfg.train.device)  # under torchrun: this rank's device, in the job's group
    cfg = resolve_auto(cfg, device)  # precision and checkpointing `auto`: for this device, once
    sharded = distributed.shards_model(cfg.model.lora.enabled, ranks)  # FSDP2: each rank holds 1/N
    estimate = check_memory(
        cfg, model_path(cfg.model), device, ranks.world if sharded else 1
    )  # fail in seconds, not at OOM
    # a sharded model is loaded on the CPU; FSDP2 moves each rank's shards to its device
    policy, path, source_dtype = load_policy(cfg.model, cfg.train.precision, torch.device("cpu") if sharded else device)
    tokenizer = load_tokenizer(path, cfg.model.trust_remote_code)
    lengths = (data.max_length, data.max_prompt_length, data.truncation_mode, data.chat_template)
    examples = tokenize_pairs(tokenizer, pairs, *lengths)
    eval_examples = None if held_out is None else tokenize_pairs(tokenizer, held_out, *lengths)
    if sampler is not None:  # the loop's example indices: the training pairs, then a validation set's
        sampler.tokenizer = tokenizer
        sampler.shown = [prompt_text(p) for p in [*pairs, *(held_out or [])]]
    state = train_policy(
        policy, examples, tokenizer.pad_token_id, cfg, on_progress, should_stop, eval_examples, sampler
    )

    out = Path(cfg.output_dir)
    weights = distributed.full_state_dict(policy, ranks)  # sharded: gathered on rank 0 (every rank takes part)
    if not ranks.main:  # rank 0 writes the artifact
        return TrainingResult(out, {}, [])
    extra = {
        "dataset": {
            "records": len(records),
            "pairs": len(pairs),
            "skipped_records": len(skipped),
            "validation_pairs": None if held_out is None else len(held_out),
        },
        "model": {
            "name_or_path": path,
            "lora": bool(cfg.model.lora.enabled),
            "precision": cfg.train.precision,
            "gradient_checkpointing": bool(cfg.train.gradient_checkpointing),
            "saved_dtype": "float32" if cfg.model.lora.enabled else str(source_dtype).removeprefix("torch."),
        },
        "memory_estimate_gib": estimate.as_dict() if estimate else None,
        "processes": ranks.world,
        "wall_s": time.perf_counter() - started,
    }
    metrics = save_run(out, policy, tokenizer, cfg, state, extra, source_dtype, weights)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    return TrainingResult(out, metrics, files)


def check_merge(model_cfg) -> None:
    """model.merge folds a LoRA adapter into its base: it needs LoRA, and a base whose weights
    can take the adapter exactly (not 4-bit)."""
    if not model_cfg.merge:
        return
    if not model_cfg.lora.enabled:
        raise ValueError("model.merge: needs model.lora.enabled=true (a full fine-tune stores full weights already)")
    if model_cfg.quantization is not None:
        raise ValueError(
            "model.merge: a 4-bit base cannot take the adapter exactly; merge the adapter into the bf16 base instead"
        )
