"""Processes and devices, decided in one place: the process group a launcher made, the device
each process works on, launches that would not do what they ask for, the accelerator a
training runs on, and whether it is sharded (sharding.py applies FSDP2).

Processes come from `accelerate launch` or `torchrun` (several machines: --num_machines /
--nnodes); without a launcher a command is one process. Generation, ranking, evaluation and
training use every process (each its own share of the prompts; data-parallel or sharded
training); what `selfplay run` does besides (convert, the report, the manifest) runs on the
main process while the others wait (`Processes.on_main`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from datetime import timedelta

import accelerate
import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list

from selfplay.config import ModelSettings, TrainingSettings
from selfplay.errors import SelfplayError
from selfplay.sharding import Sharding


def world_size() -> int:
    """The processes the launcher started (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _launcher_asks(kind: str) -> bool:
    """Whether the accelerate config asks for FSDP or DEEPSPEED."""
    return os.environ.get(f"ACCELERATE_USE_{kind}", "").lower() in ("1", "true")


def on_cpu(model: ModelSettings) -> bool:
    """Whether the processes work on the CPU: asked for, or no GPU to be had. On the CPU,
    accelerate forms a gloo process group."""
    return model.device == "cpu" or not torch.cuda.is_available()


def process_state(model: ModelSettings | None = None,
                  wait_hours: float | None = None) -> PartialState:
    """The launched processes as accelerate sees them, checked (check_launch); on the
    model's device (without one: a GPU when there is one). `wait_hours`: how long a
    collective may wait, when the others wait on the main process's work (a conversion, a
    report) far beyond the default (10 minutes on NCCL, 30 on gloo)."""
    kwargs = {"timeout": timedelta(hours=wait_hours)} if wait_hours else {}
    cpu = on_cpu(model) if model is not None else not torch.cuda.is_available()
    state = PartialState(cpu=cpu, **kwargs)
    check_launch(state)
    return state


def check_launch(state, trains: bool = False) -> None:
    """Refuse a launch that would not do what it asks for. accelerate shards (FSDP, DeepSpeed)
    only on accelerators: on a machine without one, a sharding config runs as plain
    data-parallel processes (use_cpu: true) or as N processes that each think they are alone
    (use_cpu: false), each with the whole model, all writing the same outputs. `trains`: the
    state is the trainer's (only it knows whether sharding took effect)."""
    world = world_size()
    if world > 1 and state.num_processes == 1:
        raise SelfplayError(
            f"launched as {world} processes, but accelerate formed no process group here "
            f"(distributed type {state.distributed_type.name}): each would work alone and "
            "write the same outputs; without a GPU, launch with --multi_gpu (or use_cpu: true "
            "in the config).")
    if trains and world > 1 and _launcher_asks("DEEPSPEED") \
            and state.distributed_type.name != "DEEPSPEED":
        raise SelfplayError(
            f"the accelerate config asks for DEEPSPEED, but accelerate {accelerate.__version__} "
            f"runs {state.distributed_type.name} here (it shards only on GPUs and other "
            "accelerators), so the model would not be sharded; on CPU, shard with --fsdp true "
            "(or recipes/accelerate/fsdp.yaml), which runs on CPU processes too.")


def sharding_for(training: TrainingSettings) -> Sharding | None:
    """How the training is sharded, if it is: --fsdp, or an accelerate FSDP config, whose
    settings are read as accelerate sets them (FSDP_RESHARD_AFTER_FORWARD for FSDP2,
    FSDP_SHARDING_STRATEGY for FSDP1, FSDP_OFFLOAD_PARAMS). One code path either way: ours."""
    launcher = _launcher_asks("FSDP")
    if not (training.fsdp or launcher):
        return None
    reshard, offload = training.fsdp_reshard_after_forward, training.fsdp_cpu_offload
    if launcher:
        strategy = os.environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper()
        reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", str(
            strategy not in ("SHARD_GRAD_OP", "2"))).lower() == "true" and reshard
        offload = offload or os.environ.get("FSDP_OFFLOAD_PARAMS", "").lower() == "true"
    return Sharding(reshard_after_forward=reshard, cpu_offload=offload,
                    bf16_params=training.fsdp_bf16_params)


