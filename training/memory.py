"""How much memory a job will need, estimated before any weight is loaded, so a job that cannot
fit fails in seconds with the numbers instead of running out of memory an hour in.

The parameter count comes from the model's own config, built on the meta device (no memory).
Bytes per parameter follow the precision (training/precision.py) and the optimizer; activation
memory is a rough per-token figure for one forward pass of the configured token budget
(Korthikanti et al. 2022: ~34 x hidden bytes a token a layer in 16-bit, with memory-efficient
attention), kept on the safe side. plan/performance.md compares it with measured peaks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from training.batching import check_forward_budget
from training.distributed import decoder_layers
from training.layout import known_reason

GIB = 1024**3
HEADROOM = 0.9  # plan to use at most this share of the free memory (allocator fragmentation, CUDA context)


class InsufficientMemory(RuntimeError):
    """The estimate does not fit the device: raised before the model is loaded."""


@dataclass
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    reference: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.reference + self.activations

    def as_dict(self) -> dict:
        return {**{k: round(v / GIB, 3) for k, v in asdict(self).items()}, "total": round(self.total / GIB, 3)}

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in self.as_dict().items() if k != "total")
        return f"{self.total / GIB:.2f} GiB ({parts})"


def _meta_model(path: str, trust_remote_code: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code), config


def body_linears(model):
    """(name, module) of the linear layers LoRA and 4-bit quantization apply to: all but the
    head (nn.Linear, and GPT-2's Conv1D, a linear layer with its weight transposed)."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | Conv1D) and m is not head]


def lora_parameters(model, lora_cfg) -> int:
    """Trainable LoRA parameters: r x (in + out) for each targeted linear layer."""
    target = lora_cfg.target_modules
    names = None if target == "all-linear" else set([target] if isinstance(target, str) else target)
    return sum(
        lora_cfg.r * sum(m.weight.shape)
        for name, m in body_linears(model)
        if names is None or name.rsplit(".", 1)[-1] in names
    )


NF4_BYTES = 0.5 + 0.0625  # 4-bit weights plus double-quantized block constants
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2, "paged_adamw8bit": 2, "rmsprop": 4}  # state a trainable parameter


def estimate_memory(cfg, path: str, shards: int = 1) -> MemoryEstimate:
    """The job's peak memory on its device, by part (bytes). `shards`: the ranks a full
    fine-tune is sharded over (FSDP2): each holds 1/N of the weights, gradients and optimizer
    state, plus the weights it gathers for a pass (the root group and about two layers)."""
    model, config = _meta_model(path, cfg.model.trust_remote_code)
    n = sum(p.numel() for p in model.parameters())
    lora, precision, tcfg = cfg.model.lora.enabled, cfg.train.precision, cfg.train
    compute_bytes = 2 if precision == "bf16-mixed" else 4
    trainable = lora_parameters(model, cfg.model.lora) if lora else n
    frozen_bytes = (compute_bytes if lora else 4) * n  # LoRA's base is loaded in the compute dtype
    if cfg.model.quantization == "4bit":
        quantized = sum(m.weight.numel() for _, m in body_linears(model))
        frozen_bytes = NF4_BYTES * quantized + compute_bytes * (n - quantized)
    weights = int(frozen_bytes) + (4 * trainable if lora else 0)
    if precision == "bf16-mixed" and not lora:
        weights += 2 * n  # autocast keeps a bf16 copy of each fp32 weight for the pass
    # state (AdamW: two fp32 moments), plus the temporaries of torch's multi-tensor step (~one
    # fp32 copy of the trainable weights; measured on an H200: plan/performance.md)
    temporaries = 0 if "8bit" in tcfg.optimizer else 4 * trainable
    optimizer = OPTIMIZER_BYTES.get(tcfg.optimizer, 8) * trainable + temporaries
    live_copy = tcfg.reference == "live" and not lora and not cfg.loss.reference_free
    reference = 4 * n if live_copy else 0
    grads = 4 * trainable
    if shards > 1 and not lora:
        layers = decoder_layers(model)
        per_layer = sum(p.numel() for p in layers[0].parameters())
        gathered = n - len(layers) * per_layer + 2 * per_layer
        weights = 4 * n // shards + compute_bytes * gathered
        grads, optimizer = grads // shards, optimizer // shards

    text = getattr(config, "text_config", None) or config
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", 0)
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", 0)
    vocab = getattr(text, "vocab_size", 0)
    budget = check_forward_budget(cfg.model.max_forward_tokens) or 2 * tcfg.batch_size * cfg.data.max_length
    per_layer_token = 17 * hidden * compute_bytes  # ~34 x hidden bytes in 16-bit
    if tcfg.gradient_checkpointing:  # layer inputs kept, one layer's activations live at a time
        activation_bytes = budget * (hidden * compute_bytes * layers + per_layer_token)
    else:
        activation_bytes = budget * per_layer_token * layers
    # separate rows materialise the logits of every position; the shared layout only
    # logprob_chunk_size rows at a time (both: fp32 chunks). Separate rows are counted when the job
    # will use them: asked for, or a fallback known from the config (training/layout.py).
    separate = not tcfg.shared_prefix or known_reason(model, 2 * cfg.data.max_length) is not None
    logits = (budget * vocab * compute_bytes if separate else 0) + tcfg.logprob_chunk_size * vocab * 12
    return MemoryEstimate(weights, grads, optimizer, reference, activation_bytes + logits)


def free_memory(device: torch.device) -> int:
    """Bytes free for this job on the device (an earlier job's cached blocks released first)."""
    if device.type == "cuda":
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def check_memory(cfg, path: str, device: torch.device, shards: int = 1) -> MemoryEstimate | None:
    """The estimate, or InsufficientMemory naming what does not fit and what would help; None
    when train.memory_check is off (nothing is estimated: the model's config is not even read)."""
    if not cfg.train.memory_check:
        return None
    estimate = estimate_memory(cfg, path, shards)
    free = free_memory(device)
    if estimate.total > HEADROOM * free:
        hints = []
        if not cfg.model.lora.enabled:
            hints.append("model.lora.enabled=true (LoRA trains ~1% of the weights)")
        elif cfg.model.quantization is None:
            hints.append("model.quantization=4bit (QLoRA)")
        if cfg.train.optimizer == "adamw":
            hints.append("train.optimizer=adamw8bit")
        if not cfg.train.gradient_checkpointing:
            hints.append("train.gradient_checkpointing=true")
        hints.append("a smaller model.max_forward_tokens")
        raise InsufficientMemory(
            f"the job needs about {estimate.describe()}, more than {HEADROOM:.0%} of the"
            f" {free / GIB:.2f} GiB free on {device}; try {', or '.join(hints)}"
            " (or train.memory_check=false to run anyway)"
        )
    return estimate
