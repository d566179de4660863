"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint holds the trainable weights (the full model, or only the LoRA adapter), the
optimizer and scheduler state, the RNG states, the data position (epoch, batches done, the
shuffling generator's state at the epoch's start), the metrics so far and the precomputed
reference log-probs (the reference is the *initial* policy: it must not be recomputed from a
resumed one), and a fingerprint of the config, data and layout it belongs to: a checkpoint of
another run is discarded, not resumed. Written aside and renamed into place, so a crash mid-write leaves the previous one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf

NAME = "checkpoint"


def run_fingerprint(cfg, examples, layout: dict) -> str:
    """What a checkpoint is only valid for: the resolved training config (minus where checkpoints
    and outputs go), the tokenized data's shape and the batch layout. A resume under anything else
    (a deploy that changed a preset, other data) would mix two runs."""
    values = OmegaConf.to_container(cfg, resolve=True)
    values.pop("output_dir", None)
    for key in ("checkpoint_dir", "checkpoint_every", "threads"):
        values["train"].pop(key, None)
    shape = [len(examples), sum(len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in examples)]
    text = json.dumps({"config": values, "data": shape, "layout": layout.get("layout")}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def save_checkpoint(
    directory: Path, policy, optimizer, scheduler, state, position: dict, precomputed, fingerprint: str
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    final, staging, old = directory / NAME, directory / f"{NAME}.tmp", directory / f"{NAME}.old"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    trainable = {name: p.detach().cpu() for name, p in policy.named_parameters() if p.requires_grad}
    torch.save(
        {
            "trainable": trainable,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "position": position,  # {"epoch", "batches_done", "generator_state"}
            "step": state.step,
            "history": state.history,
            "evals": state.evals,
            "fingerprint": fingerprint,
            "precomputed": None if precomputed is None else [t.detach().cpu() for t in precomputed],
        },
        staging / "state.pt",
    )
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(directory: Path | None) -> dict | None:
    path = None if directory is None else Path(directory) / NAME / "state.pt"
    if path is None or not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def restore_weights(policy, checkpoint: dict) -> None:
    params = dict(policy.named_parameters())
    with torch.no_grad():
        for name, value in checkpoint["trainable"].items():
            params[name].copy_(value.to(params[name].device))
