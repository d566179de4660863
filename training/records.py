"""Preference records in the accepted formats, normalised to (prompt, chosen, rejected) pairs.

The formats (see datasets/preference_record.schema.json):
  pairs   {"prompt", "chosen", "rejected"}
  ranked  {"prompt", "responses": [..], "pairs": [[preferred, rejected], ..], "sft_target"?}
          (each pair may also be {"preferred": i, "rejected": j}: Firestore cannot nest arrays)
  chat    {"input": {"messages": [..]}, "preferred_output": [msg], "non_preferred_output": [msg]}
          (OpenAI's preference fine-tuning JSONL)
  conversational (TRL's preference formats, messages as lists of {"role", "content"}):
          explicit prompt {"prompt": [msgs], "chosen": [msg], "rejected": [msg]}, or
          implicit prompt {"chosen": [msgs], "rejected": [msgs]}: the messages they share are the
          prompt, each keeps one assistant message of its own
A message's content is a string or a list of text parts ([{"type": "text", "text": ...}]).
Tool definitions and tool calls are refused, not dropped: the chat templates would have to render
them, and a conversation trained without them is another conversation.

Validation errors name the record (its index, or the id the caller gave it) and the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class PreferencePair:
    """One comparison. For chat records `messages` holds the conversation and `prompt` is None."""

    chosen: str
    rejected: str
    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # ((role, content), ...)
    source: str = ""  # the record it came from, for error messages


class RecordError(ValueError):
    """A record that cannot be used. `record` is its index or id, `field` the offending field."""

    def __init__(self, record: int | str, field: str, message: str):
        self.record = record
        self.field = field
        self.message = message
        super().__init__(f"record {record}: field '{field}': {message}")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


CONVERSATIONAL_HINT = "in TRL's conversational format 'chosen' and 'rejected' are message lists too"


def _text(record: dict, key: str, rid: int | str, field: str | None = None) -> str:
    value = record.get(key)
    field = field or key
    if key not in record:
        raise RecordError(rid, field, "is required")
    if isinstance(value, list):
        raise RecordError(rid, field, f"expected a string, got list ({CONVERSATIONAL_HINT})")
    if not isinstance(value, str):
        raise RecordError(rid, field, f"expected a string, got {_type_name(value)}")
    if not value.strip():
        raise RecordError(rid, field, "must not be empty")
    return value


def detect_format(record: Any, rid: int | str = 0) -> str:
    if not isinstance(record, dict):
        raise RecordError(rid, "<record>", f"expected an object, got {_type_name(record)}")
    if "input" in record or "preferred_output" in record:
        return "chat"
    if "responses" in record:
        return "ranked"
    if isinstance(record.get("chosen"), list):  # TRL's conversational records: messages, always in 'chosen'
        return "conversational"
    if "chosen" in record or "rejected" in record:
        return "pairs"
    raise RecordError(
        rid,
        "<record>",
        "unrecognised format: expected 'chosen'/'rejected' (pairs, or TRL's conversational), 'responses'/'pairs'"
        " (ranked) or 'input'/'preferred_output'/'non_preferred_output' (chat)",
    )


def _pairs_record(record: dict, rid: int | str) -> list[PreferencePair]:
    prompt = _text(record, "prompt", rid)
    chosen = _text(record, "chosen", rid)
    rejected = _text(record, "rejected", rid)
    if chosen == rejected:
        raise RecordError(rid, "rejected", "is identical to 'chosen': nothing to prefer")
    return [PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, source=str(rid))]


def _ranked_record(record: dict, rid: int | str) -> list[PreferencePair]:
    prompt = _text(record, "prompt", rid)
    responses = record.get("responses")
    if not isinstance(responses, list) or len(responses) < 2:
        raise RecordError(rid, "responses", "expected a list of at least 2 strings")
    for i, response in enumerate(responses):
        if not isinstance(response, str) or not response.strip():
            raise RecordError(rid, f"responses[{i}]", f"expected a non-empty string, got {_type_name(response)}")
    comparisons = record.get("pairs")
    if not isinstance(comparisons, list) or not comparisons:
        raise RecordError(rid, "pairs", "expected a non-empty list of [preferred_index, rejected_index]")
    out = []
    for k, pair in enumerate(comparisons):
        field = f"pairs[{k}]"
        if isinstance(pair, dict):  # Firestore cannot store nested arrays: {"preferred": i, "rejected": j}
            pair = [pair.get("preferred"), pair.get("rejected")]
        if (
            not isinstance(pair, list | tuple)
            or len(pair) != 2
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in pair)
        ):
            raise RecordError(
                rid, field, "expected [preferred_index, rejected_index] or {preferred, rejected} (two integers)"
            )
        good, bad = pair
        for i in (good, bad):
            if not 0 <= i < len(responses):
                raise RecordError(rid, field, f"index {i} out of range: {len(responses)} responses")
        if responses[good] == responses[bad]:
            raise RecordError(rid, field, "preferred and rejected responses are identical")
        out.append(PreferencePair(prompt=prompt, chosen=responses[good], rejected=responses[bad], source=str(rid)))
    target = record.get("sft_target")
    if target is not None and not isinstance(target, str):
        raise RecordError(rid, "sft_target", f"expected a string, got {_type_name(target)}")
    return out


TOOLS_REFUSED = (
    "tool definitions and tool calls are not supported: the chat template would have to render them,"
    " and dropping them would train on another conversation; remove them from the record"
)


def _message(msg: Any, rid: int | str, field: str) -> tuple[str, str]:
    if not isinstance(msg, dict):
        raise RecordError(rid, field, f"expected a message object, got {_type_name(msg)}")
    role = msg.get("role")
    if role not in CHAT_ROLES:
        raise RecordError(rid, f"{field}.role", f"expected one of {list(CHAT_ROLES)}, got {role!r}")
    for key in ("tool_calls", "function_call"):
        if msg.get(key):
            raise RecordError(rid, f"{field}.{key}", TOOLS_REFUSED)
    return role, _content(msg.get("content"), rid, f"{field}.content")


def _content(content: Any, rid: int | str, field: str) -> str:
    """A message's text: a string, or OpenAI's list of parts of which only text ones are taken."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RecordError(rid, field, f"expected a string or a list of text parts, got {_type_name(content)}")
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else _type_name(part)
            raise RecordError(
                rid, f"{field}[{i}]", f"expected a text part {{'type': 'text', 'text': ...}}, got {kind!r}"
            )
        if not isinstance(part.get("text"), str):
            raise RecordError(rid, f"{field}[{i}].text", f"expected a string, got {_type_name(part.get('text'))}")
        texts.append(part["text"])
    return "".join(texts)


