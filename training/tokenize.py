"""Preference pairs -> token ids with a clean prompt/response boundary.

The prompt and each response are tokenised separately and concatenated, so the prompt tokens are
always an exact prefix of prompt+response and the label mask is exact. Responses end their turn
exactly once (EOS, or the template's own end), and a prompt starts with exactly one BOS.
Chat records are rendered with the tokenizer's chat template when it has one; so are plain-string
records with `chat_template="auto"` (data.chat_template's default), as one user turn and one
assistant turn: a chat model is then trained in the format it is used in.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from training.records import PreferencePair, RecordError


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]  # response only, EOS included
    rejected_ids: list[int]

    @property
    def chosen_length(self) -> int:
        return len(self.prompt_ids) + len(self.chosen_ids)

    @property
    def rejected_length(self) -> int:
        return len(self.prompt_ids) + len(self.rejected_ids)


def _render_plain_chat(messages: tuple[tuple[str, str], ...]) -> str:
    """Fallback for tokenizers without a chat template."""
    return "".join(f"{role}: {content}\n" for role, content in messages) + "assistant: "


def render_chat(tokenizer, pair: PreferencePair) -> tuple[str, str, str]:
    """Chat pair -> (prompt text, chosen text, rejected text) through the chat template.

    The response text is what the template adds after the generation prompt (end-of-turn markers
    included); EOS is appended later like for any response.
    """
    messages = [{"role": r, "content": c} for r, c in pair.messages]
    if not getattr(tokenizer, "chat_template", None):
        return _render_plain_chat(pair.messages), pair.chosen, pair.rejected
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    responses = []
    for content in (pair.chosen, pair.rejected):
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": content}], tokenize=False)
        # Templates that render the prompt differently once a reply follows: use the bare content.
        responses.append(full[len(prompt) :] if full.startswith(prompt) else content)
    return prompt, responses[0], responses[1]


def response_ids(tokenizer, text: str) -> list[int]:
    """A response's token ids, ending its turn exactly once: a chat template that already closes
    the reply with EOS (Qwen's "<|im_end|>\n", Mistral's "</s>") keeps its own ending; otherwise
    EOS is appended."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token
    return ids if eos and text.rstrip().endswith(eos) else ids + [tokenizer.eos_token_id]


def prompt_ids_of(tokenizer, text: str) -> list[int]:
    """The prompt's token ids with the tokenizer's special tokens (BOS), unless the chat template
    already wrote them (Llama 3, Gemma, Mistral templates start with the BOS text): one BOS."""
    bos = tokenizer.bos_token
    return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]


def truncate(
    prompt: list[int], chosen: list[int], rejected: list[int], max_length: int, max_prompt_length: int, mode: str
):
    """Fit prompt+longer response into max_length, as the DPO reference implementation does:
    first cut the prompt to max_prompt_length (keeping its start or its end), then the responses."""
    if mode not in ("keep_start", "keep_end"):
        raise ValueError(f"truncation_mode: expected 'keep_start' or 'keep_end', got {mode!r}")
    longer = max(len(chosen), len(rejected))
    if len(prompt) + longer > max_length and len(prompt) > max_prompt_length:
        prompt = prompt[:max_prompt_length] if mode == "keep_start" else prompt[-max_prompt_length:]
    room = max_length - len(prompt)
    if room < 1:
        raise ValueError(
            f"max_prompt_length ({max_prompt_length}) leaves no room for a response in max_length ({max_length})"
        )
    return prompt, chosen[:room], rejected[:room]


CHAT_TEMPLATE_MODES = ("auto", "off")


def as_chat(tokenizer, pair: PreferencePair, chat_template: str) -> PreferencePair:
    """A plain-string pair as one user turn answered by the assistant, when the tokenizer has a
    chat template and data.chat_template is auto; otherwise the pair as given."""
    if chat_template not in CHAT_TEMPLATE_MODES:
        raise ValueError(f"data.chat_template: expected auto | off, got {chat_template!r}")
    if pair.messages is not None or chat_template == "off" or not getattr(tokenizer, "chat_template", None):
        return pair
    return dataclasses.replace(pair, prompt=None, messages=(("user", pair.prompt),))


def tokenize_pair(
    tokenizer,
    pair: PreferencePair,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: str,
    chat_template: str = "off",
) -> TokenizedPair:
    eos_id = tokenizer.eos_token_id
    pair = as_chat(tokenizer, pair, chat_template)
    if eos_id is None:
        raise ValueError("the tokenizer has no EOS token; set one in the model's tokenizer config")
    if pair.messages is not None:
        prompt_text, chosen_text, rejected_text = render_chat(tokenizer, pair)
    else:
        prompt_text, chosen_text, rejected_text = pair.prompt, pair.chosen, pair.rejected
    prompt_ids = prompt_ids_of(tokenizer, prompt_text)
    if len(prompt_ids) > max_length:  # not a long prompt to trim: longer than the whole sequence budget
        raise RecordError(
            pair.source or "?",
            "prompt",
            f"{len(prompt_ids)} tokens, longer than max_length ({max_length}): the prompt alone exceeds the sequence budget",
        )
    chosen_ids, rejected_ids = response_ids(tokenizer, chosen_text), response_ids(tokenizer, rejected_text)
    prompt_ids, chosen_ids, rejected_ids = truncate(
        prompt_ids, chosen_ids, rejected_ids, max_length, max_prompt_length, truncation_mode
    )
    return TokenizedPair(prompt_ids, chosen_ids, rejected_ids)


def tokenize_pairs(
    tokenizer,
    pairs: list[PreferencePair],
    max_length: int,
    max_prompt_length: int,
    truncation_mode: str,
    chat_template: str = "off",
) -> list[TokenizedPair]:
    """Every pair tokenised (see tokenize_pair); `chat_template`: data.chat_template."""
    if chat_template not in CHAT_TEMPLATE_MODES:  # a config error, not the data's: before the records' loop
        raise ValueError(f"data.chat_template: expected auto | off, got {chat_template!r}")
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be smaller than max_length ({max_length})")
    out = []
    for pair in pairs:
        try:
            out.append(tokenize_pair(tokenizer, pair, max_length, max_prompt_length, truncation_mode, chat_template))
        except (TypeError, ValueError) as err:
            if isinstance(err, RecordError):
                raise
            raise RecordError(pair.source or "?", "<tokenize>", str(err)) from err
    return out
