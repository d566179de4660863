"""Preference tasks generated in code, for judging what a trainer learns.

Each task returns pair records {"prompt", "chosen", "rejected"}. In the content tasks chosen and
rejected come from one template and draw their variable part from the same pool, so every word
is as often preferred as not and neither side is longer on purpose: only the relation between
the answer and the prompt tells them apart (tools/bench_learning.py reports how far a
length-only guess gets, which should be ~0.5).

  style       the politeness toy (tools/toy_data.py): chosen polite, rejected rude (a surface cue)
  fact        the prompt states who has which colour; the chosen answer repeats the asked-about
              fact, the rejected one gives another colour (one that is in the prompt half the time)
  arithmetic  "what is a plus b": the chosen answer has the right sum, the rejected one the sum of
              another problem
  constraint  "name an animal that starts with the letter X": the chosen animal does, the rejected
              one starts with another letter
"""

from __future__ import annotations

import random
from collections.abc import Callable

NAMES = "Ann Ben Cal Dan Eve Fay Gus Hal Ivy Jon Kim Lou Max Ned Oli Pam".split()
OBJECTS = "key cup hat box pen bag car map".split()
COLOURS = "red blue green black white pink brown grey".split()
ANIMALS = {
    "b": ["bear", "bat"],
    "c": ["cat", "cow"],
    "d": ["dog", "duck"],
    "f": ["fox", "frog"],
    "g": ["goat", "goose"],
    "h": ["hen", "horse"],
    "m": ["mouse", "mole"],
    "p": ["pig", "panda"],
}


def fact_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        people = rng.sample(NAMES, 2)
        colours = rng.sample(COLOURS, 3)
        obj = rng.choice(OBJECTS)
        asked = rng.randrange(2)
        prompt = (
            f"{people[0]} has a {colours[0]} {obj}. {people[1]} has a {colours[1]} {obj}. "
            f"What colour is the {obj} of {people[asked]}?"
        )
        # the wrong colour: the other person's (in the prompt) or one not mentioned, half and half
        wrong = colours[1 - asked] if rng.random() < 0.5 else colours[2]
        answer = "The {obj} of {who} is {colour}."
        out.append(
            {
                "prompt": prompt,
                "chosen": answer.format(obj=obj, who=people[asked], colour=colours[asked]),
                "rejected": answer.format(obj=obj, who=people[asked], colour=wrong),
            }
        )
    return out


def arithmetic_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        wrong = a + b
        while wrong == a + b:  # the sum of another problem: wrong answers look like right ones
            wrong = rng.randrange(10) + rng.randrange(10)
        prompt = rng.choice(["What is {a} plus {b}?", "Please add {a} and {b}.", "Compute {a} + {b}."])
        answer = "{a} plus {b} is {s}."
        out.append(
            {
                "prompt": prompt.format(a=a, b=b),
                "chosen": answer.format(a=a, b=b, s=a + b),
                "rejected": answer.format(a=a, b=b, s=wrong),
            }
        )
    return out


def constraint_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    letters = sorted(ANIMALS)
    out = []
    for _ in range(n):
        letter, other = rng.sample(letters, 2)
        prompt = rng.choice(
            [
                "Name an animal that starts with the letter {x}.",
                "Give me one animal whose name begins with {x}.",
                "Which animal starts with {x}? Answer with one.",
            ]
        )
        answer = rng.choice(["I pick the {a}.", "My answer is the {a}.", "The {a}."])
        out.append(
            {
                "prompt": prompt.format(x=letter.upper()),
                "chosen": answer.format(a=rng.choice(ANIMALS[letter])),
                "rejected": answer.format(a=rng.choice(ANIMALS[other])),
            }
        )
    return out


def style_records(n: int, seed: int) -> list[dict]:
    from tools.toy_data import toy_records

    return toy_records(n, "pairs", seed)


TASKS: dict[str, Callable[[int, int], list[dict]]] = {
    "style": style_records,
    "fact": fact_records,
    "arithmetic": arithmetic_records,
    "constraint": constraint_records,
}
CONTENT_TASKS = ("fact", "arithmetic", "constraint")


def task_split(task: str, n_train: int, n_heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Disjoint train and held-out records of one task (no held-out prompt+answers in train)."""
    records, seen = [], set()
    rng_seed = seed
    while len(records) < n_train + n_heldout:
        for record in TASKS[task](n_train + n_heldout, rng_seed):
            key = (record["prompt"], record["chosen"], record["rejected"])
            if key not in seen:
                seen.add(key)
                records.append(record)
        rng_seed += 1000
    records = records[: n_train + n_heldout]
    return records[:n_train], records[n_train:]
