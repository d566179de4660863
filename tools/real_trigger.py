"""The whole pipeline on a real chat model: start the service on loopback (local backends, a
generated secret), send the shipped behaviour set (datasets/greeting/) signed, with the
SmolLM2-135M-Instruct preset and LoRA, follow the job to `succeeded`, then print a few held-out
prompts with the base model's answer beside the fine-tuned model's, and the share of held-out
answers that show the preferred behaviour before and after. Non-zero exit when the job fails or
the share did not rise.

    python tools/real_trigger.py [--root .cache/real-service] [--epochs 1] [--samples 32]
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.serve import run_pipeline  # noqa: E402
from tools.trigger import Client, submit_and_follow  # noqa: E402
from training.records import load_records_file  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "datasets" / "greeting"
BEHAVIOUR = "^Great question!"  # datasets/greeting/README.md: the community's preferred opener


def samples_of(client: Client, job_id: str) -> list[dict]:
    """The job's last `samples` event: held-out prompts with the answers before and after."""
    samples, after = [], 0
    while True:
        page = client.get(f"/jobs/{job_id}/events", params={"after": after, "limit": 1000}).json()
        for event in page["events"]:
            if event["kind"] == "samples":
                samples = event["data"]["samples"]
        if page["last_seq"] == after:
            return samples
        after = page["last_seq"]


def show(samples: list[dict], final_eval: dict, n: int) -> None:
    wrap = textwrap.TextWrapper(width=96, initial_indent="    ", subsequent_indent="    ")
    for sample in samples[:n]:
        print(f"\nprompt: {sample['prompt']}")
        print("  base model:\n" + wrap.fill(sample.get("before") or ""))
        print("  fine-tuned:\n" + wrap.fill(sample.get("after") or ""))
    before, after = final_eval.get("eval/contains_share_before"), final_eval.get("eval/contains_share")
    print(f"\nheld-out answers opening with {BEHAVIOUR!r}: ", end="")
    print(f"{before:.0%} of {len(samples)} before training, {after:.0%} after")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".cache/real-service", help="data, artifacts and server log go here")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--samples", type=int, default=32, help="held-out prompts answered before and after")
    parser.add_argument("--show", type=int, default=4, help="how many of them to print side by side")
    args = parser.parse_args(argv)
    train, validation = load_records_file(str(DATA / "train.jsonl")), load_records_file(str(DATA / "validation.jsonl"))
    config = {
        "model": "smollm2-135m",
        "lora": True,
        "epochs": args.epochs,
        "eval_samples": args.samples,
        "eval_contains": BEHAVIOUR,
    }

    def pipeline(server) -> int:
        client = Client(server.url, server.secret)
        print(f"training SmolLM2-135M-Instruct (LoRA) on {len(train)} preference pairs, {len(validation)} held out")
        job = submit_and_follow(client, "greeting-community", train, config, timeout_s=3600, validation=validation)
        if job is None or job["status"] != "succeeded":
            return 1
        final_eval = job["final_eval"]
        show(samples_of(client, job["job_id"]), final_eval, args.show)
        before, after = final_eval.get("eval/contains_share_before"), final_eval.get("eval/contains_share")
        if before is None or after is None or after <= before:
            print("the preferred behaviour did not become more common", file=sys.stderr)
            return 1
        return 0

    return run_pipeline(Path(args.root), "real-trigger", pipeline)


if __name__ == "__main__":
    sys.exit(main())
