"""Ours against TRL's DPOTrainer on a real chat model: SmolLM2-135M-Instruct, same data and settings.

    python tools/bench_real.py            # LoRA and full fine-tuning, 256 pairs, 1 epoch, 2 repeats (~30 min)
    python tools/bench_real.py --quick    # 32 pairs, 16 held-out, 1 repeat: a smoke check (~6 min)
    python tools/bench_real.py --memory   # where a LoRA job's memory goes, phase by phase (ours, ~2 min)

The model (`make real-model`) is trained with the `smollm2-135m` preset's settings (fp32, LoRA r16
alpha 32 on every linear layer at lr 2e-4, or all weights at lr 5e-6; max_length 256, batch 8,
beta 0.1, linear schedule with 5 warmup steps, no gradient checkpointing for either trainer) on
the shipped behaviour set (datasets/greeting: chosen = "Great question! " + the model's own
answer, rejected = the answer). Both trainers get the same records as one user turn and one
assistant turn, so both apply the model's chat template. Runs are interleaved (ours, TRL, ours,
TRL, ...: machine noise hits both), each in a fresh subprocess (tools/bench.py's run_one, run_ours,
run_trl), and record:
  wall          model load to saved weights, reference work included
  tokens/s      non-pad chosen + rejected tokens (chat template applied) / wall
  peak RSS      the training process's peak resident memory, before any evaluation
  reward acc    held-out reward accuracy: trained policy vs the initial model (our log-prob code)
  share         greedy answers of the trained model to the held-out prompts (chat template, 48
                new tokens, tools/behaviour_data.py's greedy_answers) that match ^Great question!
The base model's share (before) is measured once. Goals (issue 23): wall <= 0.4x TRL's, peak RSS
<= 0.5x, share >= TRL's - 0.05. Results: bench-results/real.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.behaviour_data import MAX_NEW_TOKENS, PATTERN, behaviour_share, greedy_answers  # noqa: E402
from tools.bench import (  # noqa: E402
    heldout_accuracy,
    matmul_gflops,
    matmul_params,
    ours_config,
    run_one,
    run_ours,
    run_trl,
    sequence_tokens,
    summarise,
)

PRESET = "smollm2-135m"
DATA = REPO / "datasets" / "greeting"
TRAINERS = ("ours", "trl")
MODES = ("lora", "full")
GOALS = {"wall_s": 0.4, "peak_rss_mb": 0.5, "share_diff": -0.05}


def real_hyper(lora: bool, epochs: int = 1, gradient_checkpointing: bool | None = None) -> dict:
    """The settings both trainers get: the preset's (learning rate for the mode, lengths, LoRA
    rank, checkpointing) and the benches' common ones."""
    from training.config import compose_config

    preset = compose_config(PRESET)
    rates = preset.model.learning_rate
    return {
        "beta": 0.1,
        "lr": float(rates.lora if lora else rates.full),
        "batch_size": 8,
        "max_length": int(preset.data.max_length),
        "warmup": 5,
        "epochs": epochs,
        "seed": 0,
        "lora_r": int(preset.model.lora.r),
        "gradient_checkpointing": bool(
            preset.train.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
        ),
    }


def as_conversation(record: dict) -> dict:
    """A plain-string record as one user turn and one assistant turn (TRL's conversational
    format, which ours reads too): both trainers apply the model's chat template to it."""
    return {
        "prompt": [{"role": "user", "content": record["prompt"]}],
        "chosen": [{"role": "assistant", "content": record["chosen"]}],
        "rejected": [{"role": "assistant", "content": record["rejected"]}],
    }


def load_split(name: str, n: int) -> list[dict]:
    lines = (DATA / f"{name}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()][:n]


def trained_model(model_path: Path, out: Path, lora: bool):
    from transformers import AutoModelForCausalLM

    if lora:
        from peft import PeftModel

        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path), out).eval()
    return AutoModelForCausalLM.from_pretrained(out).float().eval()


