"""The record formats normalise to pairs; bad records name their index and field."""

import json
from pathlib import Path

import jsonschema
import pytest

from training.records import RecordError, load_records_file, normalise_record, normalise_records

REPO = Path(__file__).resolve().parents[1]


def test_pairs_format():
    (pair,) = normalise_record({"prompt": "Q?", "chosen": "good", "rejected": "bad"})
    assert (pair.prompt, pair.chosen, pair.rejected, pair.messages) == ("Q?", "good", "bad", None)


def test_ranked_format_expands_every_comparison():
    record = {"prompt": "2+3?", "responses": ["5", "6", "no"], "pairs": [[0, 1], [0, 2], [1, 2]], "sft_target": "5"}
    pairs = normalise_record(record)
    assert [(p.chosen, p.rejected) for p in pairs] == [("5", "6"), ("5", "no"), ("6", "no")]
    assert all(p.prompt == "2+3?" for p in pairs)


def test_ranked_pairs_as_objects_the_firestore_form():
    record = {"prompt": "2+3?", "responses": ["5", "6"], "pairs": [{"preferred": 0, "rejected": 1}]}
    assert [(p.chosen, p.rejected) for p in normalise_record(record)] == [("5", "6")]


def test_chat_format_keeps_the_conversation():
    record = {
        "input": {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]},
        "preferred_output": [{"role": "assistant", "content": "Hello!"}],
        "non_preferred_output": [{"role": "assistant", "content": "Go away."}],
    }
    (pair,) = normalise_record(record)
    assert pair.messages == (("system", "Be kind."), ("user", "Hi")) and pair.prompt is None
    assert (pair.chosen, pair.rejected) == ("Hello!", "Go away.")


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_trl_conversational_format_with_an_explicit_prompt():
    record = {
        "prompt": [{"role": "system", "content": "Be kind."}, user("Hi")],
        "chosen": [assistant("Hello!")],
        "rejected": [assistant("Go away.")],
    }
    (pair,) = normalise_record(record)
    assert pair.messages == (("system", "Be kind."), ("user", "Hi")) and pair.prompt is None
    assert (pair.chosen, pair.rejected) == ("Hello!", "Go away.")


def test_trl_implicit_prompt_is_the_conversation_chosen_and_rejected_share():
    shared = [user("2+2?"), assistant("4"), user("and times 3?")]
    record = {"chosen": [*shared, assistant("12")], "rejected": [*shared, assistant("6")]}
    (pair,) = normalise_record(record)
    assert pair.messages == (("user", "2+2?"), ("assistant", "4"), ("user", "and times 3?"))
    assert (pair.chosen, pair.rejected) == ("12", "6")


def test_a_text_prompt_beside_full_conversations_is_taken_from_them():
    """UltraFeedback's shape: the prompt as text, chosen and rejected as whole conversations."""
    record = {"prompt": "2+2?", "chosen": [user("2+2?"), assistant("4")], "rejected": [user("2+2?"), assistant("5")]}
    (pair,) = normalise_record(record)
    assert pair.messages == (("user", "2+2?"),) and (pair.chosen, pair.rejected) == ("4", "5")


def test_content_given_as_text_parts_is_joined():
    record = {
        "prompt": [
            {"role": "user", "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "colour."}]}
        ],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}],
        "rejected": [assistant("No.")],
    }
    (pair,) = normalise_record(record)
    assert pair.messages == (("user", "Name a colour."),) and pair.chosen == "Blue."


