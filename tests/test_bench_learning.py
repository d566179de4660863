"""The learning benchmark's parts: content tasks carry no surface cue, and its evaluator (written
apart from the trainer) agrees with the trainer's log-prob code."""

import collections

import pytest
import torch

from tools.learning_tasks import CONTENT_TASKS, TASKS, task_split


def variable_word(chosen: str, rejected: str) -> tuple[str, str]:
    """The one word where chosen and rejected differ (they share everything else)."""
    a, b = chosen.split(), rejected.split()
    assert len(a) == len(b), (chosen, rejected)
    diff = [(x, y) for x, y in zip(a, b, strict=True) if x != y]
    assert len(diff) == 1, (chosen, rejected)
    return diff[0]


@pytest.mark.parametrize("task", CONTENT_TASKS)
def test_content_tasks_differ_in_one_word_drawn_from_one_pool(task):
    records = TASKS[task](2000, 0)
    preferred, dispreferred = collections.Counter(), collections.Counter()
    for r in records:
        good, bad = variable_word(r["chosen"], r["rejected"])
        preferred[good] += 1
        dispreferred[bad] += 1
    # every answer word is preferred about as often as it is not: the answer alone says nothing
    for word in set(preferred) | set(dispreferred):
        total = preferred[word] + dispreferred[word]
        if total >= 100:
            assert 0.3 < preferred[word] / total < 0.7, (word, preferred[word], dispreferred[word])


def test_splits_are_disjoint_and_sized():
    for task in TASKS:
        train, heldout = task_split(task, 300, 50, seed=3)
        assert len(train) == 300 and len(heldout) == 50
        keys = lambda rs: {(r["prompt"], r["chosen"], r["rejected"]) for r in rs}  # noqa: E731
        assert not keys(train) & keys(heldout)


def test_independent_evaluator_agrees_with_the_trainers_logprobs(tiny_model_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from tools.bench_learning import response_logps
    from training.batching import collate
    from training.logprobs import model_logps
    from training.records import normalise_records
    from training.tokenize import tokenize_pairs

    records = task_split("fact", 6, 0, seed=0)[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    examples = tokenize_pairs(tokenizer, normalise_records(records)[0], 128, 64, "keep_end")
    with torch.no_grad():
        chosen, rejected, _ = model_logps(model, collate(examples, tokenizer.pad_token_id))
    ours = torch.tensor(response_logps(model, tokenizer, records, "chosen", "cpu", rows=4))
    torch.testing.assert_close(ours, chosen.float(), atol=1e-4, rtol=1e-5)
    ours = torch.tensor(response_logps(model, tokenizer, records, "rejected", "cpu", rows=4))
    torch.testing.assert_close(ours, rejected.float(), atol=1e-4, rtol=1e-5)


def test_paired_difference_is_seed_by_seed():
    from tools.bench_learning import paired_difference

    d = paired_difference([0.6, 0.7], [0.5, 0.5])
    assert d["mean"] == pytest.approx(0.15) and d["se"] == pytest.approx(0.05) and d["runs"] == [0.1, 0.2]