def _refuse_tools(record: dict, rid: int | str, field: str = "tools") -> None:
    if record.get("tools"):
        raise RecordError(rid, field, TOOLS_REFUSED)


def _chat_output(record: dict, key: str, rid: int | str) -> str:
    value = record.get(key)
    if not isinstance(value, list) or len(value) != 1:
        raise RecordError(rid, key, "expected a list holding exactly one assistant message")
    return _answer((_message(value[0], rid, f"{key}[0]"),), rid, key, 0)


def _chat_record(record: dict, rid: int | str) -> list[PreferencePair]:
    inp = record.get("input")
    if not isinstance(inp, dict):
        raise RecordError(rid, "input", f"expected an object with 'messages', got {_type_name(inp)}")
    _refuse_tools(inp, rid, "input.tools")
    _refuse_tools(record, rid)
    messages = inp.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RecordError(rid, "input.messages", "expected a non-empty list of messages")
    conversation = tuple(_message(m, rid, f"input.messages[{i}]") for i, m in enumerate(messages))
    if conversation[-1][0] == "assistant":
        raise RecordError(
            rid, f"input.messages[{len(messages) - 1}].role", "the conversation must not end with the assistant"
        )
    chosen = _chat_output(record, "preferred_output", rid)
    rejected = _chat_output(record, "non_preferred_output", rid)
    if chosen == rejected:
        raise RecordError(rid, "non_preferred_output", "is identical to 'preferred_output': nothing to prefer")
    return [PreferencePair(messages=conversation, chosen=chosen, rejected=rejected, source=str(rid))]


def _messages(record: dict, key: str, rid: int | str) -> tuple[tuple[str, str], ...]:
    value = record.get(key)
    if key not in record:
        raise RecordError(rid, key, "is required")
    if not isinstance(value, list) or not value:
        raise RecordError(
            rid,
            key,
            f"expected a non-empty list of messages, as the record's other fields are, got {_type_name(value)}",
        )
    return tuple(_message(m, rid, f"{key}[{i}]") for i, m in enumerate(value))


def _answer(messages: tuple[tuple[str, str], ...], rid: int | str, key: str, offset: int) -> str:
    """The one assistant message a chosen or rejected adds to its prompt (from index `offset`)."""
    if len(messages) != 1:
        raise RecordError(
            rid, key, f"expected one assistant message after the prompt, got {len(messages)} messages from [{offset}]"
        )
    role, content = messages[0]
    if role != "assistant":
        raise RecordError(rid, f"{key}[{offset}].role", f"expected 'assistant', got {role!r}")
    if not content.strip():
        raise RecordError(rid, f"{key}[{offset}].content", "must not be empty")
    return content


def _conversational_record(record: dict, rid: int | str) -> list[PreferencePair]:
    """TRL's conversational preference formats: an explicit prompt, or an implicit one (the
    messages chosen and rejected share)."""
    _refuse_tools(record, rid)
    chosen, rejected = _messages(record, "chosen", rid), _messages(record, "rejected", rid)
    # a prompt given as text beside full conversations (UltraFeedback's shape) is what they
    # share anyway: the prompt is taken from them, as TRL does
    explicit = "prompt" in record and not isinstance(record["prompt"], str)
    if explicit:
        prompt, offset = _messages(record, "prompt", rid), 0
    else:
        offset = 0
        while offset < min(len(chosen), len(rejected)) - 1 and chosen[offset] == rejected[offset]:
            offset += 1
        if offset == 0:
            raise RecordError(
                rid, "prompt", "is required: 'chosen' and 'rejected' share no first messages to take as the prompt"
            )
        prompt = chosen[:offset]
    if prompt[-1][0] == "assistant":
        field = f"prompt[{len(prompt) - 1}].role" if explicit else f"chosen[{offset - 1}].role"
        raise RecordError(rid, field, "the prompt must not end with the assistant")
    good = _answer(chosen[offset:], rid, "chosen", offset)
    bad = _answer(rejected[offset:], rid, "rejected", offset)
    if good == bad:
        raise RecordError(rid, "rejected", "is identical to 'chosen': nothing to prefer")
    return [PreferencePair(messages=prompt, chosen=good, rejected=bad, source=str(rid))]