@pytest.mark.parametrize(
    "record, field, message",
    [
        (
            {"prompt": [user("Hi")], "chosen": [assistant("a")], "rejected": "b"},
            "rejected",
            "expected a non-empty list of messages, as the record's other fields are, got str",
        ),
        (  # a text prompt: the conversations must carry it
            {"prompt": "Hi", "chosen": [assistant("a")], "rejected": [assistant("b")]},
            "prompt",
            "is required: 'chosen' and 'rejected' share no first messages to take as the prompt",
        ),
        (
            {"chosen": [user("x"), assistant("a")], "rejected": [user("y"), assistant("b")]},
            "prompt",
            "is required: 'chosen' and 'rejected' share no first messages to take as the prompt",
        ),
        (
            {"prompt": [user("Hi")], "chosen": [assistant("a"), user("more")], "rejected": [assistant("b")]},
            "chosen",
            "expected one assistant message after the prompt, got 2 messages from [0]",
        ),
        (
            {"prompt": [user("Hi")], "chosen": [user("a")], "rejected": [assistant("b")]},
            "chosen[0].role",
            "expected 'assistant'",
        ),
        (
            {
                "prompt": [user("Hi")],
                "chosen": [{"role": "assistant", "content": [{"type": "image_url", "image_url": {}}]}],
                "rejected": [assistant("b")],
            },
            "chosen[0].content[0]",
            "expected a text part {'type': 'text', 'text': ...}, got 'image_url'",
        ),
        (
            {
                "prompt": [user("Hi")],
                "chosen": [assistant("a")],
                "rejected": [assistant("b")],
                "tools": [{"type": "function"}],
            },
            "tools",
            "tool definitions and tool calls are not supported",
        ),
        (
            {
                "prompt": [user("Hi")],
                "chosen": [{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}],
                "rejected": [assistant("b")],
            },
            "chosen[0].tool_calls",
            "tool definitions and tool calls are not supported",
        ),
        (
            {
                "input": {"messages": [user("Hi")], "tools": [{"type": "function"}]},
                "preferred_output": [assistant("a")],
                "non_preferred_output": [assistant("b")],
            },
            "input.tools",
            "tool definitions and tool calls are not supported",
        ),
        (
            {
                "input": {"messages": [user("Hi")]},
                "tools": [{"type": "function"}],
                "preferred_output": [assistant("a")],
                "non_preferred_output": [assistant("b")],
            },
            "tools",
            "tool definitions and tool calls are not supported",
        ),
        (
            {
                "prompt": [user("Hi")],
                "chosen": [{"role": "assistant", "content": "", "function_call": {"name": "f"}}],
                "rejected": [assistant("b")],
            },
            "chosen[0].function_call",
            "tool definitions and tool calls are not supported",
        ),
    ],
)
def test_bad_conversational_records_name_the_field(record, field, message):
    with pytest.raises(RecordError) as err:
        normalise_record(record, rid=7)
    assert err.value.record == 7 and err.value.field == field and message in err.value.message


def test_sample_file_matches_the_schema_and_normalises():
    schema = json.loads((REPO / "datasets/preference_record.schema.json").read_text())
    records = load_records_file(str(REPO / "datasets/sample.jsonl"))
    for record in records:
        jsonschema.validate(record, schema)
    pairs, errors = normalise_records(records)
    assert len(pairs) == 1 + 3 + 1 + 2 and errors == []


