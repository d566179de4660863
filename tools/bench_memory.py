"""Peak memory of one training step, with and without gradient checkpointing, on the CPU.

Each setting runs in its own process (peak resident memory, ru_maxrss, only grows) on a random
Llama of a mid-size shape with long pairs, so activations dominate; the step's gradients are
compared to be sure both settings compute the same thing.

    python tools/bench_memory.py [--hidden 512 --layers 8 --tokens 512 --pairs 4]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def one_step(args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.batching import collate_shared_prefix
    from training.logprobs import model_logps
    from training.model import enable_gradient_checkpointing
    from training.tokenize import TokenizedPair

    torch.manual_seed(0)
    torch.set_num_threads(2)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=4 * args.tokens,
    )
    model = LlamaForCausalLM(config).train()
    if args.checkpointing:
        enable_gradient_checkpointing(model)
    third = args.tokens // 3
    pairs = [
        TokenizedPair(
            *(
                torch.randint(3, 32000, (third,), generator=torch.Generator().manual_seed(i * 3 + k)).tolist()
                for k in range(3)
            )
        )
        for i in range(args.pairs)
    ]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    chosen, rejected, _ = model_logps(model, collate_shared_prefix(pairs, 0))
    (chosen - rejected).sum().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    grad = model.model.layers[0].mlp.down_proj.weight.grad
    return {
        "checkpointing": args.checkpointing,
        "step_peak_mib": round((peak - before) / 1024, 1),  # ru_maxrss is in KiB on Linux
        "process_peak_mib": round(peak / 1024, 1),
        "grad_probe": float(grad.double().abs().sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512, help="shared-prefix row length of a pair")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--checkpointing", type=int, choices=[0, 1], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.checkpointing is not None:  # the child: one setting
        print(json.dumps(one_step(args)))
        return
    rows = []
    for on in (0, 1):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--checkpointing", str(on)]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
    off, on = rows
    print(json.dumps({"shape": vars(args) | {"checkpointing": None}, "without": off, "with": on}, indent=2))
    same = abs(off["grad_probe"] - on["grad_probe"]) <= 1e-6 * abs(off["grad_probe"])
    ratio = on["step_peak_mib"] / off["step_peak_mib"]
    print(
        f"step peak: {off['step_peak_mib']} MiB without, {on['step_peak_mib']} MiB with ({ratio:.2f}x); same gradients: {same}"
    )


if __name__ == "__main__":
    main()
