"""Real training of the tiny model on the toy set: learning, artifacts, reload, small data, cancel."""

import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import logps_of, make_cfg
from training import TrainingCancelled, run_training
from training.config import REPO_ROOT
from training.loop import PairBatches, micro_batches, split_train_eval
from training.model import model_path
from training.records import RecordError, normalise_records
from training.tokenize import tokenize_pairs


@pytest.mark.parametrize("fmt", ["pairs", "ranked", "chat"])
def test_full_finetune_learns_the_toy_rule(tmp_path, toy, fmt):
    events = []
    result = run_training(make_cfg(), toy(200, fmt), tmp_path / "out", on_progress=events.append)
    metrics = result.metrics
    first = metrics["history"][0]
    assert abs(first["loss"] - math.log(2)) < 1e-3, first
    assert metrics["final_eval"]["eval/rewards/accuracies"] >= 0.9, metrics["final_eval"]
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "grad_norm",
        "lr",
        "tokens_per_s",
    ):
        assert key in first
    steps = [e for e in events if e["kind"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, metrics["total_steps"] + 1))
    assert {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "metrics.json",
        "training_config.yaml",
        "training_curves.png",
    } <= set(result.files)
    saved = json.loads((result.output_dir / "metrics.json").read_text())
    assert saved["final_eval"] == metrics["final_eval"] and saved["dataset"]["records"] == 200
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves = EventAccumulator(str(result.output_dir / "tensorboard"))
    curves.Reload()  # what `tensorboard --logdir` reads
    assert [e.step for e in curves.Scalars("train/loss")] == [h["step"] for h in metrics["history"]]
    assert [e.value for e in curves.Scalars("eval/rewards/accuracies")] == pytest.approx(
        [e["eval/rewards/accuracies"] for e in metrics["evals"]]
    )
    from huggingface_hub import ModelCard  # the card the Hub and serving tools read

    card = ModelCard.load(result.output_dir / "README.md")
    assert card.data.base_model == metrics["model"]["name_or_path"] and card.data.library_name == "transformers"
    assert card.data.tags == ["dpo"] and "on 200 preference pairs from 200 records" in card.text.replace("\n", " ")
    accuracy = f"| rewards/accuracies | {metrics['evals'][0]['eval/rewards/accuracies']:.4f} |"
    assert accuracy in card.text and f"{metrics['final_eval']['eval/rewards/accuracies']:.4f} |" in card.text


def test_saved_full_model_reloads_with_identical_logps(tmp_path, toy, trained_policy):
    result = run_training(make_cfg(**{"train.epochs": 1}), toy(40), tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(result.output_dir)
    tokenizer = AutoTokenizer.from_pretrained(result.output_dir)
    records = toy(4, seed=5)
    want = logps_of(trained_policy["policy"], tokenizer, records)
    torch.testing.assert_close(logps_of(model, tokenizer, records), want, atol=1e-5, rtol=1e-5)  # sums of ~100: ulps
    base = AutoModelForCausalLM.from_pretrained(result.metrics["model"]["name_or_path"])
    assert not torch.allclose(logps_of(base, tokenizer, records), want)


def test_lora_learns_and_the_adapter_reloads_with_peft_and_merged(tmp_path, toy, trained_policy):
    """The adapter reloads with PEFT; with model.merge the adapter folded into the base is
    stored too (merged/), a plain model that scores as the adapter does."""
    from peft import PeftModel

    cfg = make_cfg(lora=True, **{"train.learning_rate": 3e-3, "train.epochs": 3, "model.merge": True})
    result = run_training(cfg, toy(200), tmp_path / "out")
    assert abs(result.metrics["history"][0]["loss"] - math.log(2)) < 1e-3
    assert result.metrics["final_eval"]["eval/rewards/accuracies"] >= 0.9, result.metrics["final_eval"]
    assert "adapter_model.safetensors" in result.files and "model.safetensors" not in result.files
    assert {"merged/model.safetensors", "merged/config.json", "merged/tokenizer.json"} <= set(result.files)
    base = AutoModelForCausalLM.from_pretrained(result.metrics["model"]["name_or_path"])
    reloaded = PeftModel.from_pretrained(base, result.output_dir)
    tokenizer = AutoTokenizer.from_pretrained(result.output_dir)
    records = toy(4, seed=5)
    want = logps_of(trained_policy["policy"], tokenizer, records)
    torch.testing.assert_close(logps_of(reloaded, tokenizer, records), want, atol=1e-5, rtol=1e-5)  # ~256: 1 ulp = 3e-5
    merged = AutoModelForCausalLM.from_pretrained(result.output_dir / "merged")
    torch.testing.assert_close(logps_of(merged, tokenizer, records), want, atol=1e-4, rtol=1e-5)


def test_merge_needs_lora_and_a_base_that_can_take_it(tmp_path, toy):
    with pytest.raises(ValueError, match="model.merge: needs model.lora.enabled=true"):
        run_training(make_cfg(**{"model.merge": True}), toy(8), tmp_path / "full")
    with pytest.raises(ValueError, match="model.merge: a 4-bit base cannot take the adapter exactly"):
        run_training(make_cfg(lora=True, **{"model.merge": True, "model.quantization": "4bit"}), toy(8), tmp_path / "q")


def swapped(records: list[dict]) -> list[dict]:
    """The same pairs with the preference turned around."""
    return [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in records]


def test_a_validation_set_is_evaluated_instead_of_a_split(tmp_path, toy):
    """Held-out pairs that prefer the opposite of the training data score near 0: the held-out
    metrics come from them, and every training pair trains."""
    result = run_training(make_cfg(), toy(96), tmp_path / "out", validation_records=swapped(toy(24, seed=3)))
    assert result.metrics["dataset"]["validation_pairs"] == 24
    assert result.metrics["final_eval"]["eval/rewards/accuracies"] <= 0.1, result.metrics["final_eval"]
    assert result.metrics["total_steps"] == 2 * 96 // 8  # no pair went to a split
    with pytest.raises(RecordError, match=r"record validation\[1\]: field 'rejected'"):
        run_training(
            make_cfg(), toy(8), tmp_path / "bad", validation_records=[toy(1)[0], {"prompt": "p", "chosen": "a"}]
        )


def test_live_reference_copy_matches_precompute(tmp_path, toy):
    records = toy(24)
    a = run_training(make_cfg(**{"train.reference": "precompute", "train.epochs": 1}), records, tmp_path / "a")
    b = run_training(make_cfg(**{"train.reference": "live", "train.epochs": 1}), records, tmp_path / "b")
    for ha, hb in zip(a.metrics["history"], b.metrics["history"], strict=True):
        assert ha["loss"] == pytest.approx(hb["loss"], abs=1e-5)


def test_runs_are_deterministic(tmp_path, toy):
    cfg = make_cfg(**{"train.epochs": 1})
    a = run_training(cfg, toy(32), tmp_path / "a").metrics
    b = run_training(cfg, toy(32), tmp_path / "b").metrics
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]


