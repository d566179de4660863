"""Config composition: every model x loss composes; required values fail fast."""

import pytest
from omegaconf import OmegaConf

from training.config import available, compose_config, literal


@pytest.mark.parametrize("model", available("model"))
@pytest.mark.parametrize("loss", available("loss"))
def test_every_model_and_loss_composes(model, loss):
    cfg = compose_config(model=model, loss=loss)
    assert cfg.loss.name in ("dpo", "ipo", "hinge", "sft", "dpo_sft")
    if model == "custom":  # the service sets the allow-listed model's name_or_path
        assert OmegaConf.missing_keys(cfg) == {"output_dir", "model.name_or_path"}
    else:
        assert cfg.model.name_or_path and OmegaConf.missing_keys(cfg) == {"output_dir"}


@pytest.mark.parametrize("model", [m for m in available("model") if m != "tiny"])
def test_real_model_presets_carry_settings_for_pretrained_models(model):
    """Not the toy's: a 5e-4 learning rate destroys a pretrained model, 128 tokens cut real answers."""
    for lora in (False, True):
        cfg = compose_config(model=model, values={"model.lora.enabled": lora})
        assert cfg.train.learning_rate <= (1e-4 if lora else 5e-6)
        assert cfg.train.precision == "bf16-mixed" and cfg.train.gradient_checkpointing is True
        assert cfg.data.max_length >= 1024 and cfg.data.max_prompt_length < cfg.data.max_length
    full, lora = (compose_config(model=model, values={"model.lora.enabled": on}) for on in (False, True))
    assert lora.train.learning_rate > full.train.learning_rate  # LoRA's rate is its own
    assert compose_config(model=model, values={"train.learning_rate": 3e-7}).train.learning_rate == 3e-7


def test_the_tiny_preset_keeps_the_toy_settings():
    cfg = compose_config()
    assert (cfg.train.learning_rate, cfg.train.precision, cfg.data.max_length, cfg.data.max_prompt_length) == (
        5e-4,
        "fp32",
        128,
        64,
    )


def test_production_models_are_listed():
    assert {"tiny", "zephyr-7b", "qwen2.5-0.5b", "pythia-2.8b"} <= set(available("model"))
    assert compose_config(model="zephyr-7b").model.lora.enabled is True


def test_unknown_group_option_and_key_are_rejected():
    with pytest.raises(ValueError, match="model: expected one of"):
        compose_config(model="../../etc/passwd")
    with pytest.raises(KeyError, match="unknown config key 'train.nope'"):
        compose_config(values={"train.nope": 1})


def test_missing_output_dir_fails_fast_in_the_facade():
    from training import run_training

    with pytest.raises(ValueError, match="required but missing: output_dir"):
        run_training(compose_config(), [{"prompt": "p", "chosen": "a", "rejected": "b"}])


def test_values_are_not_interpolated_hydra_overrides(monkeypatch):
    monkeypatch.setenv("DPO_WEBHOOK_SECRET", "the-secret")
    cfg = compose_config(values={"train.learning_rate": 1e-3, "model.name_or_path": "${oc.env:DPO_WEBHOOK_SECRET}"})
    assert cfg.train.learning_rate == 1e-3
    assert cfg.model.name_or_path == "${oc.env:DPO_WEBHOOK_SECRET}"  # text, never resolved
    assert "the-secret" not in OmegaConf.to_yaml(cfg, resolve=True)
    # what a training subprocess composes again stays literal too
    written = OmegaConf.create(literal(OmegaConf.to_container(cfg, resolve=True)))
    assert written.model.name_or_path == "${oc.env:DPO_WEBHOOK_SECRET}"


def test_cli_requires_a_data_path_and_output_dir(tmp_path):
    import subprocess
    import sys

    from training.config import REPO_ROOT

    out = subprocess.run([sys.executable, "-m", "training"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "data.path is required" in out.stdout
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    out = subprocess.run(
        [sys.executable, "-m", "training", f"data.path={data}"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert out.returncode != 0 and "output_dir" in out.stdout + out.stderr
