"""FSDP2, applied by our trainer: each decoder layer, then the whole log-prob module, sharded
with `torch.distributed.fsdp.fully_shard` over a mesh of the launched processes, the same
code on CPU (gloo) and GPU (NCCL), as torchtitan and torchtune apply it.

  build    the main process loads the weights into CPU memory; every other builds the model
           on the meta device (no memory); after sharding, each allocates its own slices on
           its device and receives them from the main process
           (`set_model_state_dict(..., broadcast_from_rank0=True)`), and the buffers the
           weights do not hold (rotary frequencies) are broadcast from it too
  train    gradients are reduce-scattered (averaged, as DDP's all-reduce); the gradient norm
           is taken over the shards (DTensors) and clipped on each
  save     resumable checkpoints through torch.distributed.checkpoint: each process writes
           its own shard of the weights and optimizer state, and a checkpoint loads on another
           process count (resharded as it is read); the final model is gathered once, whole,
           on the main process, as a plain Hugging Face checkpoint

The root of the sharding is the log-prob module (logprobs.ResponseLogProbs), not the causal
LM: its forward is what the trainer calls, and it uses the embeddings, final norm and output
layer, which FSDP gathers in the root's forward.
"""

from __future__ import annotations

import ctypes
import resource
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_model_state_dict,
                                                     set_state_dict)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from selfplay.errors import SelfplayError

SCHEDULER_FILE = "scheduler.pt"


@dataclass(frozen=True)
class Sharding:
    """How FSDP2 shards a training (--fsdp, or an accelerate FSDP config)."""
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    bf16_params: bool = False


_OWN_GROUP = []      # the one-process group made here, to be closed when the training ends


def mesh_of(device: torch.device) -> DeviceMesh:
    """A one-dimensional mesh of every launched process, over the process group the launcher
    formed; a process alone (no launcher, or one process) gets a group of its own."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                store=dist.HashStore(), rank=0, world_size=1)
        _OWN_GROUP.append(True)
    return init_device_mesh(device.type, (dist.get_world_size(),))


def close() -> None:
    """Close the group mesh_of made for a process alone, if it made one."""
    if _OWN_GROUP:
        dist.destroy_process_group()
        _OWN_GROUP.clear()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: modules of the classes its own `_no_split_modules` names
    (LlamaDecoderLayer, Qwen2DecoderLayer, ...), the unit every sharded framework wraps."""
    base = getattr(model, "model", model)              # the log-prob module's causal LM
    base = base.get_base_model() if hasattr(base, "get_base_model") else base   # PEFT's
    names = set(getattr(base, "_no_split_modules", None) or ())
    # by the class's name, or a base's: fully_shard makes each layer an FSDP subclass of it
    layers = [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]
    if not layers:
        raise SelfplayError(f"--fsdp: {type(base).__name__} names no decoder layer class "
                            "(_no_split_modules), so it cannot be sharded layer by layer.")
    return layers


