"""Our trainer against TRL's DPOTrainer, side by side, same model, data and hyper-parameters.

    python tools/bench.py            # full: 512 pairs, 4 configurations, 2 interleaved repeats
    python tools/bench.py --quick    # smoke check in ~5 minutes

For each configuration (20M Llama-style model with vocab 384 or 32,000; full fine-tuning or
LoRA r16) it runs, interleaved (A B C A B C ...), each in a fresh subprocess:
  ours           our trainer, defaults (reference log-probs precomputed, shared prefix, grouping,
                 passes of <= model.max_forward_tokens tokens; on a GPU one pass a step)
  trl            TRL's DPOTrainer, defaults (live reference: a copy, or LoRA adapters disabled)
  trl-precompute TRL with precompute_ref_log_probs=True (its fastest configuration)
and records job wall time (model load to saved weights, reference work included), tokens/s
(non-pad chosen+rejected tokens trained / wall), peak RSS, final train loss, held-out reward
accuracy (the same evaluator, our log-prob code, for every run), and useful GFLOP/s against a
measured fp32 matmul rate. Results: bench-results/latest.json and a table on stdout.

Both trainers do the same work: HYPER["gradient_checkpointing"] is given to each explicitly
(TRL's DPOConfig turns it on by default; ours is off for the tiny model), off here unless
--gradient-checkpointing. `ours_config` and `trl_config` build each side's settings; the other
benches (bench_learning, bench_gpu, bench_real) train through them too, and
tests/test_benches.py checks that the two sides agree.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.learning_tasks import task_split  # noqa: E402

MODEL = {"hidden_size": 384, "num_layers": 8, "num_heads": 6, "intermediate_size": 1536, "vocab_size": 384}
HELDOUT = 64  # held-out pairs per task, scored for every run
HYPER = {
    "beta": 0.1,
    "lr": 5e-4,
    "batch_size": 8,
    "max_length": 128,
    "warmup": 5,
    "epochs": 1,
    "seed": 0,
    "lora_r": 16,
    "gradient_checkpointing": False,  # both trainers, explicitly (TRL's own default is on)
}
CONFIGS = {
    "full-v384": {"vocab": None, "lora": False},
    "lora-v384": {"vocab": None, "lora": True},
    "full-v32k": {"vocab": 32000, "lora": False},
    "lora-v32k": {"vocab": 32000, "lora": True},
}
FILLER = "please explain the history of music and science in a short clear way for a new student".split()


# -- data and models ---------------------------------------------------------------------------
def bench_records(n: int, seed: int) -> list[dict]:
    """Toy preference pairs with prompts of varied length (~80 tokens a sequence, ~30% padding)."""
    from tools.toy_data import toy_records

    rng = random.Random(seed)
    out = []
    for record in toy_records(n, "pairs", seed):
        context = " ".join(rng.choice(FILLER) for _ in range(rng.randint(0, 16)))
        out.append({**record, "prompt": (f"Context: {context}. " if context else "") + record["prompt"]})
    return out


def model_dir(vocab: int | None) -> Path:
    from training.tiny_model import ensure_tiny_model

    name = "bench-20m" if vocab is None else f"bench-20m-v{vocab // 1000}k"
    return ensure_tiny_model(REPO / ".cache" / "models" / name, model_vocab_size=vocab, **MODEL)


def matmul_gflops(device: str = "cpu", repeats: int = 5) -> float:
    """The machine's dense matmul rate: fp32 on the CPU (2048^3), bf16 on a GPU (8192^3)."""
    import torch

    n, dtype = (2048, torch.float32) if device == "cpu" else (8192, torch.bfloat16)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def matmul_params(model) -> int:
    """Parameters that do matmul work per token (everything but the input embedding)."""
    embed = model.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()) - embed