@pytest.mark.parametrize("n", [1, 3])
def test_dataset_smaller_than_a_batch_trains_on_what_it_has(tmp_path, toy, n):
    result = run_training(make_cfg(**{"train.batch_size": 8}), toy(n), tmp_path / "out")
    assert result.metrics["steps"] == 2  # one (partial) batch per epoch, 2 epochs
    if n == 1:
        assert result.metrics["final_eval"] == {}  # nothing left to hold out: no eval on training data
    else:  # one pair held out, never trained on: evaluated at step 0 and at the end
        train, held_out = split_train_eval(n, 0.1, 256, 42)
        assert len(held_out) == 1 and not set(train) & set(held_out)
        steps = [e["step"] for e in result.metrics["evals"]]
        assert steps[0] == 0 and steps[-1] == 2


def test_micro_batches_stay_within_the_token_budget():
    widths = {0: 50, 1: 40, 2: 40, 3: 30, 4: 200}.get

    assert micro_batches([0, 1, 2, 3], widths, 1, None) == [[0, 1, 2, 3]]
    assert micro_batches([0, 1, 2, 3], widths, 1, 100) == [[0, 1], [2, 3]]
    assert micro_batches([4, 3], widths, 1, 100) == [[4], [3]]  # a pair over the budget goes alone
    assert micro_batches([0, 1, 2, 3], widths, 1, 10_000) == [[0, 1, 2, 3]]
    assert micro_batches([0, 1, 2, 3], widths, 2, 100) == [[0], [1], [2], [3]]  # two rows a pair


