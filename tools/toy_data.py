"""Generate a learnable toy preference set in any of the three accepted formats.

The rule a tiny model can learn: the chosen answer is polite and helpful, the rejected one rude.
Prompts and answers come from templates over many topics, so a held-out split still measures the
rule rather than memorised records.

    python tools/toy_data.py --format pairs --n 256 --out .cache/toy/pairs.jsonl
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.records import write_jsonl  # noqa: E402

TOPICS = [
    "python code",
    "a cake recipe",
    "the weather",
    "my garden",
    "travel plans",
    "music theory",
    "a math question",
    "world history",
    "science homework",
    "a book report",
    "my email",
    "a job interview",
    "learning french",
    "a birthday party",
    "fixing my bike",
    "saving money",
    "a cover letter",
    "my houseplants",
    "a chess opening",
    "running a marathon",
    "baking bread",
    "a poem",
    "the solar system",
    "a road trip",
    "my resume",
    "cleaning the kitchen",
    "a science fair",
    "a dog walk",
    "painting a room",
    "a camping trip",
    "a short story",
]
ASKS = [
    "Can you help me with {t}?",
    "Please explain {t}.",
    "I have a question about {t}.",
    "What do you know about {t}?",
    "Could you describe {t} for me?",
]
POLITE = [
    "Of course! I would be glad to help with {t}. Thank you for asking.",
    "Certainly, happy to help with {t}. Thanks for the question!",
    "Sure, here is a kind answer about {t}. Thank you!",
    "Thank you for asking about {t}. I am glad to help.",
]
RUDE = [
    "No. Figure out {t} yourself.",
    "Whatever. Do not bother me with {t}.",
    "That is a stupid question about {t}. Leave me alone.",
    "No way. {t} is your problem, not mine.",
]
FORMATS = ("pairs", "ranked", "chat")


def toy_records(n: int = 256, fmt: str = "pairs", seed: int = 0) -> list[dict]:
    if fmt not in FORMATS:
        raise ValueError(f"format: expected one of {FORMATS}, got {fmt!r}")
    rng = random.Random(seed)
    combinations = len(TOPICS) * len(ASKS) * len(POLITE) * len(RUDE)
    if n > combinations:
        raise ValueError(f"n: at most {combinations} distinct toy records, got {n}")
    out, seen = [], set()
    while len(out) < n:
        t = rng.choice(TOPICS)
        prompt = rng.choice(ASKS).format(t=t)
        good, bad = rng.choice(POLITE).format(t=t), rng.choice(RUDE).format(t=t)
        bad = bad[0].upper() + bad[1:]
        if (prompt, good, bad) in seen:  # duplicates are refused by the service: draw again
            continue
        seen.add((prompt, good, bad))
        if fmt == "pairs":
            out.append({"prompt": prompt, "chosen": good, "rejected": bad})
        elif fmt == "ranked":
            responses = [good, bad] if rng.random() < 0.5 else [bad, good]
            out.append(
                {
                    "prompt": prompt,
                    "responses": responses,
                    "pairs": [[responses.index(good), responses.index(bad)]],
                    "sft_target": good,
                }
            )
        else:
            out.append(
                {
                    "input": {"messages": [{"role": "user", "content": prompt}]},
                    "preferred_output": [{"role": "assistant", "content": good}],
                    "non_preferred_output": [{"role": "assistant", "content": bad}],
                }
            )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", choices=FORMATS + ("all",), default="all")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=".cache/toy")
    args = parser.parse_args(argv)
    for fmt in FORMATS if args.format == "all" else (args.format,):
        path = write_jsonl(toy_records(args.n, fmt, args.seed), Path(args.out_dir) / f"{fmt}.jsonl")
        print(f"wrote {args.n} {fmt} records to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
