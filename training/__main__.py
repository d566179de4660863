"""CLI: python -m training data.path=FILE output_dir=DIR [model=tiny loss=ipo train.epochs=1 ...]

Hydra appears only here; it composes config/cli.yaml and calls the same run_training the service uses.
Progress, the result or the error go to stdout as protocol lines (training/protocol.py), so a
parent process can follow the run.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import hydra
from omegaconf import DictConfig, OmegaConf

from training import distributed, protocol
from training.config import CONFIG_DIR, resolve_path
from training.errors import NonFiniteError
from training.facade import run_training
from training.loop import TrainingCancelled
from training.model import model_path
from training.records import RecordError, load_records_file

_stdout_lock = threading.Lock()  # the heartbeat thread and the trainer write whole lines, never interleaved
_MAIN = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 speaks for the job


def _emit(kind: str, payload: dict) -> None:
    if not _MAIN:
        return
    line = protocol.message(kind, payload)
    with _stdout_lock:
        sys.stdout.write(line)
        sys.stdout.flush()


def _heartbeat(interval_s: float) -> None:
    while True:
        _emit(protocol.ALIVE, {})
        time.sleep(interval_s)


def config_problem(cfg: DictConfig) -> str | None:
    """What makes the composed CLI config unusable, said in one line, or None."""
    if not cfg.data.path:
        return "data.path is required: python -m training data.path=FILE output_dir=DIR"
    missing = sorted(OmegaConf.missing_keys(cfg))
    if "model.name_or_path" in missing:
        return "model=custom needs the model to train: model=custom model.name_or_path=DIR_OR_HUB_ID"
    if missing:
        return f"config values required but missing: {', '.join(missing)}"
    try:
        model_path(cfg.model)  # a path that holds no model, or a preset's path changed
    except (ValueError, FileNotFoundError) as err:
        return str(err)
    return None


@hydra.main(config_path=str(CONFIG_DIR), config_name="cli", version_base="1.3")
def main(cfg: DictConfig) -> None:
    problem = config_problem(cfg)
    if problem is not None:  # one line, not a Hydra traceback
        _emit(protocol.ERROR, {"type": "invalid_config", "message": problem})
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    stop = threading.Event()  # SIGTERM: stop at the next step boundary (checkpointing, if configured)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    beat = float(os.environ.get("DPO_TRAINER_HEARTBEAT_S", "0"))
    if beat > 0:  # the service's watcher takes silence as a stuck trainer (core/runner.py)
        threading.Thread(target=_heartbeat, args=(beat,), daemon=True, name="heartbeat").start()
    try:
        records = load_records_file(str(resolve_path(cfg.data.path)))
        validation = None
        if cfg.data.validation_path:
            validation = load_records_file(str(resolve_path(cfg.data.validation_path)))
        result = run_training(
            cfg,
            records,
            on_progress=lambda event: _emit(protocol.PROGRESS, event),
            should_stop=stop.is_set,
            validation_records=validation,
        )
    except RecordError as err:
        _emit(protocol.ERROR, {"type": "invalid_data", "message": str(err)})
        sys.exit(2)
    except NonFiniteError as err:
        _emit(protocol.ERROR, {"type": NonFiniteError.type, "message": str(err)})
        sys.exit(2)
    except TrainingCancelled as err:
        _emit(protocol.ERROR, {"type": "stopped", "message": str(err)})
        sys.exit(3)
    finally:
        distributed.close()
    if not _MAIN:
        return
    final = result.metrics.get("final_eval", {})
    _emit(protocol.RESULT, {"output_dir": str(result.output_dir), "files": result.files, "final_eval": final})
    acc = final.get("eval/rewards/accuracies")
    print(f"held-out reward accuracy: {acc if acc is None else f'{acc:.3f}'}")
    print(f"artifact: {result.output_dir}")


if __name__ == "__main__":
    main()