# -- one run (in its own process) --------------------------------------------------------------
def worker(args) -> int:
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    spec = json.loads(Path(args.spec).read_text())
    model, out, lora, hyper = Path(spec["model"]), Path(spec["out"]), spec["lora"], spec["hyper"]
    started = time.perf_counter()
    if spec["trainer"] == "ours":
        result = run_ours(model, spec["train"], lora, out, spec["device"], hyper, PRESET)
    else:
        result = run_trl(model, spec["train"], lora, out, False, spec["device"], hyper)
    wall = time.perf_counter() - started
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # training's peak: nothing else ran yet
    accuracy = heldout_accuracy(model, out, lora, spec["heldout"], spec["device"], hyper["max_length"])
    prompts = [r["prompt"][0]["content"] for r in spec["heldout"]]
    answers = [
        a for a, _ in greedy_answers(trained_model(model, out, lora), AutoTokenizer.from_pretrained(model), prompts)
    ]
    print(
        "@bench "
        + json.dumps(
            {
                **result,
                "wall_s": wall,
                "peak_rss_mb": peak_rss_mb,
                "eval_reward_accuracy": accuracy,
                "share": behaviour_share(answers),
                "answers": answers[:3],
            }
        )
    )
    return 0


# -- where the memory goes (ours, one LoRA job, phase by phase) ---------------------------------
def rss_mb() -> tuple[float, float]:
    """(resident now, peak since the last reset) in MB, from /proc/self/status."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def reset_peak() -> None:
    """Start VmHWM over from the current RSS (Linux: 5 > /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def memory_worker(args) -> int:
    """Resident memory after each phase of one of our LoRA jobs (peak within the phase too), and
    the bytes autograd keeps for the backward pass of a step (activations, parameters excluded)."""
    import torch

    torch.set_num_threads(args.threads)
    spec = json.loads(Path(args.spec).read_text())
    rows = []

    def mark(phase: str, **extra) -> None:
        now, peak = rss_mb()
        rows.append({"phase": phase, "rss_mb": round(now), "phase_peak_mb": round(peak), **extra})
        reset_peak()

    mark("python + torch imported")
    import peft  # noqa: F401
    import transformers  # noqa: F401

    from training import distributed
    from training.loop import setup_run, train_step
    from training.model import load_policy, load_tokenizer
    from training.precision import resolve_auto
    from training.records import normalise_records
    from training.tokenize import tokenize_pairs

    mark("transformers, peft, training imported")
    hyper = spec["hyper"]
    cfg = ours_config(Path(spec["model"]), spec["lora"], "cpu", hyper, PRESET)
    for key, value in spec["values"].items():
        from omegaconf import OmegaConf

        OmegaConf.update(cfg, key, value, merge=False)
    _, device = distributed.init("cpu")
    cfg = resolve_auto(cfg, device)
    policy, path, _ = load_policy(cfg.model, cfg.train.precision, device)
    params = sum(p.numel() * p.element_size() for p in policy.parameters()) / 2**20
    mark("model loaded (LoRA adapters added)", weights_mb=round(params))
    tokenizer = load_tokenizer(path, False)
    pairs, _ = normalise_records(spec["train"])
    data = cfg.data
    examples = tokenize_pairs(
        tokenizer, pairs, data.max_length, data.max_prompt_length, data.truncation_mode, data.chat_template
    )
    run = setup_run(policy, examples, tokenizer.pad_token_id, cfg, None, None)
    mark("setup: layout check, reference log-probs precomputed", layout=run.state.layout.get("layout"))
    policy.train()
    param_ptrs = {p.untyped_storage().data_ptr() for p in policy.parameters()}
    batch = cfg.train.batch_size
    for step in range(spec["steps"]):
        indices = run.train_idx[step * batch : (step + 1) * batch]
        saved: dict[int, int] = {}

        def pack(t, saved=saved):
            storage = t.untyped_storage()
            if storage.data_ptr() not in param_ptrs:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            metrics = train_step(run, indices)
        mark(
            f"step {step + 1} ({metrics['tokens']} tokens)",
            saved_for_backward_mb=round(sum(saved.values()) / 2**20),
        )
    print("@memory " + json.dumps(rows))
    return 0


def job_memory_worker(args) -> int:
    """Resident memory through a whole job of ours (run_training, as the bench runs it): sampled
    every 10 ms, the peak between progress events (load and setup, each step, saving)."""
    import threading

    import torch
    from omegaconf import OmegaConf

    from training.facade import run_training

    torch.set_num_threads(args.threads)
    spec = json.loads(Path(args.spec).read_text())
    cfg = ours_config(Path(spec["model"]), spec["lora"], "cpu", spec["hyper"], PRESET)
    for key, value in spec["values"].items():
        OmegaConf.update(cfg, key, value, merge=False)
    segments, peak, done = [], [0.0], threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], rss_mb()[0])

    def close(label: str) -> None:
        now = rss_mb()[0]
        segments.append({"phase": label, "rss_mb": round(now), "phase_peak_mb": round(max(peak[0], now))})
        peak[0] = now

    def on_progress(event: dict) -> None:
        if event["kind"] == "step":
            close("reference log-probs, step 1" if event["step"] == 1 else f"step {event['step']}")
        elif event["kind"] == "layout":
            close("load, tokenise, layout check")

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    close("start")
    started = time.perf_counter()
    run_training(cfg, spec["train"], spec["out"], on_progress=on_progress)
    wall = time.perf_counter() - started
    close("save")
    done.set()
    segments.append(
        {"phase": "job peak (VmHWM)", "rss_mb": 0, "phase_peak_mb": round(rss_mb()[1]), "wall_s": round(wall, 1)}
    )
    print("@memory " + json.dumps(segments))
    return 0