def activation_checkpointing(training: TrainingSettings) -> bool:
    """--gradient_checkpointing, or an accelerate FSDP config's activation checkpointing."""
    return training.gradient_checkpointing or (
        _launcher_asks("FSDP")
        and os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "").lower() == "true")


@contextlib.contextmanager
def _accelerate_plain():
    """accelerate's own FSDP would take the model from an FSDP config (on CPU it refuses to
    start); with the flag hidden while the accelerator is made, it forms the data-parallel
    group our FSDP2 shards over."""
    flag = os.environ.pop("ACCELERATE_USE_FSDP", None)
    try:
        yield
    finally:
        if flag is not None:
            os.environ["ACCELERATE_USE_FSDP"] = flag


def training_accelerator(model: ModelSettings, training: TrainingSettings) -> Accelerator:
    """The accelerator of one training: its device, mixed precision and plugins."""
    # A training's precision and plugins are its own: in one process (the stages of `selfplay
    # run`, a notebook, the tests) the last training's state would refuse another mixed
    # precision. The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    # Without a GPU, accelerate's CPU path; but a DeepSpeed launch of one process keeps
    # DeepSpeed, which has its own CPU accelerator, and so runs ZeRO-3's real code (how the
    # tests reach it without a GPU). Several processes would form no group under it: on the
    # CPU path they run MULTI_CPU, which check_launch refuses in words that say so.
    deepspeed_alone = _launcher_asks("DEEPSPEED") and world_size() == 1
    if sharding_for(training) is not None and _launcher_asks("DEEPSPEED"):
        raise SelfplayError("--fsdp shards with FSDP2, and the accelerate config asks for "
                            "DeepSpeed: choose one of the two.")
    with _accelerate_plain():
        accelerator = Accelerator(
            cpu=model.device == "cpu" or (on_cpu(model) and not deepspeed_alone),
            mixed_precision="bf16" if model.bf16 else "no",
            gradient_accumulation_steps=training.gradient_accumulation_steps)
    check_launch(accelerator.state, trains=True)
    sharding = sharding_for(training)
    if sharding is not None and sharding.cpu_offload and accelerator.device.type == "cpu":
        raise SelfplayError("--fsdp_cpu_offload keeps a GPU's sharded state in CPU memory; "
                            "these processes run on the CPU already: leave it off.")
    return accelerator


class Processes:
    """The processes of a run. Generation, ranking, evaluation and training use every
    process; everything else runs on the main process while the others wait, and its failure
    is raised on every process, so that none waits forever at the next stage."""

    def __init__(self, model: ModelSettings):
        # The others wait while the main process converts, reports, or runs lm-eval.
        self.state = process_state(model, wait_hours=12)
        self.main = self.state.is_main_process

    def wait(self) -> None:
        self.state.wait_for_everyone()

    def agree(self, decision: bool) -> bool:
        """The main process's decision, on every process (they read files that the main
        process may be rewriting)."""
        return self.share(decision)

    def say(self, line: str) -> None:
        """A line on stderr, once (the main process's)."""
        if self.main:
            print(line, file=sys.stderr)

    def share(self, value):
        """The main process's value, on every process."""
        if self.state.num_processes == 1:
            return value
        return broadcast_object_list([value])[0]

    def on_main(self, work) -> None:
        """work() on the main process; every process returns (or raises) when it has."""
        failed = [None]
        if self.main:
            try:
                work()
            except SelfplayError as e:
                failed = [str(e)]
            except BaseException as e:
                if self.state.num_processes == 1:
                    raise
                failed = [f"the main process failed: {type(e).__name__}: {e}"]
                print(f"[main process] {type(e).__name__}: {e}", file=sys.stderr)
        if self.state.num_processes > 1:
            broadcast_object_list(failed)            # also the barrier
        if failed[0]:
            raise SelfplayError(failed[0])