@pytest.mark.parametrize(
    "record, field, message",
    [
        ({"prompt": "p", "chosen": "a"}, "rejected", "is required"),
        ({"prompt": "p", "chosen": 3, "rejected": "b"}, "chosen", "expected a string, got int"),
        ({"prompt": " ", "chosen": "a", "rejected": "b"}, "prompt", "must not be empty"),
        ({"prompt": "p", "chosen": "a", "rejected": "a"}, "rejected", "identical"),
        ({"prompt": "p", "responses": ["a"], "pairs": [[0, 0]]}, "responses", "at least 2"),
        ({"prompt": "p", "responses": ["a", "b"], "pairs": [[0, 2]]}, "pairs[0]", "index 2 out of range"),
        ({"prompt": "p", "responses": ["a", "b"], "pairs": [[0, "1"]]}, "pairs[0]", "two integers"),
        ({"prompt": "p", "responses": ["a", 7], "pairs": [[0, 1]]}, "responses[1]", "non-empty string"),
        (
            {"input": {"messages": []}, "preferred_output": [], "non_preferred_output": []},
            "input.messages",
            "non-empty",
        ),
        (
            {
                "input": {"messages": [{"role": "wizard", "content": "x"}]},
                "preferred_output": [],
                "non_preferred_output": [],
            },
            "input.messages[0].role",
            "expected one of",
        ),
        (
            {
                "input": {"messages": [{"role": "user", "content": "x"}]},
                "preferred_output": [{"role": "user", "content": "y"}],
                "non_preferred_output": [{"role": "assistant", "content": "z"}],
            },
            "preferred_output[0].role",
            "expected 'assistant'",
        ),
        ("just a string", "<record>", "expected an object"),
        ({"question": "p", "answer": "a"}, "<record>", "unrecognised format"),
    ],
)
def test_bad_records_name_index_and_field(record, field, message):
    good = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": "b"}]
    with pytest.raises(RecordError) as info:
        normalise_records([*good, record])
    err = info.value
    assert err.record == 2 and err.field == field and message in err.message
    assert str(err).startswith(f"record 2: field '{field}'")


def test_skip_invalid_keeps_the_good_ones_and_reports_the_bad():
    records = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p"},
        {"prompt": "q", "chosen": "c", "rejected": "d"},
    ]
    pairs, errors = normalise_records(records, ids=["doc-a", "doc-b", "doc-c"], skip_invalid=True)
    assert len(pairs) == 2 and [e.record for e in errors] == ["doc-b"]


def test_empty_dataset_is_an_error():
    with pytest.raises(RecordError, match="no usable preference records"):
        normalise_records([])


def test_jsonl_line_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{not json\n')
    with pytest.raises(RecordError, match="record line 2"):
        load_records_file(str(path))


def test_duplicate_records_are_named():
    record = {"prompt": "p", "chosen": "a", "rejected": "b"}
    with pytest.raises(RecordError, match="record 2: field '<record>': duplicate of record 0"):
        normalise_records([record, {"prompt": "q", "chosen": "a", "rejected": "b"}, dict(record)])


def test_strings_longer_than_the_limit_are_named():
    record = {
        "input": {"messages": [{"role": "user", "content": "x" * 101}]},
        "preferred_output": [],
        "non_preferred_output": [],
    }
    with pytest.raises(
        RecordError, match="record 0: field 'input.messages\\[0\\].content': 101 characters, more than the limit of 100"
    ):
        normalise_records([record], max_chars=100)


def test_a_parquet_file_written_by_huggingface_datasets_loads_in_any_format(tmp_path):
    """Users keep preference data as Parquet (the Hub's format); nested message lists survive,
    and a column only some rows use does not turn into a null field of the others."""
    import datetime as dt

    from datasets import Dataset

    records = [
        {"prompt": "Q?", "chosen": "good", "rejected": "bad"},
        {"prompt": [user("Hi")], "chosen": [assistant("Hello!")], "rejected": [assistant("Go away.")]},
    ]
    created = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)  # a timestamp column: ISO text, as JSON holds it
    Dataset.from_list([{**records[0], "createdAt": created}]).to_parquet(str(tmp_path / "dated.parquet"))
    assert load_records_file(str(tmp_path / "dated.parquet")) == [{**records[0], "createdAt": created.isoformat()}]
    Dataset.from_list(records[:1]).to_parquet(str(tmp_path / "plain.parquet"))
    Dataset.from_list(records[1:]).to_parquet(str(tmp_path / "chat.parquet"))
    plain = load_records_file(str(tmp_path / "plain.parquet"))
    chat = load_records_file(str(tmp_path / "chat.parquet"))
    assert plain == records[:1] and chat == records[1:]
    assert [p.chosen for p in normalise_records(plain + chat)[0]] == ["good", "Hello!"]
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(RecordError, match="not a readable Parquet file"):
        load_records_file(str(tmp_path / "broken.parquet"))