def memory_profile(args, model: Path, train: list) -> None:
    values = dict(parse_value(v) for v in args.set)
    hyper = real_hyper(True)
    print(f"ours, LoRA, batch {hyper['batch_size']}, max_length {hyper['max_length']}, overrides {values or 'none'}:")
    for kind, title in (("phases", "phase by phase (training's own functions)"), ("job", "one whole job")):
        rows = run_one(
            "ours",
            model,
            {"lora": True},
            train,
            [],
            REPO / ".cache" / "bench-real",
            args.threads,
            "cpu",
            hyper,
            script=Path(__file__),
            extra={"values": values, "steps": 3, "memory": kind},
            tag="@memory ",
        )
        print(f" {title}:")
        for row in rows:
            rest = {k: v for k, v in row.items() if k not in ("phase", "rss_mb", "phase_peak_mb")}
            print(
                f"  {row['phase']:54s} rss {row['rss_mb']:6d} MB  peak in phase {row['phase_peak_mb']:6d} MB"
                f"  {rest or ''}"
            )


def parse_value(item: str) -> tuple[str, object]:
    key, _, raw = item.partition("=")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


# -- the driver --------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 pairs, 16 held-out, 1 repeat")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of lora,full")
    parser.add_argument("--pairs", type=int, default=None, help="training pairs (default 256; --quick 32)")
    parser.add_argument("--heldout", type=int, default=None, help="held-out pairs and prompts (default 64; --quick 16)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 2; --quick 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench-results/real.json")
    parser.add_argument("--memory", action="store_true", help="ours only: resident memory phase by phase")
    parser.add_argument("--set", action="append", default=[], help="--memory: a config value, key=json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind = json.loads(Path(args.spec).read_text()).get("memory")
        return {"phases": memory_worker, "job": job_memory_worker}.get(kind, worker)(args)

    import torch

    from training.real_model import ensure_real_model

    torch.set_num_threads(args.threads)
    model = ensure_real_model()
    n_train = args.pairs or (32 if args.quick else 256)
    n_heldout = args.heldout or (16 if args.quick else 64)
    repeats = args.repeats or (1 if args.quick else 2)
    train = [as_conversation(r) for r in load_split("train", n_train)]
    heldout = [as_conversation(r) for r in load_split("validation", n_heldout)]
    if args.memory:
        memory_profile(args, model, train)
        return 0
    modes = args.modes.split(",")
    if unknown := [m for m in modes if m not in MODES]:
        parser.error(f"--modes: unknown mode {unknown[0]!r}; expected some of {list(MODES)}")

    from transformers import AutoConfig, AutoModelForCausalLM

    from tools.behaviour_data import load

    base, tokenizer = load(model)
    prompts = [r["prompt"][0]["content"] for r in heldout]
    started = time.perf_counter()
    before = [a for a, _ in greedy_answers(base, tokenizer, prompts)]
    share_before = behaviour_share(before)
    print(
        f"base model: {share_before:.3f} of {len(prompts)} held-out answers match {PATTERN} ({time.perf_counter() - started:.0f} s)"
    )
    del base
    matmul = matmul_gflops("cpu")
    with torch.device("meta"):
        params = matmul_params(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)))
    workdir = REPO / ".cache" / "bench-real"
    workdir.mkdir(parents=True, exist_ok=True)
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    hypers = {mode: real_hyper(mode == "lora", args.epochs) for mode in modes}
    results = {
        "meta": {
            "model": str(model.relative_to(REPO)) if model.is_relative_to(REPO) else str(model),
            "preset": PRESET,
            "pairs": n_train,
            "heldout": n_heldout,
            "repeats": repeats,
            "threads": args.threads,
            "matmul_gflops": matmul,
            "hyper": hypers,
            "max_new_tokens": MAX_NEW_TOKENS,
            "pattern": PATTERN,
            "share_before": share_before,
            "goals": GOALS,
        },
        "modes": {},
    }
    tokens = sequence_tokens(model, train, hypers[modes[0]]["max_length"])
    runs = {(mode, t): [] for mode in modes for t in TRAINERS}
    for repeat in range(repeats):
        for mode in modes:
            for trainer in TRAINERS:  # interleaved: ours, trl, ours, trl, ...
                r = run_one(
                    trainer,
                    model,
                    {"lora": mode == "lora"},
                    train,
                    heldout,
                    workdir,
                    args.threads,
                    "cpu",
                    hypers[mode],
                    script=Path(__file__),
                )
                runs[mode, trainer].append(r)
                print(
                    f"  {mode:4s} repeat {repeat + 1} {trainer:4s} wall {r['wall_s']:7.1f} s  rss {r['peak_rss_mb']:6.0f} MB"
                    f"  loss {r['final_train_loss']:.4f}  acc {r['eval_reward_accuracy']:.3f}  share {r['share']:.3f}"
                    f"  e.g. {r['answers'][0][:70]!r}",
                    flush=True,
                )
        for mode in modes:  # after each repeat: a cut-off run keeps what it finished
            flops_per_token = (4 if mode == "lora" else 6) * params + 2 * params
            entry = {"tokens": tokens}
            for trainer in TRAINERS:
                done = runs[mode, trainer]
                entry[trainer] = {
                    **summarise(done, tokens, flops_per_token, matmul),
                    "share": statistics.median(r["share"] for r in done),
                    "share_runs": [r["share"] for r in done],
                    "answers": done[-1]["answers"],
                }
            entry["ratios"] = ratios(entry["ours"], entry["trl"])
            results["modes"][mode] = entry
        out.write_text(json.dumps(results, indent=2))
    print_table(results)
    print(f"results: {out}")
    return 0


