"""Checkpoints: a run stopped and resumed ends exactly where an uninterrupted run ends."""

import pytest
import torch

from tests.conftest import logps_of, make_cfg
from training import TrainingCancelled, run_training


@pytest.mark.parametrize(
    "lora, reference, precision, optimizer",
    [
        (False, "precompute", "fp32", "adamw"),
        (False, "live", "fp32", "adamw"),
        (True, "precompute", "fp32", "adamw"),
        (False, "precompute", "bf16-mixed", "adamw"),  # fp32 master weights and optimizer state resume exactly
        (True, "precompute", "bf16-mixed", "adamw"),
        (False, "precompute", "fp32", "adamw8bit"),  # quantized moments resume exactly too
    ],
)
def test_resumed_run_equals_uninterrupted_run(tmp_path, toy, trained_policy, lora, reference, precision, optimizer):  # noqa: F811
    from transformers import AutoTokenizer

    records = toy(48)
    values = {
        "train.epochs": 2,
        "train.reference": reference,
        "train.checkpoint_every": 3,
        "train.precision": precision,
        "train.optimizer": optimizer,
    }
    full = run_training(make_cfg(lora=lora, **values), records, tmp_path / "full")
    want_policy = trained_policy["policy"]

    ckpt = tmp_path / "ckpt"
    steps = []
    stop_at = 7  # mid-epoch 2 (5 steps an epoch), after the checkpoint at step 6
    with pytest.raises(TrainingCancelled):
        run_training(
            make_cfg(lora=lora, **values, **{"train.checkpoint_dir": str(ckpt)}),
            records,
            tmp_path / "first",
            on_progress=steps.append,
            should_stop=lambda: len([e for e in steps if e["kind"] == "step"]) >= stop_at,
        )
    assert (ckpt / "checkpoint" / "state.pt").exists()
    events = []
    resumed = run_training(
        make_cfg(lora=lora, **values, **{"train.checkpoint_dir": str(ckpt)}),
        records,
        tmp_path / "second",
        on_progress=events.append,
    )
    assert [e for e in events if e["kind"] != "layout"][0] == {
        "kind": "resumed",
        "step": stop_at,
        "total_steps": full.metrics["total_steps"],
    }
    assert [e["step"] for e in events if e["kind"] == "step"] == list(
        range(stop_at + 1, full.metrics["total_steps"] + 1)
    )
    assert [h["loss"] for h in resumed.metrics["history"]] == pytest.approx(
        [h["loss"] for h in full.metrics["history"]], abs=1e-6
    )
    tokenizer = AutoTokenizer.from_pretrained(full.output_dir)
    probe = toy(4, seed=9)
    torch.testing.assert_close(
        logps_of(trained_policy["policy"], tokenizer, probe),
        logps_of(want_policy, tokenizer, probe),
        atol=1e-5,
        rtol=1e-5,
    )


def test_periodic_checkpoints_replace_each_other(tmp_path, toy):
    ckpt = tmp_path / "ckpt"
    run_training(
        make_cfg(**{"train.epochs": 1, "train.checkpoint_every": 1, "train.checkpoint_dir": str(ckpt)}),
        toy(32),
        tmp_path / "o",
    )
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint"]


def test_a_checkpoint_of_another_configuration_is_discarded_not_resumed(tmp_path, toy):
    """A deploy that changes a preset (or other data) between a stop and the resume must not mix
    two runs: the old checkpoint is dropped with a warning and training starts over."""
    from training.loop import CHECKPOINT_DISCARDED

    ckpt = tmp_path / "ckpt"
    values = {"train.epochs": 2, "train.checkpoint_every": 2, "train.checkpoint_dir": str(ckpt)}
    steps = []
    with pytest.raises(TrainingCancelled):
        run_training(
            make_cfg(**values),
            toy(48),
            tmp_path / "first",
            on_progress=steps.append,
            should_stop=lambda: len([e for e in steps if e["kind"] == "step"]) >= 3,
        )
    events = []
    changed = make_cfg(**values, **{"train.learning_rate": 1e-4})
    result = run_training(changed, toy(48), tmp_path / "second", on_progress=events.append)
    assert {"kind": "warning", "message": CHECKPOINT_DISCARDED} in events
    assert not any(e["kind"] == "resumed" for e in events)
    assert [e["step"] for e in events if e["kind"] == "step"][0] == 1
    assert result.metrics["steps"] == result.metrics["total_steps"]


def test_a_run_stopped_before_its_first_step_resumes_as_if_never_stopped(tmp_path, toy):
    """A stop during the reference pass checkpoints no optimizer state: none exists yet (DCP's
    get_state_dict would make up a step of zero gradients, and the first real update would
    resume at a different bias correction)."""
    values = {"train.epochs": 1, "train.checkpoint_dir": str(tmp_path / "ckpt")}
    with pytest.raises(TrainingCancelled):
        run_training(make_cfg(**values), toy(32), tmp_path / "first", should_stop=lambda: True)
    resumed = run_training(make_cfg(**values), toy(32), tmp_path / "second")
    full = run_training(make_cfg(**{"train.epochs": 1}), toy(32), tmp_path / "full")
    assert [h["loss"] for h in resumed.metrics["history"]] == pytest.approx(
        [h["loss"] for h in full.metrics["history"]], abs=1e-6
    )