_PARSERS = {
    "pairs": _pairs_record,
    "ranked": _ranked_record,
    "chat": _chat_record,
    "conversational": _conversational_record,
}


def normalise_record(record: Any, rid: int | str = 0) -> list[PreferencePair]:
    """One record in any accepted format -> its preference pairs (ranked records give several)."""
    return _PARSERS[detect_format(record, rid)](record, rid)


def check_string_sizes(value: Any, rid: int | str, max_chars: int, path: str = "") -> None:
    """Every string anywhere in the record, keys included, is at most max_chars long and valid
    Unicode text (JSON can carry a lone surrogate such as "\\ud800", which no tokenizer takes)."""
    if isinstance(value, str):
        if len(value) > max_chars:
            raise RecordError(rid, path or "<record>", f"{len(value)} characters, more than the limit of {max_chars}")
        check_unicode(value, rid, path or "<record>")
    elif isinstance(value, dict):
        for key, item in value.items():
            name = str(key)[:64]
            if isinstance(key, str) and len(key) > max_chars:
                raise RecordError(
                    rid,
                    f"{path}.{name}..." if path else f"{name}...",
                    f"a key of {len(key)} characters, more than the limit of {max_chars}",
                )
            if isinstance(key, str):
                check_unicode(key, rid, f"{path}.<key>" if path else "<key>")
            check_string_sizes(item, rid, max_chars, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_string_sizes(item, rid, max_chars, f"{path}[{i}]")


def check_unicode(text: str, rid: int | str, field: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start]
        raise RecordError(
            rid, field, f"not valid Unicode text: a lone surrogate (\\u{ord(bad):04x}) at character {err.start}"
        ) from None


def normalise_records(
    records: Sequence[Any],
    ids: Sequence[str] | None = None,
    skip_invalid: bool = False,
    max_chars: int | None = None,
) -> tuple[list[PreferencePair], list[RecordError]]:
    """All records -> pairs. Raises the first RecordError unless `skip_invalid`, then returns them all.

    A record identical to an earlier one is an error too (it would silently weigh twice)."""
    pairs: list[PreferencePair] = []
    errors: list[RecordError] = []
    seen: dict[str, int | str] = {}
    for index, record in enumerate(records):
        rid = ids[index] if ids is not None else index
        try:
            if max_chars is not None:
                check_string_sizes(record, rid, max_chars)
            new_pairs = normalise_record(record, rid)
            key = json.dumps(record, sort_keys=True, default=str)
            if key in seen:
                raise RecordError(rid, "<record>", f"duplicate of record {seen[key]}")
            seen[key] = rid
            pairs.extend(new_pairs)
        except RecordError as err:
            if not skip_invalid:
                raise
            errors.append(err)
    if not pairs:
        raise RecordError(
            "-", "dataset", "no usable preference records" + (f" ({len(errors)} invalid)" if errors else "")
        )
    return pairs, errors


def read_jsonl(lines: Iterable[str]) -> list[Any]:
    """Parse JSON Lines; a line that is not JSON is an error naming its line number."""
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise RecordError(f"line {number}", "<json>", f"not valid JSON: {err.msg}") from None
    return out


def write_jsonl(records: Sequence[Any], path: str | Path) -> Path:
    """Records as JSON Lines (a file load_records_file reads back)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")
    return path


RECORD_FILES = (".jsonl", ".json", ".parquet")


def _json_value(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def load_records_file(path: str) -> list[Any]:
    """Records from a .jsonl file (one per line), a .json file (a list) or a .parquet file (a
    row each, as HuggingFace datasets write them; nested columns hold the message lists).
    Errors name the file, not where it lies: they reach callers, who must not see server paths."""
    name = Path(path).name
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as err:  # pyarrow's errors have no common base
            said = str(err).replace(str(Path(path).resolve()), name).replace(path, name)
            raise RecordError("-", "<file>", f"{name}: not a readable Parquet file: {said}") from None
        # a column only some rows use is null in the others: such a row has no such field; values
        # JSON cannot hold (a timestamp column such as createdAt) become their ISO or text form
        rows = json.loads(json.dumps(rows, default=_json_value))
        return [{key: value for key, value in row.items() if value is not None} for row in rows]
    with open(path, encoding="utf-8") as fh:
        if path.endswith(".jsonl"):
            return read_jsonl(fh)
        data = json.load(fh)
    if not isinstance(data, list):
        raise RecordError("-", "<file>", f"{name}: expected a JSON list of records, got {_type_name(data)}")
    return data
