"""Cross-check with the peer: TRL's DPOTrainer computes the same per-example loss, log-probs and
rewards as ours on the same tiny model, reference and examples (TRL is a test dependency only)."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from training.batching import collate
from training.logprobs import model_logps
from training.losses import preference_loss
from training.records import normalise_records
from training.tokenize import tokenize_pairs

trl = pytest.importorskip("trl")


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_per_example_loss_and_logps_match_trl(tmp_path, tiny_model_path, tokenizer, toy, loss_type):
    from datasets import Dataset

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    reference = copy.deepcopy(policy)
    with torch.no_grad():  # a reference that differs from the policy, so the loss is not trivially ln 2
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    records = toy(6, "pairs", seed=3)

    args = trl.DPOConfig(
        output_dir=str(tmp_path),
        beta=0.1,
        loss_type=[loss_type],
        max_length=128,
        per_device_train_batch_size=1,
        report_to=[],
        use_cpu=True,
        disable_dropout=True,
        dataset_num_proc=None,
    )
    trainer = trl.DPOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_list(records),
        processing_class=tokenizer,
    )

    pairs, _ = normalise_records(records)
    ours = tokenize_pairs(tokenizer, pairs, 128, 64, "keep_end")
    for i, example in enumerate(ours):
        trl_batch = trainer.data_collator([trainer.train_dataset[i]])
        # Same tokens: TRL tokenizes prompt+response jointly, we concatenate; the boundary is clean here.
        trl_ids = trl_batch["input_ids"][0][trl_batch["attention_mask"][0].bool()].tolist()
        assert trl_ids == example.prompt_ids + example.chosen_ids

        trainer._metrics["eval"].clear()  # the policy is in eval mode: TRL logs under "eval"
        with torch.no_grad():
            trl_loss = trainer._compute_loss(trainer.model, trl_batch, return_outputs=False)
        m = trainer._metrics["eval"]

        batch = collate([example], tokenizer.pad_token_id)
        with torch.no_grad():
            chosen, rejected, _ = model_logps(policy, batch)
            ref_chosen, ref_rejected, _ = model_logps(reference, batch)
        out = preference_loss(
            chosen, rejected, ref_chosen, ref_rejected, name="dpo" if loss_type == "sigmoid" else "hinge", beta=0.1
        )

        assert out.losses.item() == pytest.approx(trl_loss.item(), abs=1e-4)
        assert chosen.item() == pytest.approx(m["logps/chosen"][-1], abs=1e-4)
        assert rejected.item() == pytest.approx(m["logps/rejected"][-1], abs=1e-4)
        assert out.chosen_rewards.item() == pytest.approx(m["rewards/chosen"][-1], abs=1e-4)
        assert out.rejected_rewards.item() == pytest.approx(m["rewards/rejected"][-1], abs=1e-4)
