"""Writing a run's outputs: weights, tokenizer, resolved config, metrics.json, a plot."""

from __future__ import annotations

import json
import re
from pathlib import Path

from omegaconf import OmegaConf


def save_metrics(path: Path, state, extra: dict) -> dict:
    final_eval = state.evals[-1] if state.evals else {}
    metrics = {
        "steps": state.step,
        "total_steps": state.total_steps,
        "final_train": state.history[-1] if state.history else {},
        "final_eval": final_eval,
        "history": state.history,
        "evals": state.evals,
        "layout": state.layout,
        "samples": len(state.samples),  # greedy answers to held-out prompts in samples.jsonl
        **extra,
    }
    path.write_text(json.dumps(metrics, indent=2))
    return metrics


def save_plot(path: Path, history: list[dict], evals: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display in a server or container
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(steps, [h["loss"] for h in history], label="train")
    ax_acc.plot(steps, [h["rewards/accuracies"] for h in history], label="train")
    ax_acc.plot(steps, [h["rewards/margins"] for h in history], label="train margin", alpha=0.6)
    if evals:
        ax_loss.plot([e["step"] for e in evals], [e["eval/loss"] for e in evals], "o-", label="eval")
        eval_steps = [e["step"] for e in evals]
        ax_acc.plot(eval_steps, [e["eval/rewards/accuracies"] for e in evals], "o-", label="eval")
        ax_acc.plot(eval_steps, [e["eval/rewards/margins"] for e in evals], "s--", label="eval margin")
    if evals and evals[-1].get("eval/regressed"):
        fig.suptitle("held-out metrics ended worse than at step 0 (eval/regressed)", color="tab:red")
    ax_loss.set(title="loss", xlabel="step")
    ax_acc.set(title="reward accuracy / margin", xlabel="step")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


MERGED = "merged"  # a LoRA job's adapter merged into its base, next to the adapter


def save_merged(directory: Path, adapter_dir: Path, base_path: str, tokenizer, weights_dtype, trust: bool) -> None:
    """The saved LoRA adapter folded into the base weights (PEFT's merge_and_unload), saved as a
    plain model in the base's own dtype: what vLLM or TGI serve without PEFT.

    The merge runs in fp32 on a base reloaded from its source (on the CPU), never into the bf16
    copy a bf16-mixed job trained over: a LoRA delta is often below half a bf16 unit of the weight
    it is added to, and adding it in bf16 rounds most of it away (plan/decisions.md D34)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, trust_remote_code=trust)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.to(weights_dtype).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    del base, merged


def save_run(output_dir: Path, policy, tokenizer, cfg, state, extra: dict, weights_dtype, weights=None) -> dict:
    """Everything a user needs to load and judge the result. Returns the metrics dict.

    Full weights are saved in `weights_dtype` (the dtype the model came in: fp32 master weights
    of a bf16 model are saved in bf16); a LoRA adapter is saved as trained (fp32). `weights`: the
    full state dict of a model sharded over several ranks (gathered on this one), saved instead."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if weights is not None:
        weights = {name: t.to(weights_dtype) if t.is_floating_point() else t for name, t in weights.items()}
        policy.save_pretrained(output_dir, state_dict=weights, safe_serialization=True)
    else:
        if not hasattr(policy, "peft_config"):
            policy.to(weights_dtype)  # training is over: the master copy is no longer needed
        policy.save_pretrained(output_dir, safe_serialization=True)  # full model, or only the LoRA adapter
        if cfg.model.merge:
            base = str(extra["model"]["name_or_path"])
            save_merged(output_dir / MERGED, output_dir, base, tokenizer, weights_dtype, cfg.model.trust_remote_code)
    tokenizer.save_pretrained(output_dir)
    (output_dir / "training_config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    metrics = save_metrics(output_dir / "metrics.json", state, extra)
    if state.samples:
        save_samples(output_dir / SAMPLES, state.samples, cfg.eval.contains)
    if cfg.train.plot and state.history:
        save_plot(output_dir / "training_curves.png", state.history, state.evals)
    save_tensorboard(output_dir / "tensorboard", state.history, state.evals)
    save_model_card(output_dir / "README.md", cfg, metrics, state.samples)
    return metrics


SAMPLES = "samples.jsonl"


def save_samples(path: Path, samples: list[dict], contains: str | None) -> None:
    """One line a held-out prompt: the prompt, the answer before training and after; with
    eval.contains, whether each shows the preferred behaviour."""
    pattern = re.compile(contains) if contains else None
    with path.open("w", encoding="utf-8") as out:
        for sample in samples:
            line = dict(sample)
            if pattern is not None:
                for phase in ("before", "after"):
                    if line.get(phase) is not None:
                        line[f"matches_{phase}"] = bool(pattern.search(line[phase]))
            out.write(json.dumps(line, ensure_ascii=False) + "\n")


def samples_table(samples: list[dict], rows: int = 8, width: int = 160) -> str:
    """The first `rows` samples as a Markdown table, each cell cut to `width` characters."""

    def cell(text) -> str:
        text = "" if text is None else " ".join(str(text).split())
        text = text if len(text) <= width else text[: width - 1] + "…"
        return text.replace("|", "\\|")

    lines = [f"| {cell(s['prompt'])} | {cell(s.get('before'))} | {cell(s.get('after'))} |" for s in samples[:rows]]
    return "| prompt | before training | after |\n|---|---|---|\n" + "\n".join(lines)


TENSORBOARD_SCALARS = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "rewards/chosen",
    "rewards/rejected",
    "lr",
    "grad_norm",
    "tokens_per_s",
)


def save_tensorboard(log_dir: Path, history: list[dict], evals: list[dict]) -> None:
    """The curves as TensorBoard event files (PyTorch's SummaryWriter): `tensorboard --logdir`
    on a downloaded artifact shows train/* per step and eval/* at each held-out evaluation."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(log_dir)) as writer:
        for entry in history:
            for name in TENSORBOARD_SCALARS:
                writer.add_scalar(f"train/{name}", entry[name], entry["step"])
        for entry in evals:
            for name, value in entry.items():
                if name.startswith("eval/") and isinstance(value, float):
                    writer.add_scalar(name, value, entry["step"])


def save_model_card(path: Path, cfg, metrics: dict, samples: list[dict] | None = None) -> None:
    """A HuggingFace model card: the metadata the Hub and serving tools read (base model,
    library, tags), then what was trained, how, on how much data, and how it scored held out."""
    from huggingface_hub import ModelCardData

    model, data, final, evals = metrics["model"], metrics["dataset"], metrics["final_eval"], metrics["evals"]
    lora = model["lora"]
    card = ModelCardData(
        base_model=model["name_or_path"],
        library_name="peft" if lora else "transformers",
        tags=list(dict.fromkeys(["dpo", cfg.loss.name, *(["lora"] if lora else [])])),
        pipeline_tag="text-generation",
    )
    tcfg = cfg.train
    settings = {
        "loss": f"{cfg.loss.name} (beta {cfg.loss.beta}, label smoothing {cfg.loss.label_smoothing})",
        "learning rate": f"{tcfg.learning_rate} ({tcfg.scheduler}, {tcfg.warmup_steps} warmup steps)",
        "epochs / steps": f"{tcfg.epochs} / {metrics['steps']}",
        "batch size (pairs a step)": tcfg.batch_size,
        "optimizer": f"{tcfg.optimizer} (weight decay {tcfg.weight_decay}, max grad norm {tcfg.max_grad_norm})",
        "precision": tcfg.precision,
        "max length / prompt": f"{cfg.data.max_length} / {cfg.data.max_prompt_length} tokens",
        "reference": "none" if cfg.loss.reference_free else tcfg.reference,
        "LoRA": f"r {cfg.model.lora.r}, alpha {cfg.model.lora.alpha}, {cfg.model.lora.target_modules}"
        if lora
        else "no",
        "seed": tcfg.seed,
        "processes": metrics.get("processes", 1),
    }
    rows = "\n".join(f"| {key} | {value} |" for key, value in settings.items())
    held_out = "No held-out set (too few pairs, or data.eval_fraction 0)."
    if final:
        baseline = evals[0] if evals else {}
        names = ("eval/rewards/accuracies", "eval/rewards/margins", "eval/loss")
        lines = [f"| {n.removeprefix('eval/')} | {baseline.get(n, float('nan')):.4f} | {final[n]:.4f} |" for n in names]
        held_out = "| metric | before training | after |\n|---|---|---|\n" + "\n".join(lines)
        if final.get("eval/regressed"):
            held_out += "\n\n**Held-out metrics got worse than before training (eval/regressed).**"
    load = (
        f'PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{model["name_or_path"]}"), "<this folder>")'
        if lora
        else 'AutoModelForCausalLM.from_pretrained("<this folder>")'
    )
    answers = "No answers were generated (eval.samples 0, or no held-out set)."
    if samples:
        answers = f"Greedy answers (at most {cfg.eval.max_new_tokens} new tokens) to held-out prompts; all {len(samples)} in `samples.jsonl`.\n\n"
        answers += samples_table(samples)
        share_after, share_before = final.get("eval/contains_share"), final.get("eval/contains_share_before")
        if share_after is not None:
            before = "?" if share_before is None else f"{share_before:.2f}"
            answers += (
                f"\n\nShare of these answers matching `{cfg.eval.contains}` (eval.contains): {before} before"
                f" training, {share_after:.2f} after."
            )
    merged_note = "\n`merged/`: the adapter merged into the base, a plain model." if cfg.model.merge else ""
    body = f"""# {Path(str(model["name_or_path"])).name}, fine-tuned with {cfg.loss.name.upper()}

Preference fine-tuning ({"a LoRA adapter" if lora else "full weights"}, saved as {model["saved_dtype"]}) of
`{model["name_or_path"]}` on {data["pairs"]} preference pairs from {data["records"]} records
({data["skipped_records"]} skipped), by the DPO fine-tuning microservice.

## Training

| setting | value |
|---|---|
{rows}

## Held-out preference pairs

{held_out}

## What it answers

{answers}

Curves: {"`training_curves.png` and " if cfg.train.plot else ""}`tensorboard/`; every step and evaluation:
`metrics.json`; the full config: `training_config.yaml`.{merged_note}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer{chr(10) + "from peft import PeftModel" if lora else ""}

model = {load}
tokenizer = AutoTokenizer.from_pretrained("<this folder>")
```
"""
    path.write_text(f"---\n{card.to_yaml()}\n---\n\n{body}", encoding="utf-8")