def shard(module: nn.Module, sharding: Sharding, device: torch.device, main: bool
          ) -> nn.Module:
    """Shard `module` (in place) over every process and give each its slice of the weights.

    The main process's module holds the weights, in CPU memory; the others' was built on the
    meta device. Every process shards the bare shape, allocates only its slices on `device`,
    and receives them from the main process, so that no process but the main one ever holds
    the whole model, and it only in CPU memory, never on its GPU."""
    mesh = mesh_of(device)
    if device.type == "cpu":
        _release_freed_blocks()
    full = buffers = None
    if main:
        full = module.state_dict()
        buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
        # to the meta device like the others' (`full` keeps the weights); swapping in place
        # keeps a tied output layer tied to the embeddings, as the others' is
        swap = torch.__future__.get_swap_module_params_on_conversion()
        torch.__future__.set_swap_module_params_on_conversion(True)
        try:
            module.to("meta")
        finally:
            torch.__future__.set_swap_module_params_on_conversion(swap)
    kwargs = {"mesh": mesh}
    if sharding.bf16_params:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                   reduce_dtype=torch.float32)
    if sharding.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in decoder_layers(module):
        fully_shard(layer, reshard_after_forward=sharding.reshard_after_forward, **kwargs)
    # The root's weights (embeddings, output layer) are used again at once in backward.
    fully_shard(module, reshard_after_forward=False, **kwargs)
    module.to_empty(device="cpu" if sharding.cpu_offload else device)
    if sharding.cpu_offload:       # the weights rest in CPU memory; buffers compute on `device`
        for m in module.modules():
            for name, buf in m._buffers.items():
                if buf is not None:
                    m._buffers[name] = buf.to(device)
    set_model_state_dict(module, full or {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    # Buffers outside the state dict (a rotary embedding's frequencies): the main process's.
    for name, buf in module.named_buffers():
        if main:
            buf.data.copy_(buffers[name])
        dist.broadcast(buf.data, src=0)
    return module


def _release_freed_blocks() -> None:
    """On CPU, every layer's weights are gathered, used and freed at each forward and
    backward. glibc serves blocks below its mmap threshold from its heap and keeps them when
    freed, and the threshold rises with each large block freed: each process would end up
    holding about the whole model's worth of freed blocks (docs/scaling.md measures it). A
    fixed 1 MiB threshold maps large blocks and unmaps them on free."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)       # M_MMAP_THRESHOLD
    except (OSError, AttributeError):                       # not glibc: nothing to do
        pass


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """The gradients' total 2-norm over every process's shards, and each shard clipped by it
    (as torch.nn.utils.clip_grad_norm_ on whole weights)."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def save_checkpoint(module: nn.Module, optimizer, scheduler, path: Path) -> None:
    """A resumable checkpoint in `path`: every process writes its shard of the weights and of
    the optimizer state; the main process, the schedule."""
    model_sd, optim_sd = get_state_dict(module, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    rank = dist.get_rank()
    torch.save(torch.get_rng_state(), path / f"rng-{rank}.pt")     # LoRA dropout's draws
    if rank == 0:
        torch.save(scheduler.state_dict(), path / SCHEDULER_FILE)


def load_checkpoint(module: nn.Module, optimizer, scheduler, path: Path) -> None:
    """Restore what save_checkpoint wrote, on this process count (it may differ)."""
    model_sd, optim_sd = get_state_dict(module, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(module, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    scheduler.load_state_dict(torch.load(path / SCHEDULER_FILE, weights_only=True))
    rng = path / f"rng-{dist.get_rank()}.pt"     # on another process count: new draws
    if rng.exists():
        torch.set_rng_state(torch.load(rng, weights_only=True))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def footprint(module: nn.Module, optimizer) -> dict:
    """What sharding left each process: its bytes of weights, gradients (one per trained
    weight) and optimizer state, against the same whole; its peak resident memory; and how
    many decoder layers are their own FSDP unit. Every process takes part."""
    weights = [(_local(p), p.numel() * p.element_size(), p.requires_grad)
               for p in module.parameters()]
    local = sum(t.numel() * t.element_size() * (2 if trained else 1) for t, _, trained in weights)
    whole = sum(n * (2 if trained else 1) for _, n, trained in weights)
    for state in optimizer.state.values():
        for v in state.values():
            if torch.is_tensor(v) and v.dim() > 0:
                local += _local(v).numel() * v.element_size()
                whole += v.numel() * v.element_size()
    layers = decoder_layers(module)
    peaks: list = [None] * dist.get_world_size()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024      # kB on Linux
    dist.all_gather_object(peaks, [local, rss])
    return {"processes": dist.get_world_size(), "decoder_layers": len(layers),
            "decoder_layers_sharded": sum(isinstance(m, FSDPModule) for m in layers),
            "root_sharded": isinstance(module, FSDPModule), "state_bytes_whole": whole,
            "state_bytes_per_process": [b for b, _ in peaks],
            "peak_rss_bytes_per_process": [r for _, r in peaks]}


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole weights on the main process, in CPU memory (every process takes part; the
    others get an empty dict)."""
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
