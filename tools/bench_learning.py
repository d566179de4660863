"""What our trainer learns, against TRL's DPOTrainer: same model, data and hyper-parameters, many seeds.

    python tools/bench_learning.py            # suites "matched" and "learnable" (~1.5 h on 2 cores)
    python tools/bench_learning.py --quick    # smoke check: style + fact, full only, 2 seeds (~3 min)

Tasks (tools/learning_tasks.py): `style` (the politeness toy, a surface cue) and three content
tasks where chosen and rejected share template, style and length and differ only in whether the
answer agrees with the prompt (`fact`, `arithmetic`, `constraint`). Suites (SUITES) fix tasks,
modes (full fine-tuning, LoRA), seeds and the budget. For every seed the data (train and held-out)
is drawn anew and the model is a new random initialisation of MODEL's shape (with the tiny
tokenizer); the training seed is the same seed, and ours and TRL start from the same weights. One
subprocess per (suite, task, mode, trainer) runs all the seeds; `--jobs` of them run at once.

Held-out reward accuracy and margin come from an evaluator independent of both trainers: plain
`model(input_ids).logits` on separate prompt+response rows (prompt tokens, then the response's,
then EOS), summed response log-probs of the trained policy minus those of the initial model.
Reported per task and mode: mean and standard deviation over seeds, the difference ours - TRL,
and what a length-only guess gets (~0.5 on the content tasks: length tells nothing). Results:
bench-results/learning.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.learning_tasks import CONTENT_TASKS, TASKS, task_split  # noqa: E402

# ~4.4M parameters: small enough for 80 runs on 2 CPU cores, large enough to learn the content tasks.
MODEL = {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 1024, "vocab_size": 384}
# gradient checkpointing: the same for both trainers, given to each explicitly (TRL's default is on)
HYPER = {"beta": 0.1, "batch_size": 8, "max_length": 128, "warmup": 10, "lora_r": 16, "gradient_checkpointing": False}
HELDOUT = 128
SUITES = {
    # every task, both modes, at a budget where the content tasks are only partly learnt: the
    # comparison with TRL (where a trainer that learns style but not content would fall behind)
    "matched": {
        "tasks": list(TASKS),
        "modes": ["full", "lora"],
        "seeds": 5,
        "pairs": 512,
        "epochs": 2,
        "lr": {"full": 5e-4, "lora": 2e-3},
    },
    # one content task at a budget and learning rate where it is learnt (>= 0.85 held out)
    "learnable": {
        "tasks": ["constraint"],
        "modes": ["full"],
        "seeds": 5,
        "pairs": 1024,
        "epochs": 3,
        "lr": {"full": 1e-3},
    },
    # a smoke check in a few minutes
    "quick": {
        "tasks": ["style", "fact"],
        "modes": ["full"],
        "seeds": 2,
        "pairs": 128,
        "epochs": 1,
        "lr": {"full": 5e-4},
    },
}


def model_for_seed(seed: int) -> Path:
    """A new random initialisation of MODEL per seed (the tokenizer is the same for all)."""
    from training.tiny_model import ensure_tiny_model

    return ensure_tiny_model(REPO / ".cache" / "models" / f"learning-s{seed}", seed=seed, **MODEL)


# -- the evaluator (independent of both trainers) ----------------------------------------------
def response_logps(model, tokenizer, records: list[dict], side: str, device: str, rows: int = 32):
    """Summed log-probs of record[side] given record["prompt"], one plain forward per row batch."""
    import torch

    seqs, starts = [], []
    for r in records:
        prompt = tokenizer(r["prompt"])["input_ids"]
        response = tokenizer(r[side], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(prompt + response)
        starts.append(len(prompt))
    out = []
    for i in range(0, len(seqs), rows):
        chunk, first = seqs[i : i + rows], starts[i : i + rows]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, s in enumerate(chunk):
            ids[row, : len(s)], mask[row, : len(s)] = torch.tensor(s), 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(device))[..., 0].cpu()
        for row, s in enumerate(chunk):
            out.append(float(logp[row, first[row] - 1 : len(s) - 1].sum()))
    return out


def heldout_scores(base_path: Path, trained: Path, lora: bool, heldout: list, beta: float, device: str) -> dict:
    """Reward accuracy and mean margin of the trained policy against the initial model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    reference = AutoModelForCausalLM.from_pretrained(base_path).float().to(device).eval()
    if lora:
        from peft import PeftModel

        policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), trained)
    else:
        policy = AutoModelForCausalLM.from_pretrained(trained)
    policy = policy.float().to(device).eval()
    logps = {
        (who, side): response_logps(model, tokenizer, heldout, side, device)
        for who, model in (("policy", policy), ("reference", reference))
        for side in ("chosen", "rejected")
    }
    margins = [
        beta * ((pc - rc) - (pr - rr))
        for pc, rc, pr, rr in zip(
            logps["policy", "chosen"],
            logps["reference", "chosen"],
            logps["policy", "rejected"],
            logps["reference", "rejected"],
            strict=True,
        )
    ]
    return {"accuracy": sum(m > 0 for m in margins) / len(margins), "margin": statistics.fmean(margins)}


