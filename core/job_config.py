"""A trigger's training choices -> the job's config: which model preset, which model, which loss,
which values. Resolved and composed once, when the job is created, so a bad choice is a 422 at
the trigger (not a failed job later) and a queued job keeps its choice if the environment changes.
"""

from __future__ import annotations

from core.errors import Invalid
from core.gpus import gpu_ids
from core.schemas import TrainOverrides
from core.settings import Settings
from training.config import available, compose_config, run_values, same_model

CUSTOM = "custom"  # the preset whose settings an allow-listed hub id or local path trains with


def resolve_model(name: str | None, settings: Settings) -> tuple[str, str | None]:
    """(preset, name_or_path or None). A preset name, an allow-listed model, or the default."""
    choice = name or settings.default_model
    if choice in available("model") and choice != CUSTOM:
        return choice, None
    for chosen in (settings.default_model, *settings.allowed_models):  # the operator chose these
        if same_model(choice, chosen):  # a local path however it is spelled: the operator's spelling trains
            return CUSTOM, chosen
    presets = [p for p in available("model") if p != CUSTOM]
    raise Invalid(
        f"config.model: expected a preset ({', '.join(presets)}) or a model in DPO_ALLOWED_MODELS, got {choice!r}",
        field="config.model",
        code="unknown_model",
    )


def job_training_config(overrides: TrainOverrides | None, settings: Settings) -> dict:
    """{"model": preset, "loss": name, "values": dotted keys -> values, "gpus": n} for compose_config
    and the runner, and "hyperparameters": the full effective config the job view shows."""
    preset, name_or_path = resolve_model(overrides.model if overrides else None, settings)
    loss = (overrides.loss if overrides else None) or settings.default_loss
    values = overrides.config_values() if overrides else {}
    if name_or_path is not None:
        values["model.name_or_path"] = name_or_path
    try:
        cfg = compose_config(preset, loss, {"output_dir": "unset", **values})
    except (KeyError, ValueError) as err:  # the schema ranges make this rare: a bug, said plainly
        raise Invalid(f"config: {err}", field="config", code="invalid_config") from None
    if cfg.model.merge and not cfg.model.lora.enabled:
        raise Invalid(
            "config.merge: needs lora: true (a full fine-tune stores full weights already)",
            field="config.merge",
            code="invalid_config",
        )
    length, prompt = cfg.data.max_length, cfg.data.max_prompt_length
    if "data.max_prompt_length" in values:
        if prompt >= length:
            raise Invalid(
                f"config.max_prompt_length: must be smaller than max_length ({length}), got {prompt}",
                field="config.max_prompt_length",
                code="invalid_config",
            )
    elif "data.max_length" in values and prompt > length // 2:
        values["data.max_prompt_length"] = length // 2  # a shorter sequence than the preset's: keep room for answers
        cfg.data.max_prompt_length = length // 2
    return {
        "model": preset,
        "loss": loss,
        "values": values,
        "gpus": job_gpus(overrides, settings),
        "hyperparameters": run_values(cfg),  # the full effective training config GET /jobs shows
    }


def job_gpus(overrides: TrainOverrides | None, settings: Settings) -> int:
    """How many GPUs the job runs on: config.gpus, at most this replica's (core/gpus.py)."""
    wanted = (overrides.gpus if overrides else None) or 1
    have = len(gpu_ids(settings.gpus))
    if wanted > 1 and wanted > have:
        raise Invalid(
            f"config.gpus: this service runs a job on at most {max(have, 1)} GPU{'s' if have > 1 else ''}"
            f" (DPO_GPUS lists {have}), got {wanted}",
            field="config.gpus",
            code="invalid_config",
        )
    return wanted
