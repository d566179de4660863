"""Chunked fp32 log-probs equal the naive full log-softmax computation."""

import pytest
import torch

from training.batching import IGNORE
from training.logprobs import naive_sequence_logps, sequence_logps


def random_batch(n=6, t=17, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, t, v, generator=g) * 3
    labels = torch.randint(0, v, (n, t), generator=g)
    for row in range(n):  # a prompt of varying length, then response, then padding
        prompt, end = 2 + row, t - row
        labels[row, :prompt] = IGNORE
        labels[row, end:] = IGNORE
    return logits, labels


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
@pytest.mark.parametrize("average", [False, True])
def test_chunked_equals_naive(chunk, average):
    logits, labels = random_batch()
    got, counts = sequence_logps(logits, labels, average=average, chunk_size=chunk)
    want = naive_sequence_logps(logits, labels, average=average)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert counts.tolist() == (labels[:, 1:] != IGNORE).sum(-1).float().tolist()


def test_bf16_logits_are_scored_in_fp32():
    logits, labels = random_batch()
    got, _ = sequence_logps(logits.bfloat16(), labels, chunk_size=5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, naive_sequence_logps(logits.bfloat16(), labels), atol=1e-5, rtol=0)


def test_gradients_match_naive():
    logits, labels = random_batch()
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    sequence_logps(a, labels, chunk_size=5)[0].sum().backward()
    naive_sequence_logps(b, labels).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=0)


def test_model_logps_on_the_tiny_model(tiny_model_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from training.batching import collate
    from training.logprobs import model_logps
    from training.records import PreferencePair
    from training.tokenize import tokenize_pairs

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    pairs = [
        PreferencePair(prompt=f"Question {i}?", chosen="Yes, glad to help." * (i + 1), rejected="No.") for i in range(3)
    ]
    batch = collate(tokenize_pairs(tokenizer, pairs, 128, 64, "keep_end"), tokenizer.pad_token_id)
    with torch.no_grad():
        chosen, rejected, counts = model_logps(model, batch, chunk_size=8)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    naive = naive_sequence_logps(logits, batch["labels"])
    # two forward passes: sums of ~200 in fp32 agree to a few ulps (1 ulp = 1.5e-5 there)
    torch.testing.assert_close(torch.cat([chosen, rejected]), naive, atol=1e-5, rtol=1e-6)
    assert (chosen < 0).all() and counts.tolist() == [
        len(tokenizer("Yes, glad to help." * (i + 1), add_special_tokens=False)["input_ids"]) + 1 for i in range(3)
    ]


@pytest.mark.parametrize("fmt", ["pairs", "chat"])
def test_shared_prefix_rows_equal_separate_sequences(tiny_model_path, tokenizer, fmt):
    """[prompt|chosen|rejected] with the 4D mask gives every response token the log-prob it has in
    its own sequence: values and gradients equal the naive full log-softmax on separate rows."""
    from transformers import AutoModelForCausalLM

    from tools.toy_data import toy_records
    from training.batching import collate, collate_shared_prefix
    from training.logprobs import model_logps
    from training.records import normalise_records
    from training.tokenize import tokenize_pairs

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    pairs, _ = normalise_records(toy_records(5, fmt, seed=1))
    examples = tokenize_pairs(tokenizer, pairs, 128, 64, "keep_end")
    separate = collate(examples, tokenizer.pad_token_id)
    logits = model(input_ids=separate["input_ids"], attention_mask=separate["attention_mask"]).logits
    naive = naive_sequence_logps(logits, separate["labels"])
    naive.sum().backward()
    want_grad = model.model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    chosen, rejected, counts = model_logps(model, collate_shared_prefix(examples, tokenizer.pad_token_id), chunk_size=7)
    # A different layout changes matmul rounding: equal to fp32 resolution (sums are ~-230 here).
    torch.testing.assert_close(torch.cat([chosen, rejected]), naive, atol=1e-5, rtol=1e-6)
    torch.cat([chosen, rejected]).sum().backward()
    torch.testing.assert_close(model.model.embed_tokens.weight.grad, want_grad, atol=1e-5, rtol=1e-4)
    assert counts.tolist() == [float(len(e.chosen_ids)) for e in examples]
