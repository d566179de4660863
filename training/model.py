"""Loading the policy, its tokenizer and the reference model."""

from __future__ import annotations

import contextlib
import copy

import torch

from training.config import looks_like_path, resolve_path
from training.precision import declared_dtype, load_dtype
from training.real_model import DEFAULT_PATH as REAL_PATH
from training.real_model import ensure_real_model
from training.tiny_model import DEFAULT_PATH as TINY_PATH
from training.tiny_model import ensure_tiny_model


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# Models a preset builds locally (`model.build`), each only at its preset's own path: a mistyped
# path must be an error, never a freshly built model trained in its place.
BUILDERS = {
    "tiny": (TINY_PATH, ensure_tiny_model),
    "smollm2": (REAL_PATH, ensure_real_model),
}


def model_path(model_cfg) -> str:
    """A local model directory (built first for a preset that builds its own) or a hub id passed
    through as is. A path that holds no model is an error naming it."""
    name = str(model_cfg.name_or_path)
    local = resolve_path(name)
    build = model_cfg.get("build")
    if build is not None:
        if build not in BUILDERS:
            raise ValueError(f"model.build: expected one of {sorted(BUILDERS)} or null, got {build!r}")
        own_path, ensure = BUILDERS[build]
        if local != resolve_path(own_path):
            raise ValueError(
                f"model.name_or_path={name}: this preset builds its model only at {own_path}; to train the model"
                f" at {name} use model=custom model.name_or_path={name}"
            )
        return str(ensure(local))
    if local.is_dir() and (local / "config.json").is_file():
        return str(local)
    if local.exists() or looks_like_path(name):
        what = "is not a model directory (no config.json)" if local.exists() else "does not exist"
        raise ValueError(f"model.name_or_path={name}: {local} {what}")
    return name  # a hub id: from_pretrained fetches it (or finds it in the HF cache)


def _quiet_transformers() -> None:
    """No progress bars in service logs."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:  # many causal LMs ship without one; pad positions are masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def disable_dropout(model: torch.nn.Module) -> None:
    """DPO compares policy and reference on the same tokens: dropout would make them differ at step 0."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"):
        if config is not None and isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)


def load_policy(model_cfg, precision: str, device: torch.device):
    """The policy on `device`, its path, and the dtype its checkpoint declares (saved weights go
    back to it). Loaded in fp32 master weights, or a bf16 frozen base for LoRA under bf16-mixed
    (training/precision.py)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _quiet_transformers()
    path = model_path(model_cfg)
    trust = model_cfg.trust_remote_code
    source_dtype = declared_dtype(AutoConfig.from_pretrained(path, trust_remote_code=trust))
    dtype = load_dtype(precision, model_cfg.lora.enabled)
    extra = {}
    if model_cfg.quantization is not None:
        extra = {"quantization_config": quantization_config(model_cfg, precision), "device_map": {"": device}}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust, **extra)
    disable_dropout(model)
    if model_cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        target = model_cfg.lora.target_modules
        lora = LoraConfig(
            r=model_cfg.lora.r,
            lora_alpha=model_cfg.lora.alpha,
            lora_dropout=model_cfg.lora.dropout,
            target_modules=target if isinstance(target, str) else list(target),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)  # adapters in fp32 over any base dtype (PEFT's autocast_adapter_dtype)
    return (model if extra else model.to(device)), path, source_dtype


def quantization_config(model_cfg, precision: str):
    """QLoRA's base: 4-bit NF4 weights with double quantization, computing in the run's dtype.
    Only a frozen base can be quantized, so it needs LoRA."""
    from transformers import BitsAndBytesConfig

    if model_cfg.quantization != "4bit":
        raise ValueError(f"model.quantization: expected null | 4bit, got {model_cfg.quantization!r}")
    if not model_cfg.lora.enabled:
        raise ValueError(
            "model.quantization: 4bit needs model.lora.enabled=true (QLoRA trains adapters over a frozen 4-bit base)"
        )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=load_dtype(precision, lora=True),
    )


class Reference:
    """Where reference log-probs come from: a frozen copy of the initial policy ("copy"), the LoRA
    policy with its adapters disabled ("adapter": no second copy), or the policy itself before
    training starts ("self", used to precompute)."""

    def __init__(self, policy, mode: str):
        if mode not in ("copy", "adapter", "self"):
            raise ValueError(f"reference mode: expected copy | adapter | self, got {mode!r}")
        self.mode = mode
        if mode == "copy":
            self.model = copy.deepcopy(policy).eval()
            self.model.requires_grad_(False)
        else:
            self.model = policy

    @contextlib.contextmanager
    def active(self):
        """A no-grad context in which the yielded model gives reference log-probs."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.model.disable_adapter() if self.mode == "adapter" else contextlib.nullcontext():
                yield self.model
        finally:
            self.model.train(was_training)


def enable_gradient_checkpointing(model) -> None:
    """Keep only each decoder layer's input during the forward pass and recompute the rest in the
    backward pass: activation memory drops to about one layer's, for ~30% more compute. The
    non-reentrant variant needs no input that requires grad, so it works under LoRA as is."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(int(threads))