def ratios(ours: dict, trl: dict) -> dict:
    got = {
        "wall_s": ours["wall_s"] / trl["wall_s"],
        "tokens_per_s": ours["tokens_per_s"] / trl["tokens_per_s"],
        "peak_rss_mb": ours["peak_rss_mb"] / trl["peak_rss_mb"],
        "share_diff": ours["share"] - trl["share"],
        "eval_reward_accuracy_diff": ours["eval_reward_accuracy"] - trl["eval_reward_accuracy"],
    }
    got["goals_met"] = {
        "wall_s": got["wall_s"] <= GOALS["wall_s"],
        "peak_rss_mb": got["peak_rss_mb"] <= GOALS["peak_rss_mb"],
        "share": got["share_diff"] >= GOALS["share_diff"],
    }
    return got


def print_table(results: dict) -> None:
    meta = results["meta"]
    print(
        f"\nSmolLM2-135M-Instruct, {meta['pairs']} pairs, {meta['heldout']} held out, {meta['repeats']} repeat(s), "
        f"medians; share before training: {meta['share_before']:.3f}"
    )
    print(
        f"{'mode':5s} {'trainer':7s} {'wall s':>8s} {'tok/s':>7s} {'RSS MB':>7s} {'loss':>7s} {'acc':>6s} {'share':>6s}"
    )
    for mode, entry in results["modes"].items():
        for trainer in TRAINERS:
            r = entry[trainer]
            print(
                f"{mode:5s} {trainer:7s} {r['wall_s']:8.1f} {r['tokens_per_s']:7.0f} {r['peak_rss_mb']:7.0f} "
                f"{r['final_train_loss']:7.4f} {r['eval_reward_accuracy']:6.3f} {r['share']:6.3f}"
            )
        q, met = entry["ratios"], entry["ratios"]["goals_met"]
        print(
            f"{mode:5s} ours/trl wall x{q['wall_s']:.2f} ({'met' if met['wall_s'] else 'not met'}: <= {GOALS['wall_s']})"
            f"  RSS x{q['peak_rss_mb']:.2f} ({'met' if met['peak_rss_mb'] else 'not met'}: <= {GOALS['peak_rss_mb']})"
            f"  share {q['share_diff']:+.3f} ({'met' if met['share'] else 'not met'}: >= {GOALS['share_diff']})"
            f"  tok/s x{q['tokens_per_s']:.2f}  acc {q['eval_reward_accuracy_diff']:+.3f}"
        )


if __name__ == "__main__":
    sys.exit(main())
