"""The benches compare equal work: every bench gives our trainer and TRL's DPOTrainer the same
gradient-checkpointing value (TRL's DPOConfig turns it on by default; ours is off for the tiny
model), built by the functions the benches train through (tools/bench.py's ours_config and
trl_config)."""

import dataclasses

import pytest

from tools import bench, bench_gpu, bench_learning, bench_real

MODEL = bench.REPO / ".cache" / "models" / "bench-20m"  # composed only, never loaded


def bench_hypers() -> dict[str, dict]:
    """Every bench's settings for each of its runs, as it hands them to ours_config/trl_config."""
    hypers = {"bench": bench.HYPER, "bench --gradient-checkpointing": {**bench.HYPER, "gradient_checkpointing": True}}
    for name, suite in bench_learning.SUITES.items():
        for mode in suite["modes"]:  # as bench_learning's run() and worker() build it
            hypers[f"bench_learning {name} {mode}"] = {
                **bench_learning.HYPER,
                "epochs": suite["epochs"],
                "lr": suite["lr"][mode],
                "seed": 0,
            }
    for lora in (False, True):
        for on in (False, True):
            hypers[f"bench_gpu lora={lora} checkpointing={on}"] = bench_gpu.gpu_hyper(lora, 1024, on)
    return hypers


@pytest.mark.parametrize("lora", [False, True])
def test_the_real_model_bench_gives_both_trainers_the_same_checkpointing(lora, tmp_path):
    hyper = bench_real.real_hyper(lora)
    model = bench.REPO / ".cache" / "models" / "smollm2-135m-instruct"
    ours, trl_old_name, trl_new_name = checkpointing_of_both(hyper, lora, tmp_path, bench_real.PRESET, model)
    assert ours is False and ours == trl_old_name == trl_new_name  # the preset's value, for both
    cfg = bench.ours_config(model, lora, "cpu", hyper, bench_real.PRESET)
    assert cfg.train.learning_rate == hyper["lr"] and cfg.data.max_length == hyper["max_length"]


def checkpointing_of_both(hyper: dict, lora: bool, out, preset: str = "tiny", model=MODEL) -> tuple:
    ours = bench.ours_config(model, lora, "cpu", hyper, preset).train.gradient_checkpointing
    trl = bench.trl_config(out, False, "cpu", hyper)
    return ours, trl.gradient_checkpointing, getattr(trl, "activation_checkpointing", trl.gradient_checkpointing)


def test_trl_checkpoints_by_default_so_a_bench_must_say():
    """What the benches guard against: TRL's default differs from ours."""
    from trl import DPOConfig

    fields = {f.name: f.default for f in dataclasses.fields(DPOConfig)}
    assert fields["gradient_checkpointing"] is True
    from training.config import compose_config

    assert compose_config("tiny").train.gradient_checkpointing is False


@pytest.mark.parametrize("name", list(bench_hypers()))
@pytest.mark.parametrize("lora", [False, True])
def test_every_bench_gives_both_trainers_the_same_checkpointing(name, lora, tmp_path):
    hyper = bench_hypers()[name]
    ours, trl_old_name, trl_new_name = checkpointing_of_both(hyper, lora, tmp_path)
    assert isinstance(ours, bool), f"{name}: ours got {ours!r}, not an explicit on/off"
    assert ours == trl_old_name == trl_new_name == hyper["gradient_checkpointing"], name


def test_a_bench_without_a_checkpointing_value_fails():
    hyper = {k: v for k, v in bench.HYPER.items() if k != "gradient_checkpointing"}
    with pytest.raises(KeyError):
        bench.ours_config(MODEL, False, "cpu", hyper)
    with pytest.raises(KeyError):
        bench.trl_config(MODEL, False, "cpu", hyper)
