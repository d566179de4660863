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


CPU_PRESETS = ("tiny", "smollm2-135m")  # sized to train on a laptop's cores
GPU_PRESETS = [m for m in available("model") if m not in CPU_PRESETS]


@pytest.mark.parametrize("model", GPU_PRESETS)
def test_real_model_presets_carry_settings_for_pretrained_models(model):
    """Not the toy's: a 5e-4 learning rate destroys a pretrained model, 128 tokens cut real answers.
    Precision and checkpointing follow the device the job runs on (training/precision.py's
    resolve_auto: bf16-mixed and checkpointing on a bf16 GPU, fp32 without on the CPU)."""
    for lora in (False, True):
        cfg = compose_config(model=model, values={"model.lora.enabled": lora})
        assert cfg.train.learning_rate <= (1e-4 if lora else 5e-6)
        assert cfg.train.precision == "auto" and cfg.train.gradient_checkpointing == "auto"
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


@pytest.mark.parametrize("model", CPU_PRESETS)
def test_cpu_presets_stay_fp32_without_checkpointing(model):
    cfg = compose_config(model=model)
    assert cfg.train.precision == "fp32" and cfg.train.gradient_checkpointing is False


def test_trigger_overrides_reach_precision_checkpointing_and_lora():
    """What a trigger's `config` may set (core/schemas.py TrainOverrides) lands on the config keys;
    a LoRA rank without an alpha keeps the presets' alpha = 2 x rank (the scale they were tuned at)."""
    from core.schemas import TrainOverrides

    def composed(model="custom", **overrides):
        values = TrainOverrides(**overrides).config_values()
        return compose_config(model=model, values={"model.name_or_path": "org/m", **values})

    cfg = composed(precision="fp32", gradient_checkpointing=False)
    assert (cfg.train.precision, cfg.train.gradient_checkpointing) == ("fp32", False)
    assert composed(model="tiny", precision="auto").train.precision == "auto"
    lora = composed(lora=True, lora_rank=4).model.lora
    assert (lora.r, lora.alpha) == (4, 8)
    lora = composed(lora=True, lora_rank=4, lora_alpha=4.0).model.lora
    assert (lora.r, lora.alpha) == (4, 4.0)
    assert composed(lora_alpha=64.0).model.lora.alpha == 64.0  # the preset's r
    targets = composed(model="zephyr-7b", lora_target_modules="all-linear").model.lora.target_modules
    assert targets == "all-linear"
    targets = composed(lora_target_modules=["q_proj", "v_proj"]).model.lora.target_modules
    assert list(targets) == ["q_proj", "v_proj"]


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


def test_a_model_path_that_holds_no_model_is_an_error_naming_it(tmp_path):
    """A mistyped path used to build a random tiny Llama there and train it with the tiny
    preset's settings; `model=custom` without a path was a Hydra traceback. Each is one line."""
    import subprocess
    import sys

    from training.config import REPO_ROOT

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    missing, empty = tmp_path / "no-such-model", tmp_path / "empty"
    empty.mkdir()
    cases = {
        f"model.name_or_path={missing}": "this preset builds its model only at .cache/models/tiny-llama",
        "model=custom": "model=custom needs the model to train",
        f"model=custom model.name_or_path={missing}": f"{missing} does not exist",
        f"model=custom model.name_or_path={empty}": f"{empty} is not a model directory (no config.json)",
    }
    for overrides, message in cases.items():
        argv = [sys.executable, "-m", "training", f"data.path={data}", f"output_dir={tmp_path / 'out'}"]
        out = subprocess.run([*argv, *overrides.split()], cwd=REPO_ROOT, capture_output=True, text=True)
        assert out.returncode == 2 and message in out.stdout, (overrides, out.stdout, out.stderr)
        assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr, out.stderr  # one line
    assert not missing.exists() and not any(empty.iterdir())  # nothing was built in their place


def test_every_string_reads_back_as_itself_however_it_mixes_backslashes_and_interpolations(monkeypatch):
    """literal() used to turn "\\${oc.env:X}" into "\\\\${oc.env:X}", which OmegaConf reads as a
    backslash and then X's value. Every string must read back as given, also through YAML (the
    subprocess path writes the config out and composes it again)."""
    import random

    from omegaconf import OmegaConf

    from training.config import literal

    monkeypatch.setenv("X", "SECRET")
    rng = random.Random(0)
    parts = ["\\", "$", "{", "}", "a", ":", "${oc.env:X}"]
    cases = ["\\${oc.env:X}", "\\\\${oc.env:X}", "\\\\\\${oc.env:X}", "a\\b", "\\", "}\\${x}"]
    cases += ["".join(rng.choice(parts) for _ in range(rng.randint(0, 8))) for _ in range(2000)]
    for value in cases:
        cfg = OmegaConf.create({"k": literal(value), "l": [literal(value)]})
        again = OmegaConf.create(OmegaConf.to_yaml(cfg))
        assert (cfg.k, again.k, again.l[0]) == (value, value, value), repr(value)
