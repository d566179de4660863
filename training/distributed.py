"""One job on several processes: PyTorch's own engine (torchrun, FSDP2, DCP), nothing of ours.

`python -m training ...` started by `torchrun --nproc_per_node=N` (or on several nodes) finds
RANK / WORLD_SIZE / LOCAL_RANK in its environment and joins a process group: NCCL on GPUs,
gloo on CPUs. Without them (the CLI on its own, the service's in-process trainer) everything
here is a no-op and the job runs on one device.

- Full fine-tuning is sharded with FSDP2 (`fully_shard` on each decoder layer, then the whole
  model): each rank keeps 1/N of the weights, gradients and optimizer state.
- LoRA keeps a replica of the (frozen) base on every rank; the adapter's gradients, a few MB,
  are averaged across ranks once a step.
- Every rank takes its share of each step's pairs (`shard`), so the global batch is
  train.batch_size whatever N is. Gradients are averaged across ranks (as FSDP2 and DDP do), so
  each rank's loss is its pairs' sum over the step's size, times N: a step is the same as on one
  process.
- FSDP2 gathers a layer's weights in its forward pass, a collective every rank must join:
  ranks run the same number of forward passes, padding with passes that count for nothing
  (`lockstep`).
"""

from __future__ import annotations

import ctypes
import os
import signal
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from training.model import pick_device

TIMEOUT_ENV = "DPO_DIST_TIMEOUT_S"  # a rank that hangs (not dies) is detected by this collective timeout
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: rank `rank` of `world` (0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 reports progress and writes the artifact."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def launched() -> bool:
    """True when torchrun (or another launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def current() -> Ranks:
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def rank_device(device_name: str) -> torch.device:
    """train.device for this process: under torchrun, "auto" and "cuda" mean this rank's GPU
    (cuda:LOCAL_RANK of the GPUs the launcher was given)."""
    device = pick_device(device_name)
    if launched() and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def init(device_name: str) -> tuple[Ranks, torch.device]:
    """Join the job's process group when launched as one of several processes; pick the device."""
    device = rank_device(device_name)
    if not launched():
        return Ranks(), device
    die_with_launcher()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return current(), device


def die_with_launcher() -> None:
    """Be killed when torchrun dies: it starts each rank in a session of its own, so a rank would
    outlive a launcher killed with SIGKILL (and hold its GPU). Linux only; elsewhere a no-op."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(indices: list[int], ranks: Ranks) -> list[int]:
    """This rank's pairs of a step (or of an evaluation batch): every N-th, from its rank on."""
    return indices[ranks.rank :: ranks.world]


def sum_across(tensor: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """The element-wise sum over ranks (in place), on every rank."""
    if ranks.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_across(flag: bool, ranks: Ranks, device: torch.device) -> bool:
    """True on every rank when it is true on any: ranks stop at the same step, or none does."""
    if not ranks.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def from_rank0(value, ranks: Ranks):
    """Rank 0's `value` on every rank (a choice each rank computed, but must make alike)."""
    if not ranks.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()


def lockstep(
    passes: list[list[int]], filler: list[int], ranks: Ranks, device: torch.device
) -> list[tuple[list[int], bool]]:
    """(pairs, counts?) for each forward pass, padded with `filler` passes that do not count so
    every rank runs as many passes as the busiest one (FSDP2's all-gathers need every rank)."""
    out = [(p, True) for p in passes]
    if ranks.distributed:
        most = torch.tensor([float(len(passes))], device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        out += [(filler, False)] * (int(most.item()) - len(passes))
    return out


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shards_model(lora: bool, ranks: Ranks) -> bool:
    """True when the job's model is sharded over its ranks (a full fine-tune on several)."""
    return ranks.distributed and not lora


def parallelize(policy, precision: str, ranks: Ranks, device: torch.device) -> None:
    """Shard a full fine-tune with FSDP2 (in place; a model loaded on the CPU moves to `device`
    layer by layer, each rank keeping its shards); leave a LoRA model replicated (its adapter's
    gradients are averaged by `average_gradients`). bf16-mixed: FSDP2 gathers the weights in
    bf16 for the forward pass and reduces gradients in fp32; the shards stay fp32 master weights."""
    if not shards_model(hasattr(policy, "peft_config"), ranks):
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (ranks.world,))
    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kwargs = {"mesh": mesh, "mp_policy": mixed} if precision == "bf16-mixed" else {"mesh": mesh}
    for layer in decoder_layers(policy):
        fully_shard(layer, **kwargs)
    fully_shard(policy, **kwargs)  # the rest (embeddings, final norm, LM head) as the root group


def reshard(model) -> None:
    """After forward passes without a backward pass (evaluation, reference log-probs, the layout
    check): free the root group's gathered weights. FSDP2 keeps them after the root's forward
    for the backward pass, and meanwhile `model.parameters()` would yield them, not the shards."""
    if is_sharded(model):
        model.reshard()


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks of a causal LM (the FSDP2 units): the decoder's `layers` (Llama,
    Qwen, Mistral, Gemma, ...), `h` (GPT-2 style) or `layers` under `gpt_neox`."""
    decoder = model.get_decoder()
    for name in ("layers", "h", "blocks"):
        blocks = getattr(decoder, name, None)
        if isinstance(blocks, torch.nn.ModuleList):
            return list(blocks)
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to shard with FSDP2")


def average_gradients(params: list[torch.nn.Parameter], ranks: Ranks) -> None:
    """Replicated (LoRA) training: average the trainable gradients across ranks, in one flat buffer."""
    if not ranks.distributed:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= ranks.world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def full_state_dict(policy, ranks: Ranks) -> dict | None:
    """A sharded model's full weights gathered on rank 0 (in CPU memory; None elsewhere). Every
    rank must call it. None for a model that is not sharded (each rank has it whole)."""
    if not is_sharded(policy):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return full if ranks.main else None
