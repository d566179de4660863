"""Chat templates of the model families render prompt and responses right: the prompt ends with
the generation prompt, prompt + response is exactly the template's whole conversation, a prompt
has one BOS, and a response ends its turn exactly once.

The templates are the families' published ones, written out here (no download); the tokenizer is
the tiny BPE one with each family's special tokens added.
"""

from __future__ import annotations

import pytest
from tokenizers import processors

from training.records import PreferencePair
from training.tiny_model import build_tokenizer
from training.tokenize import render_chat, tokenize_pair

CHATML_QWEN = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3 = (
    "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)
ZEPHYR = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n'  + message['content'] + eos_token }}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}{% endfor %}"
)
# family -> (template, bos (None: the family has none), eos, the tokenizer adds BOS itself, special tokens)
FAMILIES = {
    "qwen2.5": (CHATML_QWEN, None, "<|im_end|>", False, ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", True, ["<|start_header_id|>", "<|end_header_id|>"]),
    "gemma": (GEMMA, "<bos>", "<eos>", True, ["<start_of_turn>", "<end_of_turn>"]),
    "mistral": (MISTRAL, "<s>", "</s>", True, ["[INST]", "[/INST]"]),
    "phi3": (PHI3, "<s>", "<|endoftext|>", True, ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]),
    "zephyr": (ZEPHYR, "<s>", "</s>", True, ["<|user|>", "<|assistant|>", "<|system|>"]),
}


def family_tokenizer(name: str):
    template, bos, eos, adds_bos, specials = FAMILIES[name]
    tokenizer = build_tokenizer()
    extra = [t for t in [*specials, bos, eos] if t and t not in tokenizer.get_vocab()]
    tokenizer.add_special_tokens({"additional_special_tokens": extra})
    tokenizer.bos_token, tokenizer.eos_token = bos, eos
    backend = tokenizer.backend_tokenizer
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tokenizer.convert_tokens_to_ids(bos))]
        )
    else:
        backend.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    tokenizer.chat_template = template
    return tokenizer


def conversation(name: str) -> tuple[tuple[str, str], ...]:
    turns = [("user", "What is two plus two?"), ("assistant", "Four."), ("user", "And three plus three?")]
    system = (
        [] if name in ("gemma", "mistral") else [("system", "Answer briefly.")]
    )  # their templates have no system turn
    return tuple(system + turns)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_chat_template_renders_prompt_and_responses(name):
    tokenizer = family_tokenizer(name)
    pair = PreferencePair(prompt=None, chosen="Six.", rejected="Seven.", messages=conversation(name), source="r1")
    prompt, chosen, rejected = render_chat(tokenizer, pair)
    messages = [{"role": r, "content": c} for r, c in pair.messages]
    for reply, text in (("Six.", chosen), ("Seven.", rejected)):
        whole = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": reply}], tokenize=False)
        assert prompt + text == whole
        assert reply in text

    tokens = tokenize_pair(tokenizer, pair, 512, 256, "keep_end")
    bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    if FAMILIES[name][1] is not None:
        assert tokens.prompt_ids[0] == bos_id and tokens.prompt_ids.count(bos_id) == 1  # one BOS, never two
    assert tokenizer.decode(tokens.prompt_ids, skip_special_tokens=False).endswith(prompt[-10:])
    for ids, text in ((tokens.chosen_ids, chosen), (tokens.rejected_ids, rejected)):
        assert ids.count(eos_id) == 1, f"{name}: the reply must end its turn once: {tokenizer.decode(ids)!r}"
        assert tokenizer.decode([i for i in ids if i != eos_id]).strip() in text
        # prompt + response tokens are the whole conversation's tokens (EOS added where the template has none)
        whole = tokenizer(
            prompt + text, add_special_tokens=not (tokenizer.bos_token and prompt.startswith(tokenizer.bos_token))
        )
        expected = whole["input_ids"] + ([] if text.rstrip().endswith(tokenizer.eos_token) else [eos_id])
        assert tokens.prompt_ids + ids == expected