def length_guess_accuracy(base_path: Path, heldout: list) -> float:
    """Accuracy of 'the longer answer (in tokens) is preferred', ties counted half: ~0.5 means
    length tells nothing."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_path)
    score = 0.0
    for r in heldout:
        c, j = len(tok(r["chosen"])["input_ids"]), len(tok(r["rejected"])["input_ids"])
        score += 1.0 if c > j else 0.5 if c == j else 0.0
    return score / len(heldout)


# -- one (trainer, task, mode) group of seeds, in its own process --------------------------------
def worker(spec_path: Path, threads: int) -> int:
    import torch

    from tools.bench import run_ours, run_trl

    torch.set_num_threads(threads)
    spec = json.loads(spec_path.read_text())
    lora = spec["mode"] == "lora"
    for run in spec["runs"]:
        out = Path(spec["workdir"]) / f"{spec['trainer']}-{spec['task']}-{spec['mode']}-s{run['seed']}"
        hyper = {**spec["hyper"], "seed": run["seed"]}
        started = time.perf_counter()
        try:
            if spec["trainer"] == "ours":
                run_ours(Path(run["model"]), run["train"], lora, out, spec["device"], hyper)
            else:
                run_trl(Path(run["model"]), run["train"], lora, out, False, spec["device"], hyper)
            wall = time.perf_counter() - started
            scores = heldout_scores(Path(run["model"]), out, lora, run["heldout"], hyper["beta"], spec["device"])
        finally:
            shutil.rmtree(out, ignore_errors=True)
        print("@learn " + json.dumps({"seed": run["seed"], "wall_s": wall, **scores}), flush=True)
    return 0


def run_group(trainer: str, task: str, mode: str, runs: list, hyper: dict, args) -> list[dict]:
    workdir = REPO / ".cache" / "bench-learning"
    workdir.mkdir(parents=True, exist_ok=True)
    spec = workdir / f"{trainer}-{task}-{mode}-{time.time_ns()}.json"
    spec.write_text(
        json.dumps(
            {
                "trainer": trainer,
                "task": task,
                "mode": mode,
                "runs": runs,
                "hyper": hyper,
                "device": args.device,
                "workdir": str(workdir),
            }
        )
    )
    from tools.bench import worker_env

    cmd = [sys.executable, __file__, "--worker", str(spec), "--threads", str(args.threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(args.threads), cwd=REPO)
    finally:
        spec.unlink(missing_ok=True)
    results = [json.loads(line[len("@learn ") :]) for line in proc.stdout.splitlines() if line.startswith("@learn ")]
    if proc.returncode != 0 or len(results) != len(runs):
        raise RuntimeError(f"{trainer} {task} {mode} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return results


def spread(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "runs": [round(v, 4) for v in values],
    }


def paired_difference(ours: list[float], trl: list[float]) -> dict:
    """Ours - TRL, seed by seed (same data and initial weights), and the standard error of its
    mean: a gap within ~2 standard errors is what seed-to-seed noise alone gives."""
    diffs = [o - t for o, t in zip(ours, trl, strict=True)]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return {"mean": statistics.fmean(diffs), "se": se, "runs": [round(d, 4) for d in diffs]}


def add_difference(per_trainer: dict) -> None:
    """per_trainer["diff"]: ours - TRL for accuracy and margin, once both have run."""
    if {"ours", "trl"} <= set(per_trainer):
        per_trainer["diff"] = {
            key: paired_difference(per_trainer["ours"][key]["runs"], per_trainer["trl"][key]["runs"])
            for key in ("accuracy", "margin")
        }


def pooled(files: list[dict]) -> dict:
    """Results files of the same suites run on other seeds (--first-seed), as one: each
    (suite, task, mode, trainer) gets the runs of every file, in file order."""
    results = files[0]
    for other in files[1:]:
        for name, suite in other["suites"].items():
            mine = results["suites"].setdefault(name, {"settings": suite["settings"], "tasks": {}})
            for task, entry in suite["tasks"].items():
                for mode in ("full", "lora"):
                    for trainer, got in entry.get(mode, {}).items():
                        if trainer == "diff":
                            continue  # recomputed below from the pooled runs
                        task_entry = mine["tasks"].setdefault(
                            task, {"length_guess_accuracy": entry["length_guess_accuracy"]}
                        )
                        mode_entry = task_entry.setdefault(mode, {})
                        if trainer in mode_entry:
                            kept = mode_entry[trainer]
                            for key in ("accuracy", "margin", "wall_s"):
                                kept[key] = spread(kept[key]["runs"] + got[key]["runs"])
                        else:
                            mode_entry[trainer] = got
    for suite in results["suites"].values():
        for entry in suite["tasks"].values():
            for mode in ("full", "lora"):
                add_difference(entry.get(mode, {}))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the quick suite: a smoke check in a few minutes")
    parser.add_argument("--suites", default="matched,learnable", help=f"comma-separated subset of {list(SUITES)}")
    parser.add_argument("--tasks", default=None, help=f"override every suite's tasks (some of {list(TASKS)})")
    parser.add_argument("--modes", default=None, help="override every suite's modes (some of full,lora)")
    parser.add_argument("--seeds", type=int, default=None, help="override: seeds 0..N-1")
    parser.add_argument("--pairs", type=int, default=None, help="override: training pairs")
    parser.add_argument("--epochs", type=int, default=None, help="override: epochs")
    parser.add_argument("--lr", type=float, default=None, help="override: learning rate for every mode")
    parser.add_argument("--trainers", default="ours,trl", help="comma-separated subset of ours,trl")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker process")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes at once (threads x jobs <= cores)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--out", default="bench-results/learning.json")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first..first+N-1 (to add seeds to a run)")
    parser.add_argument(
        "--report", nargs="+", default=None, help="print the table of earlier results files (seeds pooled) and exit"
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(Path(args.worker), args.threads)
    if args.report:
        print_table(pooled([json.loads(Path(path).read_text()) for path in args.report]))
        return 0

    suites = {}
    for name in ["quick"] if args.quick else args.suites.split(","):
        if name not in SUITES:
            parser.error(f"--suites: unknown suite {name!r}; expected some of {list(SUITES)}")
        suite = dict(SUITES[name])
        for key in ("tasks", "modes"):
            if getattr(args, key):
                suite[key] = getattr(args, key).split(",")
        for key in ("seeds", "pairs", "epochs"):
            if getattr(args, key):
                suite[key] = getattr(args, key)
        if args.lr:
            suite["lr"] = {mode: args.lr for mode in suite["modes"]}
        unknown = [t for t in suite["tasks"] if t not in TASKS]
        if unknown:
            parser.error(f"--tasks: unknown task {unknown[0]!r}; expected some of {list(TASKS)}")
        suites[name] = suite
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {
        "meta": {
            "heldout": HELDOUT,
            "hyper": HYPER,
            "model": MODEL,
            "threads": args.threads,
            "jobs": args.jobs,
            "device": args.device,
            "evaluator": "plain forward, separate rows, policy vs initial model",
            "first_seed": args.first_seed,
        },
        "suites": {name: {"settings": suite, "tasks": {}} for name, suite in suites.items()},
    }
    started = time.perf_counter()
    groups = []  # (suite, task, mode, trainer, runs): one worker process each
    for name, suite in suites.items():
        for task in suite["tasks"]:
            seeds = range(args.first_seed, args.first_seed + suite["seeds"])
            data = {seed: task_split(task, suite["pairs"], HELDOUT, seed) for seed in seeds}
            models = {seed: model_for_seed(seed) for seed in data}
            runs = [{"seed": s, "model": str(models[s]), "train": data[s][0], "heldout": data[s][1]} for s in data]
            guess = statistics.fmean(length_guess_accuracy(models[args.first_seed], data[s][1]) for s in data)
            results["suites"][name]["tasks"][task] = {"length_guess_accuracy": guess}
            groups += [(name, task, mode, t, runs) for mode in suite["modes"] for t in args.trainers.split(",")]

    def run(group) -> None:
        name, task, mode, trainer, runs = group
        suite = suites[name]
        hyper = {**HYPER, "epochs": suite["epochs"], "lr": suite["lr"][mode]}
        got = run_group(trainer, task, mode, runs, hyper, args)
        summary = {key: spread([r[key] for r in got]) for key in ("accuracy", "margin", "wall_s")}
        with lock:
            per_trainer = results["suites"][name]["tasks"][task].setdefault(mode, {})
            per_trainer[trainer] = summary
            add_difference(per_trainer)
            out.write_text(json.dumps(results, indent=2))  # after each group: a cut-off run keeps what it finished
            acc = summary["accuracy"]
            print(
                f"  {name:9s} {task:10s} {mode:4s} {trainer:4s} acc {acc['mean']:.3f} +- {acc['std']:.3f}"
                f"  runs {acc['runs']}  ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )

    lock = threading.Lock()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # threads that each wait on a subprocess
        list(pool.map(run, groups))
    results["meta"]["wall_s"] = time.perf_counter() - started
    out.write_text(json.dumps(results, indent=2))
    print_table(results)
    print(f"results: {out}")
    return 0


def print_table(results: dict) -> None:
    for name, suite in results["suites"].items():
        st = suite["settings"]
        print(
            f"\n{name}: held-out reward accuracy and margin, mean +- std over n seeds "
            f"({st['pairs']} pairs, {st['epochs']} epochs, lr {st['lr']})"
        )
        print(
            f"{'task':11s} {'mode':5s} {'n':>2s} {'ours acc':>15s} {'trl acc':>15s} {'diff (se)':>16s} "
            f"{'ours margin':>12s} {'trl margin':>12s} {'len guess':>9s}"
        )
        for task, entry in suite["tasks"].items():
            for mode in st["modes"]:
                if "diff" not in entry.get(mode, {}):
                    continue  # only one trainer ran
                o, t, d = entry[mode]["ours"], entry[mode]["trl"], entry[mode]["diff"]["accuracy"]
                print(
                    f"{task:11s} {mode:5s} {len(d['runs']):2d} {o['accuracy']['mean']:7.3f} +- {o['accuracy']['std']:.3f} "
                    f"{t['accuracy']['mean']:7.3f} +- {t['accuracy']['std']:.3f} {d['mean']:+8.3f} ({d['se']:.3f}) "
                    f"{o['margin']['mean']:12.3f} {t['margin']['mean']:12.3f} {entry['length_guess_accuracy']:9.3f}"
                )
    print(f"content tasks: {', '.join(CONTENT_TASKS)}")


if __name__ == "__main__":
    sys.exit(main())