@pytest.mark.parametrize("budget", [0, -5, 2.5, True, "512"])
def test_bad_forward_token_budget_is_refused(tmp_path, toy, budget):
    with pytest.raises(ValueError, match="model.max_forward_tokens: expected a positive integer or null"):
        run_training(make_cfg(**{"model.max_forward_tokens": budget}), toy(4), tmp_path / "out")


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_token_budgeted_passes_equal_one_big_pass(tmp_path, toy, shared_prefix):
    records = toy(16)
    tokenizer = AutoTokenizer.from_pretrained(model_path(make_cfg().model))
    examples = tokenize_pairs(tokenizer, normalise_records(records)[0], 128, 64, "keep_end")
    batches = PairBatches(examples, tokenizer.pad_token_id, torch.device("cpu"), shared_prefix)
    first_step_tokens = batches.rows_per_pair * 8 * max(batches.width(i) for i in range(8))
    assert first_step_tokens > 2 * 64  # so a budget of 64 splits every step
    one_pass = {"train.epochs": 1, "train.batch_size": 8, "train.shared_prefix": shared_prefix}
    a = run_training(make_cfg(**one_pass, **{"model.max_forward_tokens": None}), records, tmp_path / "a").metrics
    b = run_training(make_cfg(**one_pass, **{"model.max_forward_tokens": 64}), records, tmp_path / "b").metrics
    for ha, hb in zip(a["history"], b["history"], strict=True):
        assert ha["loss"] == pytest.approx(hb["loss"], abs=1e-5)
        assert ha["grad_norm"] == pytest.approx(hb["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("loss", ["cdpo", "ipo", "hinge", "dpo_reffree", "sft", "dpo_sft"])
def test_every_loss_trains(tmp_path, toy, loss):
    result = run_training(make_cfg(loss=loss, **{"train.epochs": 1}), toy(24), tmp_path / "out")
    assert all(math.isfinite(h["loss"]) for h in result.metrics["history"])


def test_rmsprop_and_cosine(tmp_path, toy):
    values = {"train.scheduler": "cosine", "train.warmup_steps": 0, "train.learning_rate": 1e-4, "train.epochs": 1}
    runs = {
        name: run_training(make_cfg(**values, **{"train.optimizer": name}), toy(24), tmp_path / name).metrics
        for name in ("rmsprop", "adamw")
    }
    assert runs["rmsprop"]["steps"] == 3
    lrs = [h["lr"] for h in runs["rmsprop"]["history"]]
    assert lrs == pytest.approx([1e-4, 0.75e-4, 0.25e-4])  # cosine over 3 steps: 1, (1 + cos(pi/3))/2, ...
    losses = {name: [h["loss"] for h in m["history"]] for name, m in runs.items()}
    assert losses["rmsprop"][0] == pytest.approx(losses["adamw"][0])  # the same start
    assert losses["rmsprop"][1:] != pytest.approx(losses["adamw"][1:], abs=1e-6)  # a different optimizer's steps


def test_cancel_stops_at_a_step_boundary_and_writes_nothing(tmp_path, toy):
    seen = []
    out = tmp_path / "out"
    with pytest.raises(TrainingCancelled, match="before step 3"):
        stop = lambda: sum(e["kind"] == "step" for e in seen) >= 2  # noqa: E731
        run_training(make_cfg(), toy(64), out, on_progress=seen.append, should_stop=stop)
    assert not out.exists()


def test_bad_record_fails_before_loading_a_model(tmp_path):
    from training import RecordError

    with pytest.raises(RecordError, match="record 1: field 'chosen'"):
        run_training(
            make_cfg(),
            [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "rejected": "b"}],
            tmp_path / "o",
        )
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_cli_toy_train_prints_accuracy_and_artifact(tmp_path):
    from tools.toy_data import toy_records
    from training.records import write_jsonl

    data = write_jsonl(toy_records(256, "pairs"), tmp_path / "pairs.jsonl")
    out = subprocess.run(
        [sys.executable, "-m", "training", f"data.path={data}", f"output_dir={tmp_path / 'run'}", "train.threads=2"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    accuracy = float(out.stdout.split("held-out reward accuracy: ")[1].split()[0])
    assert accuracy >= 0.9
    assert f"artifact: {tmp_path / 'run'}" in out.stdout
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_the_batching_docstring_examples_hold():
    """collate_shared_prefix's docstring shows the exact tensors of a two-pair batch."""
    import doctest

    import training.batching

    result = doctest.testmod(training.batching)
    assert result.attempted >= 4 and result.failed == 0


def test_the_learning_rate_schedule_by_hand():
    """lr_lambda(step) multiplies the learning rate before optimizer step `step + 1`: warm-up
    climbs (step + 1) / (warmup + 1); then linear falls to 0 at `total`, cosine follows
    (1 + cos(pi * progress)) / 2, constant stays 1. Here warmup 3, total 13."""
    from training.loop import lr_lambda

    warm = [lr_lambda("linear", 3, 13)(s) for s in range(3)]
    assert warm == pytest.approx([1 / 4, 2 / 4, 3 / 4])
    linear = lr_lambda("linear", 3, 13)
    assert [linear(s) for s in (3, 8, 13, 20)] == pytest.approx([1.0, 0.5, 0.0, 0.0])  # progress (s-3)/10
    cosine = lr_lambda("cosine", 3, 13)
    assert [cosine(s) for s in (3, 8, 13, 20)] == pytest.approx([1.0, 0.5, 0.0, 0.0])  # cos(0), cos(pi/2), cos(pi)
    assert cosine(5) == pytest.approx((1 + math.cos(math.pi * 0.2)) / 2)
    assert [lr_lambda("constant", 0, 13)(s) for s in (0, 13)] == [1.0, 1.0]
    with pytest.raises(ValueError, match="train.scheduler: expected constant | linear | cosine"):
        lr_lambda("step", 0, 13)(1)


def test_a_loss_that_overflows_stops_the_run_before_any_weight_takes_it(tmp_path, toy):
    """IPO with beta 1e-40: 1/(2 beta) overflows fp32. The baseline evaluation says so at step 0;
    without a held-out set the first step's loss does, before the optimizer step."""
    from training.errors import NonFiniteError

    with pytest.raises(NonFiniteError, match=r"^step 0: eval/loss is not finite") as caught:
        run_training(make_cfg("ipo", **{"loss.beta": 1e-40}), toy(24), tmp_path / "a")
    assert (caught.value.step, caught.value.term) == (0, "eval/loss")
    with pytest.raises(NonFiniteError, match=r"^step 1: loss is not finite"):
        run_training(make_cfg("ipo", **{"loss.beta": 1e-40, "data.eval_fraction": 0.0}), toy(24), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing saved
