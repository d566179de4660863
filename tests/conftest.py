"""Shared fixtures: the tiny model (built once into the git-ignored cache) and a shrunk config."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
# `make test` runs two pytest workers on a 2-core machine: one torch thread each, or their
# thread pools fight over the cores (OMP_NUM_THREADS=1 does the same for the servers they start)
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    from training.config import compose_config
    from training.model import model_path

    return Path(model_path(compose_config().model))


@pytest.fixture(scope="session")
def tokenizer(tiny_model_path):
    from training.model import load_tokenizer

    return load_tokenizer(str(tiny_model_path))


def make_cfg(loss: str = "dpo", lora: bool = False, **values):
    """The default config, shrunk for tests; `values` are dotted keys."""
    from training.config import compose_config

    base = {
        "output_dir": "unset",
        "train.epochs": 2,
        "train.threads": THREADS,
        "train.plot": True,
        "model.lora.enabled": lora,
    }
    base.update(values)
    return compose_config(loss=loss, values=base)


@pytest.fixture
def toy():
    from tools.toy_data import toy_records

    return toy_records


@pytest.fixture(scope="session")
def emulators(tmp_path_factory):
    """The real Cloud Firestore emulator and fake-gcs-server on free loopback ports, for the
    whole session; stopped by PID at the end. A missing emulator is a failure, not a skip."""
    from tools.emulators import EmulatorMissing, Emulators

    emu = Emulators(tmp_path_factory.mktemp("emulators"))
    try:
        emu.start_firestore()
        emu.start_gcs()
    except EmulatorMissing as err:
        emu.stop()
        pytest.fail(str(err), pytrace=False)
    yield emu
    emu.stop()


@pytest.fixture
def firebase_env(emulators, monkeypatch):
    """Emulator variables in this process's environment, and empty emulators for each test."""
    emulators.reset()
    for key, value in emulators.env.items():
        monkeypatch.setenv(key, value)
    return emulators.env


@pytest.fixture
def trained_policy(monkeypatch):
    """Captures the in-memory policy at save time, to compare with what reloads from disk."""
    import training.facade as facade

    captured = {}
    real_save = facade.save_run

    def spy(out, policy, *args):
        captured["policy"] = policy
        return real_save(out, policy, *args)

    monkeypatch.setattr(facade, "save_run", spy)
    return captured


def logps_of(model, tokenizer, records):
    """Log-probs on the CPU (a policy trained on a GPU is moved here to compare exactly)."""
    import torch

    from training.batching import collate
    from training.logprobs import model_logps
    from training.records import normalise_records
    from training.tokenize import tokenize_pairs

    pairs, _ = normalise_records(records)
    batch = collate(tokenize_pairs(tokenizer, pairs, 128, 64, "keep_end"), tokenizer.pad_token_id)
    with torch.no_grad():
        chosen, rejected, _ = model_logps(model.float().cpu().eval(), batch)
    return torch.cat([chosen, rejected])
