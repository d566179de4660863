"""DPO training: torch, transformers, peft and Hydra/OmegaConf only (no web or Firebase code).

Names are loaded lazily so `training.records` (pure Python) can be imported without torch.
"""

from importlib import import_module

_EXPORTS = {
    "RecordError": "training.records",
    "TrainingCancelled": "training.loop",
    "TrainingResult": "training.facade",
    "compose_config": "training.config",
    "run_training": "training.facade",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'training' has no attribute {name!r}")
