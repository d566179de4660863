"""Prompt/response boundary, EOS, truncation, chat template, label masking."""

import pytest

from training.batching import IGNORE, collate
from training.records import PreferencePair, normalise_record
from training.tokenize import tokenize_pair, tokenize_pairs, truncate


def pair(prompt="Can you help me with a poem?", chosen="Of course, glad to help.", rejected="No."):
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected)


def test_prompt_is_a_prefix_and_responses_end_with_eos(tokenizer):
    tp = tokenize_pair(tokenizer, pair(), 128, 64, "keep_end")
    full_prompt = tokenizer("Can you help me with a poem?")["input_ids"]
    assert tp.prompt_ids == full_prompt and tp.prompt_ids[0] == tokenizer.bos_token_id
    assert tp.chosen_ids[-1] == tokenizer.eos_token_id and tp.rejected_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(tp.chosen_ids[:-1]) == "Of course, glad to help."
    assert tp.chosen_ids.count(tokenizer.eos_token_id) == 1


def test_labels_mask_prompt_and_padding(tokenizer):
    tps = [
        tokenize_pair(tokenizer, pair(), 128, 64, "keep_end"),
        tokenize_pair(tokenizer, pair(prompt="Hi"), 128, 64, "keep_end"),
    ]
    batch = collate(tps, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 4  # chosen x2 then rejected x2
    for row, (tp, side) in enumerate(
        [(tps[0], "chosen_ids"), (tps[1], "chosen_ids"), (tps[0], "rejected_ids"), (tps[1], "rejected_ids")]
    ):
        n_prompt, response = len(tp.prompt_ids), getattr(tp, side)
        labels = batch["labels"][row].tolist()
        assert labels[:n_prompt] == [IGNORE] * n_prompt
        assert labels[n_prompt : n_prompt + len(response)] == response
        assert all(v == IGNORE for v in labels[n_prompt + len(response) :])
        assert batch["attention_mask"][row].sum() == n_prompt + len(response)


def test_truncation_keep_end_and_keep_start():
    prompt, chosen, rejected = list(range(10)), [100, 101, 102, 103], [200, 201]
    p, c, r = truncate(prompt, chosen, rejected, max_length=8, max_prompt_length=5, mode="keep_end")
    assert p == [5, 6, 7, 8, 9] and c == [100, 101, 102] and r == [200, 201]
    p, c, r = truncate(prompt, chosen, rejected, max_length=8, max_prompt_length=5, mode="keep_start")
    assert p == [0, 1, 2, 3, 4] and c == [100, 101, 102]
    # fits already: untouched even though the prompt is longer than max_prompt_length
    assert truncate(prompt, chosen, rejected, 20, 5, "keep_end") == (prompt, chosen, rejected)
    with pytest.raises(ValueError, match="truncation_mode"):
        truncate(prompt, chosen, rejected, 8, 5, "middle")


def test_long_prompt_is_truncated_to_fit_max_length(tokenizer):
    long_prompt = "Please explain the weather. " * 5  # longer than max_prompt_length, shorter than max_length
    assert 32 < len(tokenizer(long_prompt)["input_ids"]) <= 64
    tp = tokenize_pair(tokenizer, pair(prompt=long_prompt), 64, 32, "keep_end")
    assert len(tp.prompt_ids) == 32 and tp.chosen_length <= 64 and tp.rejected_length <= 64


def test_prompt_longer_than_max_length_is_an_error(tokenizer):
    from training.records import RecordError

    with pytest.raises(RecordError, match="field 'prompt': .* tokens, longer than max_length \\(64\\)"):
        tokenize_pairs(tokenizer, [pair(prompt="Please explain the weather. " * 60)], 64, 32, "keep_end")


def test_max_prompt_length_must_leave_room(tokenizer):
    with pytest.raises(ValueError, match="must be smaller than max_length"):
        tokenize_pairs(tokenizer, [pair()], 32, 32, "keep_end")


def test_chat_records_use_the_chat_template(tokenizer):
    record = {
        "input": {"messages": [{"role": "user", "content": "Hi"}]},
        "preferred_output": [{"role": "assistant", "content": "Hello, glad to help!"}],
        "non_preferred_output": [{"role": "assistant", "content": "Go away."}],
    }
    (p,) = normalise_record(record)
    tp = tokenize_pair(tokenizer, p, 128, 64, "keep_end")
    assert tokenizer.decode(tp.prompt_ids, skip_special_tokens=False) == "<s><|user|>Hi<|end|><|assistant|>"
    assert tokenizer.decode(tp.chosen_ids, skip_special_tokens=False) == "Hello, glad to help!<|end|></s>"


def test_chat_without_template_falls_back_to_plain_rendering(tokenizer):
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    p = PreferencePair(messages=(("user", "Hi"),), chosen="Hello", rejected="Bye")
    tp = tokenize_pair(plain, p, 128, 64, "keep_end")
    assert tokenizer.decode(tp.prompt_ids, skip_special_tokens=True) == "user: Hi\nassistant: "
