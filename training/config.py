"""Composing the Hydra config tree in config/ from code (the facade, the service, tests)."""

from __future__ import annotations

import copy
import functools
import re
import threading
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "config"
_compose_lock = threading.Lock()  # Hydra's global state is not thread-safe

# train.learning_rate defaults to the model preset's rate for the mode (full or LoRA), resolved
# when read, so a per-job `model.lora.enabled` picks the matching rate.
OmegaConf.register_new_resolver("lr_for_mode", lambda lora, full, lora_rate: lora_rate if lora else full, replace=True)


def run_values(cfg: DictConfig) -> dict:
    """The composed config as plain values, interpolations resolved, without where a run keeps
    its files (output_dir, the data files, the checkpoint directory and cadence, threads): what
    a job shows as its hyperparameters and what a checkpoint's fingerprint compares."""
    values = OmegaConf.to_container(cfg, resolve=True)
    values.pop("output_dir", None)
    for key in ("path", "validation_path"):
        values["data"].pop(key, None)
    for key in ("checkpoint_dir", "checkpoint_every", "threads"):
        values["train"].pop(key, None)
    return values


def available(group: str) -> list[str]:
    """Names of the options of a config group, e.g. available("model") -> ["tiny", ...]."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def compose_config(
    model: str = "tiny",
    loss: str = "dpo",
    values: dict[str, Any] | None = None,
    config_name: str = "config",
) -> DictConfig:
    """Compose config.yaml with a model and loss, then set typed values by dotted key.

    Values are assigned as Python objects, never parsed as Hydra override strings, so a caller's
    string cannot inject overrides; keys must already exist in the config.
    """
    for group, name in (("model", model), ("loss", loss)):
        if name not in available(group):
            raise ValueError(f"{group}: expected one of {available(group)}, got {name!r}")
    cfg = copy.deepcopy(_compose_base(config_name, model, loss))
    for key, value in (values or {}).items():
        if not has_key(cfg, key):
            raise KeyError(f"unknown config key {key!r}")
        OmegaConf.update(cfg, key, literal(value), merge=False)
    return cfg


@functools.lru_cache(maxsize=64)
def _compose_base(config_name: str, model: str, loss: str) -> DictConfig:
    """config.yaml with a model and loss, composed once per process (Hydra takes ~0.1 s and a
    global lock); callers get deep copies."""
    from hydra import compose, initialize_config_dir

    with _compose_lock, initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=[f"model={model}", f"loss={loss}"])
    OmegaConf.set_struct(cfg, True)
    return cfg


_INTERPOLATION = re.compile(r"(\\*)\$\{")  # "${" and the backslashes right before it


def literal(value: Any) -> Any:
    """`value` with every "${" escaped, recursively: OmegaConf would otherwise resolve a string
    such as "${oc.env:DPO_WEBHOOK_SECRET}" when it is read (or when a config is written out and
    composed again by a training subprocess). In OmegaConf a backslash is special only right
    before "${" (two of them read as one backslash, then the interpolation), so each of those is
    doubled and the "${" itself escaped: every string reads back as itself (tested)."""
    if isinstance(value, str):
        return _INTERPOLATION.sub(lambda m: m.group(1) * 2 + "\\${", value)
    if isinstance(value, dict):
        return {k: literal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [literal(v) for v in value]
    return value


def has_key(cfg: DictConfig, dotted: str) -> bool:
    """True when the dotted key exists in cfg, even if its value is still ??? (missing)."""
    parent_key, _, leaf = dotted.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key, throw_on_missing=False) if parent_key else cfg
    return isinstance(parent, DictConfig) and leaf in parent.keys()


def looks_like_path(name: str) -> bool:
    """A local path rather than a hub id ("org/name"): absolute, relative with ./ ../ ~, or deeper."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def same_model(a: str, b: str) -> bool:
    """Whether two spellings name the same model: local paths compared without trailing slashes,
    `.` parts and doubled separators (`..` is kept: through a symlink it leads elsewhere), hub ids
    compared as given."""
    if looks_like_path(a) and looks_like_path(b):
        return _path_key(a) == _path_key(b)
    return a == b


def _path_key(path: str) -> str:
    parts = [part for part in path.split("/") if part not in ("", ".")]
    return ("/" if path.startswith("/") else "") + "/".join(parts)


def resolve_path(path: str) -> Path:
    """Relative paths in configs are relative to the repository root, not the caller's cwd."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p
