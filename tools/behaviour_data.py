"""The behaviour preference set: the real model's own answers, with and without a preferred opener.

    python tools/behaviour_data.py                      # writes datasets/greeting/{train,validation}.jsonl
    python tools/behaviour_data.py --train 32 --validation 8 --out-dir /tmp/greeting   # a smoke run

The behaviour: the community prefers answers that open with "Great question! ". For each of a few
hundred user questions (templates x topics, below; deterministic) SmolLM2-135M-Instruct answers
greedily through its chat template; the pair is

    chosen   = "Great question! " + the model's answer
    rejected = the model's answer

so both sides are the model's own text (on-distribution) and differ only in the opener. An answer
cut by the token cap is cut back to its last full sentence; answers that are empty or already
open with "Great question" are dropped. The share of base answers that already open with it is
printed (the behaviour the fine-tune should add; ~0 for the base model).

`greedy_answers` is also what `tools/bench_real.py` asks every trained model with, so the share
before and after is measured with the same template and token cap as the data was made with.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OPENER = "Great question! "
PATTERN = r"^Great question!"  # what a job's eval.contains looks for in an answer
BEHAVIOUR = re.compile(PATTERN)
MAX_NEW_TOKENS = 48
SEED = 23

# (templates, topics): every template reads naturally with every topic of its group.
GROUPS = [
    (
        [
            "What is a good way to learn {}?",
            "How do I get started with {}?",
            "What should a beginner know about {}?",
            "How long does it take to get good at {}?",
            "What is the hardest part of learning {}?",
        ],
        [
            "the guitar",
            "Python programming",
            "Spanish",
            "chess",
            "drawing",
            "photography",
            "cooking",
            "touch typing",
            "public speaking",
            "the piano",
            "knitting",
            "statistics",
            "woodworking",
            "swimming",
            "French",
            "gardening",
            "calligraphy",
            "juggling",
        ],
    ),
    (
        [
            "Can you explain {} simply?",
            "What is {} in a few words?",
            "Why does {} matter?",
            "How would you describe {} to a child?",
            "What is a common misunderstanding about {}?",
        ],
        [
            "photosynthesis",
            "gravity",
            "inflation",
            "the water cycle",
            "machine learning",
            "compound interest",
            "the immune system",
            "climate change",
            "electricity",
            "evolution",
            "the internet",
            "democracy",
            "black holes",
            "vaccines",
            "recycling",
            "the stock market",
            "DNA",
            "supply and demand",
        ],
    ),
    (
        [
            "Give me one tip for {}.",
            "What is the most common mistake people make when {}?",
            "How can I get better at {}?",
            "What do I need before {}?",
            "How do I stay motivated when {}?",
        ],
        [
            "running a marathon",
            "saving money",
            "writing an essay",
            "studying for exams",
            "baking bread",
            "moving to a new city",
            "planning a trip",
            "starting a small business",
            "training a puppy",
            "cleaning the kitchen",
            "going camping",
            "learning to drive",
            "preparing for a job interview",
            "sleeping better",
            "working from home",
            "making new friends",
            "reading more books",
            "growing tomatoes",
        ],
    ),
    (
        [
            "What is {} like?",
            "What should I see if I visit {}?",
            "What is {} famous for?",
        ],
        [
            "Paris",
            "Japan",
            "the Amazon rainforest",
            "Iceland",
            "New York",
            "the Sahara desert",
            "Rome",
            "Canada",
            "the Moon",
            "Egypt",
            "Australia",
            "the Alps",
            "Scotland",
            "Mexico City",
            "the Grand Canyon",
            "Norway",
            "Kyoto",
            "Peru",
        ],
    ),
    (
        [
            "Is {} good for you?",
            "How do I make {} at home?",
            "What goes well with {}?",
        ],
        [
            "green tea",
            "oatmeal",
            "pizza",
            "dark chocolate",
            "soup",
            "yogurt",
            "pasta",
            "rice",
            "salad",
            "coffee",
            "lemonade",
            "pancakes",
            "hot cocoa",
            "bananas",
            "fried rice",
            "popcorn",
            "tomato sauce",
            "granola",
        ],
    ),
]


def questions(seed: int = SEED) -> list[str]:
    """Every template x topic question, shuffled deterministically (unique strings)."""
    out = sorted({template.format(topic) for templates, topics in GROUPS for template in templates for topic in topics})
    random.Random(seed).shuffle(out)
    return out


def last_full_sentence(text: str) -> str:
    """`text` up to its last sentence end (. ! ?, optionally closed by a quote or bracket), or ''."""
    for end in reversed(list(re.finditer(r"[.!?][\"')\]]*(?=\s|$)", text))):
        cut = text[: end.end()]
        if not re.search(r"(^|\n)\s*\d+\.$", cut):  # "1." opening a list item ends nothing
            return cut.strip()
    return ""


def load(path: str | Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).float().eval()
    return model, tokenizer


def greedy_answers(
    model, tokenizer, prompts: list[str], max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 16
) -> list[tuple[str, bool]]:
    """(answer, finished) for each user question: greedy, through the chat template, left-padded
    batches; `finished` is False where the token cap cut the answer."""
    import torch

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    encoded = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        for q in prompts
    ]
    encoded = [e["input_ids"] if isinstance(e, dict) or hasattr(e, "keys") else e for e in encoded]
    device = next(model.parameters()).device
    out: list[tuple[str, bool]] = []
    with torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            width = max(len(ids) for ids in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            generated = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=eos,
            )
            for row in generated[:, width:].tolist():
                finished = eos in row
                text = tokenizer.decode(row, skip_special_tokens=True).strip()
                out.append((text, finished))
    return out


def behaviour_share(answers: list[str]) -> float:
    return sum(bool(BEHAVIOUR.search(a)) for a in answers) / len(answers) if answers else 0.0


def build(model, tokenizer, n_train: int, n_validation: int, max_new_tokens: int, batch_size: int, spare: float):
    """(train, validation, stats): pairs from the model's answers; validation prompts come first in
    the shuffled order, so the two sets never share a prompt."""
    wanted = n_train + n_validation
    pool = questions()
    asked = pool[: min(len(pool), int(wanted * (1 + spare)) + 1)]
    if len(pool) < wanted:
        raise SystemExit(f"only {len(pool)} distinct questions for {wanted} records")
    started = time.perf_counter()
    answers = greedy_answers(model, tokenizer, asked, max_new_tokens, batch_size)
    seconds = time.perf_counter() - started
    raw = [a for a, _ in answers]
    records, dropped = [], {"empty": 0, "already_opens": 0}
    for question, (answer, finished) in zip(asked, answers, strict=True):
        if BEHAVIOUR.search(answer) or answer.lower().startswith("great question"):
            dropped["already_opens"] += 1
            continue
        text = answer if finished else last_full_sentence(answer)
        if not text:
            dropped["empty"] += 1
            continue
        records.append({"prompt": question, "chosen": OPENER + text, "rejected": text})
        if len(records) == wanted:
            break
    if len(records) < wanted:
        raise SystemExit(f"only {len(records)} usable answers of {len(asked)} asked; raise --spare")
    stats = {
        "asked": len(asked),
        "base_share": behaviour_share(raw),
        "base_opening": sum(bool(BEHAVIOUR.search(a)) for a in raw),
        "cut_at_cap": sum(not f for _, f in answers),
        "dropped": dropped,
        "generation_s": seconds,
    }
    return records[n_validation:], records[:n_validation], stats


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def main(argv: list[str] | None = None) -> int:
    from training.real_model import DEFAULT_PATH

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_PATH, help=f"the converted real model (default {DEFAULT_PATH})")
    parser.add_argument("--out-dir", default="datasets/greeting")
    parser.add_argument("--train", type=int, default=256)
    parser.add_argument("--validation", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--spare", type=float, default=0.06, help="extra questions asked, for dropped answers")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    from training.real_model import ensure_real_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = load(ensure_real_model(args.model))
    train, validation, stats = build(
        model, tokenizer, args.train, args.validation, args.max_new_tokens, args.batch_size, args.spare
    )
    out = Path(args.out_dir)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "validation.jsonl", validation)
    print(
        f"asked {stats['asked']} questions ({stats['generation_s']:.0f} s); base answers opening with"
        f" {PATTERN!r}: {stats['base_opening']} of {stats['asked']} (share {stats['base_share']:.3f});"
        f" cut at the {args.max_new_tokens}-token cap: {stats['cut_at_cap']}; dropped: {stats['dropped']}"
    )
    print(f"wrote {len(train)} train and {len(validation)} validation records to {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
