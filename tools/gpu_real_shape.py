"""GPU check at real scale: random-init models with published shapes (no download), trained
through the service's own run_training with the model presets' settings.

For each case: the loss per step, the share of the fp32 master weights that moved, the peak GPU
memory against training/memory.py's estimate, the batch layout chosen and tokens/s. Results are
written after each case to --out (JSON), so a cut-off run still reports what it finished.

    python3 tools/gpu_real_shape.py --out gpu-results/real-shape.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.toy_data import toy_records  # noqa: E402
from training.config import compose_config  # noqa: E402
from training.loop import train_policy  # noqa: E402
from training.memory import GIB, check_memory  # noqa: E402
from training.model import load_policy, load_tokenizer  # noqa: E402
from training.precision import resolve_auto  # noqa: E402
from training.records import normalise_records  # noqa: E402
from training.tiny_model import build_tokenizer  # noqa: E402
from training.tokenize import tokenize_pairs  # noqa: E402

# Published dimensions (the models' config.json on the hub).
SHAPES = {
    "qwen2.5-0.5b": {
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
    },
    "gemma-2-2b": {
        "model_type": "gemma2",
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "vocab_size": 256000,
        "sliding_window": 4096,
        "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": 50.0,
        "query_pre_attn_scalar": 256,
    },
}
# name, shape, LoRA, learning rate, steps, gradient checkpointing, other config values
CASES = [
    ("qwen0.5b-full-bf16mixed-lr1e-6", "qwen2.5-0.5b", False, 1e-6, 40, True, {}),
    ("qwen0.5b-full-no-checkpointing", "qwen2.5-0.5b", False, 1e-6, 8, False, {}),
    ("qwen0.5b-full-adamw8bit", "qwen2.5-0.5b", False, 1e-6, 8, True, {"train.optimizer": "adamw8bit"}),
    ("qwen0.5b-lora-bf16-base", "qwen2.5-0.5b", True, 2e-5, 8, True, {}),
    ("qwen0.5b-qlora-4bit", "qwen2.5-0.5b", True, 2e-5, 8, True, {"model.quantization": "4bit"}),
    ("gemma2-2b-lora-layout-fallback", "gemma-2-2b", True, 5e-6, 4, True, {}),
]


def build(shape: str, root: Path, device: str) -> Path:
    """A random-init bf16 checkpoint of the shape, with the tiny tokenizer (its ids fit any vocab)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = root / shape
    if (path / "config.json").exists():
        return path
    tokenizer = build_tokenizer()
    settings = dict(SHAPES[shape])
    config = AutoConfig.for_model(
        settings.pop("model_type"),
        **settings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="bfloat16",
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_case(name, shape, lora, lr, steps, checkpointing, extra, root: Path, device: str = "cuda") -> dict:
    path = build(shape, root, device)
    cuda = device == "cuda"
    preset = "qwen2.5-0.5b"  # the GPU preset: bf16-mixed, its pass budget and lengths
    cfg = compose_config(
        model=preset,
        values={
            "output_dir": str(root / "out" / name),
            "model.name_or_path": str(path),
            "model.lora.enabled": lora,
            "train.learning_rate": lr,
            "train.max_steps": steps,
            "train.epochs": 100,
            "train.gradient_checkpointing": checkpointing,
            "train.evals": 0,
            "data.eval_fraction": 0.0,
            "train.device": device,
            **extra,
        },
    )
    cfg = resolve_auto(cfg, torch.device(device))  # the preset's precision `auto`, as run_training does
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    estimate = check_memory(cfg, str(path), torch.device(device))
    policy, _, _ = load_policy(cfg.model, cfg.train.precision, torch.device(device))
    tokenizer = load_tokenizer(str(path))
    pairs, _ = normalise_records(toy_records(512, seed=1))
    examples = tokenize_pairs(tokenizer, pairs, cfg.data.max_length, cfg.data.max_prompt_length, "keep_end")
    initial = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    events = []
    started = time.perf_counter()
    state = train_policy(policy, examples, tokenizer.pad_token_id, cfg, on_progress=events.append)
    wall = time.perf_counter() - started
    trained = dict(policy.named_parameters())
    moved = sum((trained[n].detach() != initial[n]).sum().item() for n in initial)
    total = sum(t.numel() for t in initial.values())
    losses = [h["loss"] for h in state.history]
    result = {
        "case": name,
        "shape": shape,
        "lora": lora,
        "learning_rate": lr,
        "steps": len(losses),
        "gradient_checkpointing": checkpointing,
        "extra": extra,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_min": min(losses),
        "loss_curve": [round(x, 5) for x in losses],
        "master_dtype": str(next(iter(initial.values())).dtype),
        "weights_moved": moved / total,
        "peak_gib": (torch.cuda.max_memory_allocated() - base) / GIB if cuda else None,
        "estimate_gib": estimate.as_dict(),
        "layout": state.layout,
        "warnings": [e["message"] for e in events if e["kind"] == "warning"],
        "tokens_per_s_median": sorted(h["tokens_per_s"] for h in state.history)[len(losses) // 2],
        "wall_s": wall,
    }
    del policy, initial, trained
    if cuda:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--root", type=Path, default=Path("/tmp/real-shapes"))
    parser.add_argument("--cases", default=",".join(c[0] for c in CASES))
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    wanted = set(args.cases.split(","))
    results = []
    for case in CASES:
        if case[0] not in wanted:
            continue
        try:
            results.append(run_case(*case, root=args.root, device=args.device))
        except Exception as err:  # report and go on: the other cases still say something
            results.append({"case": case[0], "error": f"{type(err).__name__}: {err}"[:2000]})
        row = results[-1]
        print(json.dumps({k: v for k, v in row.items() if k != "loss_curve"}), flush=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
