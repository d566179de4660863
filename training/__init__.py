"""DPO training: torch, transformers, peft and Hydra/OmegaConf only (no web or Firebase code)."""

from training.config import compose_config
from training.facade import TrainingResult, run_training
from training.loop import TrainingCancelled
from training.records import RecordError

__all__ = ["RecordError", "TrainingCancelled", "TrainingResult", "compose_config", "run_training"]