# -- one run (in its own process) --------------------------------------------------------------
def ours_config(model_path: Path, lora: bool, device: str, hyper: dict = HYPER, preset: str = "tiny"):
    """Our trainer's config for a bench run: the model preset `preset` with the bench's
    hyper-parameters set over it (every one that TRL's side sets too)."""
    from training.config import compose_config

    return compose_config(
        model=preset,
        values={
            "model.name_or_path": str(model_path),
            "model.build": None,
            "model.lora.enabled": lora,
            "model.lora.r": hyper["lora_r"],
            "model.lora.alpha": 2 * hyper["lora_r"],
            "train.precision": "bf16-mixed" if device == "cuda" else "fp32",
            # the tiny model config's pass size is for a CPU; on a GPU a step goes in one pass
            **({"model.max_forward_tokens": None} if device == "cuda" else {}),
            "train.gradient_checkpointing": bool(hyper["gradient_checkpointing"]),
            "loss.beta": hyper["beta"],
            "train.learning_rate": hyper["lr"],
            "train.batch_size": hyper["batch_size"],
            "train.epochs": hyper["epochs"],
            "train.warmup_steps": hyper["warmup"],
            "train.seed": hyper["seed"],
            "train.plot": False,
            "train.device": device,
            "data.max_length": hyper["max_length"],
            "data.max_prompt_length": hyper["max_length"] // 2,  # the tiny preset's 64 is for its 128
            "data.eval_fraction": 0.0,  # the bench evaluates every run itself, on the same held-out set
            "eval.samples": 0,  # (and generates itself where it compares answers)
        },
    )


def run_ours(
    model_path: Path, train: list, lora: bool, out: Path, device: str, hyper: dict = HYPER, preset: str = "tiny"
) -> dict:
    from training.facade import run_training

    result = run_training(ours_config(model_path, lora, device, hyper, preset), train, out)
    history = result.metrics["history"]
    return {"final_train_loss": history[-1]["loss"], "train_tokens": sum(h["tokens"] for h in history)}


def trl_config(out: Path, precompute: bool, device: str, hyper: dict = HYPER):
    """TRL's DPOConfig for a bench run: the same hyper-parameters as `ours_config`."""
    import dataclasses

    from trl import DPOConfig

    # transformers >= 5.2x renamed gradient_checkpointing (now a deprecated alias) to activation_checkpointing
    names = {f.name for f in dataclasses.fields(DPOConfig)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return DPOConfig(
        output_dir=str(out / "trl"),
        beta=hyper["beta"],
        learning_rate=hyper["lr"],
        per_device_train_batch_size=hyper["batch_size"],
        num_train_epochs=hyper["epochs"],
        warmup_steps=hyper["warmup"],
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        max_length=hyper["max_length"],
        seed=hyper["seed"],
        precompute_ref_log_probs=precompute,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=device == "cpu",
        bf16=device == "cuda",
        disable_dropout=True,
        dataloader_num_workers=0,
        **{checkpointing: bool(hyper["gradient_checkpointing"])},  # TRL's default is on; ours is what hyper says
    )


def run_trl(
    model_path: Path, train: list, lora: bool, out: Path, precompute: bool, device: str, hyper: dict = HYPER
) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOTrainer

    from datasets import Dataset

    tokens = []

    class CountTokens(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "num_tokens" in logs:
                tokens.append(logs["num_tokens"])

    bf16 = device == "cuda"  # bf16=True is autocast: fp32 master weights, as ours in bf16-mixed; LoRA: bf16 base
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16 if bf16 and lora else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=hyper["lora_r"], lora_alpha=2 * hyper["lora_r"], target_modules="all-linear", task_type="CAUSAL_LM"
        )
    args = trl_config(out, precompute, device, hyper)
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[CountTokens()],
    )
    trainer.train()
    trainer.save_model(str(out))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"final_train_loss": losses[-1] if losses else None, "train_tokens": tokens[-1] if tokens else None}


