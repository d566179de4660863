"""Speed at real shapes on a GPU: our trainer against TRL's DPOTrainer, same data and settings.

    python3 tools/bench_gpu.py --out gpu-results/speed.json                  # on a GPU (~8 min)
    python3 tools/bench_gpu.py --shapes tiny --device cpu --pairs 16 --max-length 256   # a smoke run

Random-init models of published shapes (Qwen2.5-0.5B, Qwen2.5-1.5B; nothing is downloaded),
bf16-mixed (fp32 master weights, bf16 autocast) for both trainers, max_length 1024, prompts of
~250-450 tokens and answers of ~100-300. For each shape and mode (full fine-tuning, LoRA r16)
each trainer runs in a fresh subprocess: job wall time (model load to saved weights, reference
work included), tokens/s (non-pad chosen + rejected tokens / wall), model FLOPs utilisation
(useful FLOPs: 6N a token for a full fine-tune, 4N for LoRA, plus 2N for the reference forward,
over the GPU's dense bf16 peak) and peak GPU memory. The JSON is written after each run.
Goals (issue 15): >= 1.5x TRL's tokens/s, MFU >= 40%, peak memory <= 0.75x TRL's.
Gradient checkpointing is the same for both trainers, set explicitly (`--gradient-checkpointing`:
on by default on a GPU, as TRL's own default and our GPU presets' `auto`; off on the CPU).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.bench import matmul_gflops, matmul_params, run_ours, run_trl, worker_env  # noqa: E402

SHAPES = {
    "qwen2.5-0.5b": None,  # tools/gpu_real_shape.py's published shape
    "qwen2.5-1.5b": {
        "model_type": "qwen2",
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
    },
    "tiny": {  # for a smoke run on a CPU
        "model_type": "qwen2",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1024,
        "tie_word_embeddings": True,
    },
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM; the name decides
WORDS = "the a model answer question data learn people prefer clear short long because which when".split()


def records(n: int, seed: int) -> list[dict]:
    """Pairs with realistic lengths: a long prompt (context + question), two answers of different
    content and length (the tiny tokenizer makes about three tokens of each of these words)."""
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    return [
        {"prompt": text(85, 150) + "?", "chosen": text(33, 100) + ".", "rejected": text(33, 100) + "!"}
        for _ in range(n)
    ]


def sequence_tokens(path: Path, train: list, max_length: int) -> int:
    """Non-pad tokens of every chosen and rejected sequence after truncation: the one token count
    both trainers' tokens/s are measured in."""
    from transformers import AutoTokenizer

    from training.records import normalise_records
    from training.tokenize import tokenize_pairs

    pairs, _ = normalise_records(train)
    examples = tokenize_pairs(AutoTokenizer.from_pretrained(path), pairs, max_length, max_length // 2, "keep_end")
    return sum(e.chosen_length + e.rejected_length for e in examples)


def gpu_hyper(lora: bool, max_length: int, gradient_checkpointing: bool) -> dict:
    """The settings both trainers get (tools/bench.py's ours_config and trl_config read them)."""
    return {
        "beta": 0.1,
        "lr": 2e-5 if lora else 1e-6,
        "batch_size": 8,
        "max_length": max_length,
        "warmup": 2,
        "epochs": 1,
        "seed": 0,
        "lora_r": 16,
        "gradient_checkpointing": gradient_checkpointing,
    }


def build(shape: str, root: Path) -> Path:
    import tools.gpu_real_shape as real

    if SHAPES[shape] is not None:
        real.SHAPES.setdefault(shape, SHAPES[shape])
    return real.build(shape, root, "cpu")  # saved once, loaded by each run as a user's model is


def worker(spec_path: str) -> int:
    import torch

    spec = json.loads(Path(spec_path).read_text())
    cuda = spec["device"] == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    args = (Path(spec["model"]), spec["train"], spec["lora"], Path(spec["out"]))
    if spec["trainer"] == "ours":
        result = run_ours(*args, spec["device"], spec["hyper"])
    else:
        result = run_trl(*args, False, spec["device"], spec["hyper"])
    wall = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    print("@bench " + json.dumps({**result, "wall_s": wall, "peak_gpu_mb": peak}), flush=True)
    return 0


def run(trainer: str, path: Path, lora: bool, train: list, hyper: dict, device: str, work: Path) -> dict:
    out = work / f"{trainer}-{time.time_ns()}"
    spec = out.with_suffix(".json")
    spec.write_text(
        json.dumps(
            {
                "trainer": trainer,
                "model": str(path),
                "lora": lora,
                "train": train,
                "out": str(out),
                "device": device,
                "hyper": hyper,
            }
        )
    )
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", str(spec)], capture_output=True, text=True, env=worker_env(8), cwd=REPO
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("@bench ")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-1500:]}"}
    return json.loads(lines[-1][len("@bench ") :])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="qwen2.5-0.5b,qwen2.5-1.5b")
    parser.add_argument("--modes", default="full,lora")
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    parser.add_argument(
        "--gradient-checkpointing",
        default="auto",
        choices=("auto", "on", "off"),
        help="both trainers alike; auto: on for cuda, off for cpu",
    )
    parser.add_argument("--out", default="gpu-results/speed.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker)

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    checkpointing = (
        args.device == "cuda" if args.gradient_checkpointing == "auto" else args.gradient_checkpointing == "on"
    )
    work = REPO / ".cache" / "bench-gpu"
    work.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    results = {
        "meta": {
            "device": name,
            "peak_bf16_tflops": peak,
            "matmul_gflops": matmul_gflops(args.device),
            "pairs": args.pairs,
            "max_length": args.max_length,
            "gradient_checkpointing": checkpointing,
        },
        "runs": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    train = records(args.pairs, seed=1)
    for shape in args.shapes.split(","):
        path = build(shape, work / "models")
        with torch.device("meta"):
            params = matmul_params(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)))
        for mode in args.modes.split(","):
            lora = mode == "lora"
            hyper = gpu_hyper(lora, args.max_length, checkpointing)
            flops_per_token = (4 if lora else 6) * params + 2 * params
            tokens = sequence_tokens(path, train, args.max_length)
            entry = {"tokens": tokens}
            for trainer in ("ours", "trl"):
                r = run(trainer, path, lora, train, hyper, args.device, work)
                if "error" not in r:
                    r["tokens_per_s"] = tokens / r["wall_s"]
                    r["mfu"] = flops_per_token * r["tokens_per_s"] / (peak * 1e12) if peak else None
                entry[trainer] = r
                print(f"{shape} {mode} {trainer}: {json.dumps(r)[:400]}", flush=True)
            if all("tokens_per_s" in entry[t] for t in ("ours", "trl")):
                entry["ratios"] = {
                    "tokens_per_s": entry["ours"]["tokens_per_s"] / entry["trl"]["tokens_per_s"],
                    "wall_s": entry["ours"]["wall_s"] / entry["trl"]["wall_s"],
                    "peak_gpu_mb": entry["ours"]["peak_gpu_mb"] / entry["trl"]["peak_gpu_mb"]
                    if entry["trl"]["peak_gpu_mb"]
                    else None,  # none on a CPU
                }
            results["runs"][f"{shape} {mode}"] = entry
            out.write_text(json.dumps(results, indent=2))  # after each configuration
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
