"""What a step learns from: steps are random samples whatever the pairs' lengths; held-out
metrics are tracked over the job and a job that makes them worse is flagged."""

import pytest

from tests.conftest import make_cfg
from training import run_training
from training.loop import PairBatches, eval_steps, heldout_regressed

REAL_PASSES = PairBatches.passes


def lengthened(records, extra_words):
    """The same pairs with both answers lengthened by extra_words[i] words (style and the
    preference unchanged, only the lengths)."""
    out = []
    for record, n in zip(records, extra_words, strict=True):
        tail = " and more" * n
        out.append({**record, "chosen": record["chosen"] + tail, "rejected": record["rejected"] + tail})
    return out


def trained_steps(monkeypatch, records, tmp_path) -> list[list[int]]:
    """The pairs (indices) of each optimizer step, seen where the loop asks for a step's passes.
    Live reference and no eval split: passes() is then called once per training step only."""
    seen = []

    def spy(self, indices):
        seen.append(sorted(indices))
        return REAL_PASSES(self, indices)

    monkeypatch.setattr(PairBatches, "passes", spy)
    cfg = make_cfg(**{"train.epochs": 2, "train.reference": "live", "data.eval_fraction": 0.0})
    result = run_training(cfg, records, tmp_path)
    assert len(seen) == result.metrics["steps"]
    return seen


def test_a_steps_pairs_do_not_depend_on_their_lengths(monkeypatch, tmp_path, toy):
    records = toy(48)
    n = len(records)
    # Two datasets of the same pairs whose lengths are ordered in opposite ways: length-grouped
    # batching would put other pairs together in each; uniform sampling puts the same ones.
    short_first = trained_steps(monkeypatch, lengthened(records, [i // 4 for i in range(n)]), tmp_path / "a")
    long_first = trained_steps(monkeypatch, lengthened(records, [(n - i) // 4 for i in range(n)]), tmp_path / "b")
    assert short_first == long_first


def test_passes_go_widest_first_and_cover_the_step(tokenizer, toy):
    import torch

    from training.records import normalise_records
    from training.tokenize import tokenize_pairs

    records = lengthened(toy(8), [0, 9, 2, 7, 4, 5, 6, 3])
    examples = tokenize_pairs(tokenizer, normalise_records(records)[0], 128, 64, "keep_end")
    batches = PairBatches(examples, tokenizer.pad_token_id, torch.device("cpu"), True, 128)
    passes = batches.passes(list(range(8)))
    flat = [i for p in passes for i in p]
    assert sorted(flat) == list(range(8)) and len(passes) > 1
    widths = [batches.width(i) for i in flat]
    assert widths == sorted(widths, reverse=True)


def test_eval_points_are_spread_over_the_job():
    assert eval_steps(64, 4) == {0, 16, 32, 48, 64}
    assert eval_steps(3, 4) == {0, 1, 2, 3}
    assert eval_steps(10, 0) == {0, 10}
    with pytest.raises(ValueError, match="train.evals: expected a non-negative integer, got -1"):
        eval_steps(10, -1)


def test_regressed_means_worse_than_the_initial_policy():
    start = {"eval/loss": 0.6931, "eval/rewards/margins": 0.0}
    assert not heldout_regressed(start, {"eval/loss": 0.40, "eval/rewards/margins": 1.2})
    assert heldout_regressed(start, {"eval/loss": 0.80, "eval/rewards/margins": 0.1})
    assert heldout_regressed(start, {"eval/loss": 0.60, "eval/rewards/margins": -0.1})


def test_held_out_metrics_are_tracked_over_the_job(tmp_path, toy):
    events = []
    result = run_training(make_cfg(**{"train.epochs": 1}), toy(40), tmp_path, on_progress=events.append)
    total = result.metrics["total_steps"]
    evals = result.metrics["evals"]
    assert [e["step"] for e in evals] == sorted(eval_steps(total, 4)) and evals[0]["step"] == 0
    assert abs(evals[0]["eval/rewards/margins"]) < 1e-4  # the initial policy is the reference
    assert [e["step"] for e in events if e["kind"] == "eval"] == [e["step"] for e in evals]
    assert result.metrics["final_eval"]["eval/regressed"] is False
    assert "eval/regressed" not in evals[0]


def test_a_job_that_makes_held_out_pairs_worse_is_flagged(tmp_path, toy):
    # Every pair also appears mirrored (chosen and rejected swapped): training on the mirror of a
    # held-out pair teaches the opposite of it, so the held-out metrics get worse.
    records = toy(40)
    mirrored = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in records]
    cfg = make_cfg(**{"train.epochs": 4, "data.eval_fraction": 0.3})
    result = run_training(cfg, records + mirrored, tmp_path)
    final = result.metrics["final_eval"]
    assert final["eval/regressed"] is True, final


@pytest.mark.parametrize("evals", [-1, 2.5, True, "4"])
def test_bad_eval_count_is_refused(tmp_path, toy, evals):
    with pytest.raises(ValueError, match="train.evals: expected a non-negative integer"):
        run_training(make_cfg(**{"train.evals": evals, "data.eval_fraction": 0.0}), toy(4), tmp_path)