def heldout_accuracy(
    model_path: Path,
    out: Path,
    lora: bool,
    heldout: list,
    device: str,
    max_length: int = HYPER["max_length"],
    chat_template: str = "off",
) -> float:
    """Reward accuracy on the held-out pairs: policy vs the initial model, our log-prob code
    (`chat_template`: data.chat_template, for plain-string pairs on a chat model)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.batching import collate_shared_prefix
    from training.logprobs import model_logps
    from training.records import normalise_records
    from training.tokenize import tokenize_pairs

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    reference = AutoModelForCausalLM.from_pretrained(model_path).to(device).eval()
    if lora:
        from peft import PeftModel

        policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path), out)
    else:
        policy = AutoModelForCausalLM.from_pretrained(out)
    policy = policy.float().to(device).eval()
    pairs, _ = normalise_records(heldout)
    examples = tokenize_pairs(tokenizer, pairs, max_length, max_length // 2, "keep_end", chat_template)
    wins = []
    with torch.inference_mode():
        for i in range(0, len(examples), 16):
            batch = {
                k: v.to(device) for k, v in collate_shared_prefix(examples[i : i + 16], tokenizer.pad_token_id).items()
            }
            pc, pr, _ = model_logps(policy, batch)
            rc, rr, _ = model_logps(reference, batch)
            wins += ((pc - rc) > (pr - rr)).tolist()
    return sum(wins) / len(wins)


def worker(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    spec = json.loads(Path(args.spec).read_text())
    out, hyper = Path(spec["out"]), spec["hyper"]
    started = time.perf_counter()
    if spec["trainer"] == "ours":
        result = run_ours(Path(spec["model"]), spec["train"], spec["lora"], out, spec["device"], hyper)
    else:
        precompute = spec["trainer"] == "trl-precompute"
        result = run_trl(Path(spec["model"]), spec["train"], spec["lora"], out, precompute, spec["device"], hyper)
    wall = time.perf_counter() - started
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    accuracy = heldout_accuracy(Path(spec["model"]), out, spec["lora"], spec["heldout"], spec["device"])
    print(
        "@bench " + json.dumps({**result, "wall_s": wall, "peak_rss_mb": peak_rss_mb, "eval_reward_accuracy": accuracy})
    )
    return 0


# -- the driver --------------------------------------------------------------------------------
def sequence_tokens(model_path: Path, train: list, max_length: int = HYPER["max_length"]) -> int:
    """Non-pad tokens of all chosen + rejected sequences (the throughput unit for everyone)."""
    from transformers import AutoTokenizer

    from training.records import normalise_records
    from training.tokenize import tokenize_pairs

    tok = AutoTokenizer.from_pretrained(model_path)
    pairs, _ = normalise_records(train)
    return sum(
        e.chosen_length + e.rejected_length for e in tokenize_pairs(tok, pairs, max_length, max_length // 2, "keep_end")
    )


def worker_env(threads: int) -> dict:
    """The environment of a bench worker process: the repo importable, no hub, `threads` threads."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_DISABLED": "true",
        "OMP_NUM_THREADS": str(threads),
    }


