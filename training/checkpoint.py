"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint holds the trainable weights (the full model, or only the LoRA adapter) and the
optimizer state, saved with DCP (torch.distributed.checkpoint: each rank writes its shards, and
a run on another number of ranks reshards them on load), then the scheduler state, the RNG states, the data position (epoch, batches done, the
shuffling generator's state at the epoch's start), the metrics so far and the precomputed
reference log-probs (the reference is the *initial* policy: it must not be recomputed from a
resumed one), and a fingerprint of the config, data and layout it belongs to: a checkpoint of
another run is discarded, not resumed. Written aside and renamed into place, so a crash mid-write leaves the previous one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
import warnings
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from training.checkpoint_files import ID, NAME, STATE, WEIGHTS
from training.config import run_values
from training.distributed import Ranks, barrier

_OPTIONS = StateDictOptions(ignore_frozen_params=True)  # LoRA: the adapter only, not the frozen base
_LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)  # the frozen base is not in it
# DCP says so on every save and load in a process that is not one of several; that is intended here
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def run_fingerprint(cfg, examples, layout: dict) -> str:
    """What a checkpoint is only valid for: the resolved training config (minus where data,
    checkpoints and outputs are), the tokenized data's shape and the batch layout. A resume under anything else
    (a deploy that changed a preset, other data) would mix two runs."""
    values = run_values(cfg)  # without the data files: the data's shape is below
    values["model"].pop("merge", None)  # what is saved at the end, not how training runs
    values["train"].pop("device", None)  # a resume may be on another GPU
    shape = [len(examples), sum(len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in examples)]
    text = json.dumps({"config": values, "data": shape, "layout": layout.get("layout")}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def save_checkpoint(
    directory: Path, policy, optimizer, scheduler, state, position: dict, precomputed, fingerprint: str, ranks=None
) -> Path:
    """Write the run's checkpoint; with several ranks every rank calls it (the weights and the
    optimizer state are saved with DCP, each rank writing its own shards)."""
    ranks = ranks or Ranks()
    final, staging, old = directory / NAME, directory / f"{NAME}.tmp", directory / f"{NAME}.old"
    if ranks.main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier(ranks)
    run = {
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "position": position,  # {"epoch", "batches_done", "generator_state"}
        "step": state.step,
        "history": state.history,
        "evals": state.evals,
        "samples": state.samples,  # the baseline's answers: generated once, before the first step
        "fingerprint": fingerprint,
        "precomputed": None if precomputed is None else [t.detach().cpu() for t in precomputed],
    }
    if uses_dcp(optimizer):
        import torch.distributed.checkpoint as dcp

        if optimizer.state:
            model_state, optim_state = get_state_dict(policy, optimizer, options=_OPTIONS)
            weights = {"model": model_state, "optim": optim_state}
        else:  # stopped before its first step: get_state_dict would make up an optimizer step
            weights = {"model": get_model_state_dict(policy, options=_OPTIONS)}
        dcp.save(weights, checkpoint_id=str(staging / WEIGHTS))
        run["format"], run["optimizer_saved"] = "dcp", "optim" in weights
    else:  # bitsandbytes' 8-bit optimizers: a plain state dict (their runs are replicated or single)
        run["trainable"] = {name: p.detach().cpu() for name, p in policy.named_parameters() if p.requires_grad}
        run["optimizer"] = optimizer.state_dict()
        run["format"] = "torch"
    if ranks.main:
        torch.save(run, staging / STATE)
        (staging / ID).write_text(uuid.uuid4().hex)
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    barrier(ranks)
    return final


def uses_dcp(optimizer) -> bool:
    """DCP (any number of ranks, resharded on load) for torch's optimizers; bitsandbytes' keep
    their own state dict."""
    return type(optimizer).__module__.startswith("torch.")


def load_checkpoint(directory: Path | None) -> dict | None:
    """The run state of the checkpoint in `directory` (without the weights: restore_training_state)."""
    path = None if directory is None else Path(directory) / NAME / STATE
    if path is None or not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def restore_training_state(directory: Path, checkpoint: dict, policy, optimizer) -> None:
    """The checkpoint's weights and optimizer state into `policy` and `optimizer`, whatever the
    number of ranks now and when it was written (DCP reshards)."""
    if checkpoint.get("format") == "dcp":
        import torch.distributed.checkpoint as dcp

        path = str(Path(directory) / NAME / WEIGHTS)
        if not checkpoint["optimizer_saved"]:  # stopped before its first step: the optimizer starts afresh
            loaded = {"model": get_model_state_dict(policy, options=_OPTIONS)}
            dcp.load(loaded, checkpoint_id=path)
            set_model_state_dict(policy, loaded["model"], options=_LOAD_OPTIONS)
            return
        model_state, optim_state = get_state_dict(policy, optimizer, options=_OPTIONS)  # the templates to fill
        loaded = {"model": model_state, "optim": optim_state}
        dcp.load(loaded, checkpoint_id=path)
        set_state_dict(
            policy, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"], options=_LOAD_OPTIONS
        )
        return
    params = dict(policy.named_parameters())
    with torch.no_grad():
        for name, value in checkpoint["trainable"].items():
            params[name].copy_(value.to(params[name].device))
    optimizer.load_state_dict(checkpoint["optimizer"])