def run_one(
    trainer: str,
    model_path: Path,
    config: dict,
    train: list,
    heldout: list,
    workdir: Path,
    threads: int,
    device: str,
    hyper: dict = HYPER,
    script: Path | None = None,
    extra: dict | None = None,
    tag: str = "@bench ",
) -> dict:
    """One run in a fresh process: `script --worker --spec FILE --threads N` (this file's worker,
    or another bench's with the same arguments; `extra`: more fields for its spec); returns the
    JSON of its last `tag` line."""
    import shutil

    out = workdir / f"{trainer}-{time.time_ns()}"
    spec = workdir / f"{out.name}.json"
    spec.write_text(
        json.dumps(
            {
                "trainer": trainer,
                "model": str(model_path),
                "lora": config["lora"],
                "train": train,
                "heldout": heldout,
                "out": str(out),
                "device": device,
                "hyper": hyper,
                **(extra or {}),
            }
        )
    )
    proc = subprocess.run(
        [sys.executable, str(script or __file__), "--worker", "--spec", str(spec), "--threads", str(threads)],
        capture_output=True,
        text=True,
        env=worker_env(threads),
        cwd=REPO,
    )
    shutil.rmtree(out, ignore_errors=True)
    spec.unlink()
    lines = [line for line in proc.stdout.splitlines() if line.startswith(tag)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"{trainer} run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return json.loads(lines[-1][len(tag) :])


def summarise(runs: list[dict], tokens: int, flops_per_token: float, matmul: float) -> dict:
    wall = statistics.median(r["wall_s"] for r in runs)
    rec = {
        "wall_s": wall,
        "wall_s_runs": [round(r["wall_s"], 2) for r in runs],
        "tokens_per_s": tokens / wall,
        "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
        "final_train_loss": statistics.median(r["final_train_loss"] for r in runs if r["final_train_loss"] is not None),
        "eval_reward_accuracy": statistics.median(r["eval_reward_accuracy"] for r in runs),
    }
    rec["useful_gflops"] = flops_per_token * tokens / wall / 1e9
    rec["useful_fraction_of_matmul"] = rec["useful_gflops"] / matmul if matmul else None
    return rec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 configurations, 48 pairs, trl default only")
    parser.add_argument("--configs", default=None, help=f"comma-separated subset of {list(CONFIGS)}")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in both trainers (default: neither)",
    )
    parser.add_argument("--out", default="bench-results/latest.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    hyper = {**HYPER, "gradient_checkpointing": args.gradient_checkpointing}
    names = args.configs.split(",") if args.configs else (["full-v384", "lora-v384"] if args.quick else list(CONFIGS))
    trainers = ["ours", "trl"] if args.quick else ["ours", "trl", "trl-precompute"]
    n_train = args.pairs or (48 if args.quick else 512)
    records = bench_records(n_train + HELDOUT, seed=1)
    # the style task (a surface cue) and a content task: speed ratios count only where both learn alike
    datasets = {"style": (records[:n_train], records[n_train:]), "fact": task_split("fact", n_train, HELDOUT, seed=1)}
    matmul = matmul_gflops(args.device)
    print(f"{args.device} matmul rate ({'fp32' if args.device == 'cpu' else 'bf16'}): {matmul:.1f} GFLOP/s")
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = REPO / ".cache" / "bench"
    workdir.mkdir(parents=True, exist_ok=True)
    results = {
        "meta": {
            "pairs": n_train,
            "heldout": HELDOUT,
            "tasks": list(datasets),
            "repeats": args.repeats,
            "threads": args.threads,
            "device": args.device,
            "matmul_gflops": matmul,
            "hyper": hyper,
            "model": MODEL,
        },
        "configs": {},
    }
    for name in names:
        config = CONFIGS[name]
        path = model_dir(config["vocab"])
        params = matmul_params(AutoModelForCausalLM.from_pretrained(path))
        # useful work per non-pad token: fwd+bwd of the policy (6N; LoRA: 4N, no weight gradients)
        # plus one reference forward (2N), however (or whether) the trainer does it.
        flops_per_token = (4 if config["lora"] else 6) * params + 2 * params
        for task, (train, heldout) in datasets.items():
            key = f"{name} {task}"
            tokens = sequence_tokens(path, train)
            runs = {t: [] for t in trainers}
            for repeat in range(args.repeats):
                for trainer in trainers:  # interleaved: A B C A B C
                    r = run_one(trainer, path, config, train, heldout, workdir, args.threads, args.device, hyper)
                    runs[trainer].append(r)
                    print(
                        f"  {key} repeat {repeat + 1} {trainer:15s} wall {r['wall_s']:7.1f} s  rss {r['peak_rss_mb']:6.0f} MB"
                        f"  loss {r['final_train_loss']:.4f}  acc {r['eval_reward_accuracy']:.3f}",
                        flush=True,
                    )
            entry = {t: summarise(runs[t], tokens, flops_per_token, matmul or 0) for t in trainers}
            entry["tokens"] = tokens
            entry["ratios"] = {
                f"ours/{t}": {
                    "wall_s": entry["ours"]["wall_s"] / entry[t]["wall_s"],
                    "tokens_per_s": entry["ours"]["tokens_per_s"] / entry[t]["tokens_per_s"],
                    "peak_rss_mb": entry["ours"]["peak_rss_mb"] / entry[t]["peak_rss_mb"],
                    "eval_reward_accuracy_diff": entry["ours"]["eval_reward_accuracy"]
                    - entry[t]["eval_reward_accuracy"],
                }
                for t in trainers
                if t != "ours"
            }
            results["configs"][key] = entry
            # after each configuration and task: a cut-off run keeps what it finished
            out.write_text(json.dumps(results, indent=2))
    print_table(results)
    print(f"results: {out}")
    return 0


def print_table(results: dict) -> None:
    print(
        f"\n{'config':16s} {'trainer':15s} {'wall s':>8s} {'tok/s':>8s} {'RSS MB':>8s} {'loss':>7s} {'acc':>6s} {'GFLOP/s':>8s} {'%matmul':>8s}"
    )
    for name, entry in results["configs"].items():
        for trainer, r in entry.items():
            if trainer in ("ratios", "tokens"):
                continue
            frac = r["useful_fraction_of_matmul"]
            print(
                f"{name:16s} {trainer:15s} {r['wall_s']:8.1f} {r['tokens_per_s']:8.0f} {r['peak_rss_mb']:8.0f} "
                f"{r['final_train_loss']:7.4f} {r['eval_reward_accuracy']:6.3f} {r['useful_gflops']:8.1f} "
                f"{(100 * frac if frac else float('nan')):7.1f}%"
            )
        for key, ratio in entry["ratios"].items():
            print(
                f"{'':16s} {key:15s} wall x{ratio['wall_s']:.2f}  tok/s x{ratio['tokens_per_s']:.2f}  "
                f"RSS x{ratio['peak_rss_mb']:.2f}  acc {ratio['eval_reward_accuracy_diff']:+.3f}"
            )


if __name__ == "__main__":
    sys.exit(main())
