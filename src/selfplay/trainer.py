"""The training loop on accelerate, shared by `selfplay sft` and `selfplay train`.

A stage starts (accelerator, seed, the trainable model), reads its items (pairs, or
sequences), then:
  prepare     the log-prob function wrapped for DDP / DeepSpeed / FSDP, optimizer, schedule,
              the global batch plan, and the state of an interrupted run (exact resume)
  loop        per update: `ga` micro-batches through the stage's step function (forward, loss,
              metrics), backward, clip, step; averaged metrics to JSONL and TensorBoard/W&B every
              logging_steps; resumable checkpoints every save_steps
  save_final  a Hugging Face checkpoint (full weights gathered once, or LoRA merged or alone)
The step function is all that differs between the stages.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from selfplay.config import (LoraSettings, ModelSettings, TrainingSettings, backfilled, changes,
                             describe_changes, recipe_of)
from selfplay.data.run_paths import ModelPaths
from selfplay.errors import SelfplayError
from selfplay.io import LOCK_NAME, write_json_atomic
from selfplay.launch import activation_checkpointing, sharding_for, training_accelerator
from selfplay.logprobs import ResponseLogProbs
from selfplay.metrics import MetricsLog
from selfplay.sharding import (clip_grad_norm, footprint, full_state_dict, load_checkpoint,
                               save_checkpoint, shard)
from selfplay.sharding import close as close_sharding
from selfplay.models import load_for_training, save_trained
from selfplay.tracking import check_reporting

# (forward, this process's item indices, the whole micro-batch's across processes) ->
# (loss to backpropagate, metrics, tokens);
# forward(batch) runs the wrapped log-prob function under autocast.
StepFn = Callable[[Callable[..., Any], list[int], list[int]],
                  tuple[torch.Tensor, dict[str, torch.Tensor], int]]


def start(model: ModelSettings, training: TrainingSettings, lora: LoraSettings,
          out: ModelPaths, seed: int):
    """(accelerator, trainable model, tokenizer): devices and process group, the seed, the
    model built for training (full, LoRA, QLoRA)."""
    check_reporting(training.report_to)
    sharded = sharding_for(training) is not None      # --fsdp, or an accelerate FSDP config
    if sharded and lora.load_in_4bit:
        raise SelfplayError("sharding (--fsdp, or an accelerate FSDP config) shards float "
                            "weights, and QLoRA's 4-bit weights (bitsandbytes) cannot be sharded "
                            "by it: train QLoRA without sharding (a model per process), or LoRA "
                            "sharded.")
    accelerator = training_accelerator(model, training)
    set_seed(seed)
    out.root.mkdir(parents=True, exist_ok=True)
    # Sharded, only the main process loads the weights, into CPU memory; the others build
    # the model's shape and receive their slices from it (sharding.shard).
    lm, tok = load_for_training(model.model_name_or_path, model.dtype, lora,
                                torch.device("cpu") if sharded else accelerator.device,
                                bf16=model.bf16,
                                gradient_checkpointing=activation_checkpointing(training),
                                shape_only=sharded and not accelerator.is_main_process)
    return accelerator, lm, tok


def epoch_batches(lengths: list[int], per_device: int, world: int, seed: int, epoch: int,
                  group_by_length: bool = True) -> list[list[int]]:
    """The global batches (per_device x world item indices each) of one epoch.

    A seeded permutation of the items (the same seed and epoch, the same order). With
    group_by_length, each run of 32 global batches is sorted by item length before it is cut,
    and the batches are then shuffled: items of similar length share a batch, so padding
    shrinks (docs/benchmarks.md measures it on SPIN pairs of the task suite). The last batch
    is filled from the start of the permutation when needed so that every process gets the
    same number of items.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    size = per_device * world
    if group_by_length:
        mega = size * 32
        perm = [i for s in range(0, len(perm), mega)
                for i in sorted(perm[s:s + mega], key=lambda i: -lengths[i])]
    batches = [perm[s:s + size] for s in range(0, len(perm), size)]
    short = -len(batches[-1]) % world
    batches[-1] = batches[-1] + perm[:short]
    if group_by_length:
        order = torch.randperm(len(batches), generator=g).tolist()
        batches = [batches[i] for i in order]
    return batches


def _optimizer(training: TrainingSettings, params):
    if training.optim == "rmsprop":   # the paper's choice; torch defaults alpha 0.99, eps 1e-8
        return torch.optim.RMSprop(params, lr=training.learning_rate,
                                   weight_decay=training.weight_decay)
    return torch.optim.AdamW(params, lr=training.learning_rate, weight_decay=training.weight_decay)


@dataclass
class Run:
    """What the loop needs, made by `prepare`."""
    accelerator: Accelerator
    wrapped: torch.nn.Module        # the model's log-prob function, prepared or sharded
    tok: Any
    optimizer: Any
    scheduler: Any
    params: list[torch.nn.Parameter]
    batches_of: Callable[[int], list[list[int]]]
    per_epoch: int                  # updates per epoch
    total: int                      # updates in all
    step: int                       # updates done (> 0 when resumed)
    recipe: dict[str, Any]          # what the updates depend on; a checkpoint keeps it
    sharded: bool = False           # FSDP2 (sharding.py), applied by us


def content_hash(items: list) -> str:
    """What the items hold (their tokens, stored log-probs, probabilities), as 16 hex digits:
    a resumed training must read the same, not merely as many tokens."""
    return hashlib.sha256(repr(items).encode()).hexdigest()[:16]


def prepare(accelerator: Accelerator, model, tok, lengths: list[int], content: str,
            training: TrainingSettings, chunk_size: int, out: ModelPaths, seed: int,
            before_restore: Callable[[torch.nn.Module], None] | None = None) -> Run:
    """Wrap, plan and (with training.resume) restore; `lengths` are the items' token counts,
    `content` the content_hash of what they hold.
    `before_restore` gets the wrapped log-prob module while it still holds the starting
    weights (the reference pass: under FSDP and ZeRO-3 the unwrapped model's weights are
    partitioned or, off the main process, not loaded)."""
    wrapped = ResponseLogProbs(model, chunk_size)
    sharding = sharding_for(training)
    if sharding is not None:       # ours, not accelerate's: it wraps the optimizer alone
        wrapped = shard(wrapped, sharding, accelerator.device, accelerator.is_main_process)
        params = [p for p in wrapped.parameters() if p.requires_grad]
        optimizer = accelerator.prepare(_optimizer(training, params))
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = _optimizer(training, params)
        ds = accelerator.state.deepspeed_plugin
        if ds is not None:        # DeepSpeed reads the batch off a dataloader; ours is not one
            ds.deepspeed_config["train_micro_batch_size_per_gpu"] = \
                training.per_device_train_batch_size
        wrapped, optimizer = accelerator.prepare(wrapped, optimizer)
    if before_restore is not None:
        before_restore(wrapped)
    ga = training.gradient_accumulation_steps

    def batches_of(epoch: int) -> list[list[int]]:
        return epoch_batches(lengths, training.per_device_train_batch_size,
                             accelerator.num_processes, seed, epoch, training.group_by_length)

    # An update is exactly `ga` batches; an epoch's few leftover batches (< ga) are dropped.
    per_epoch = len(batches_of(0)) // ga
    if per_epoch == 0:
        raise SelfplayError(f"{len(lengths)} items make fewer batches than "
                            f"--gradient_accumulation_steps {ga}.")
    total = training.max_steps or math.ceil(training.num_train_epochs * per_epoch)
    # Stepped by hand once per update: accelerate's wrapper would step it once per process.
    scheduler = get_scheduler(training.lr_scheduler_type, optimizer,
                              num_warmup_steps=math.ceil(training.warmup_ratio * total),
                              num_training_steps=total)
    accelerator.register_for_checkpointing(scheduler)

    recipe = _recipe(training, lengths, content, seed, accelerator.num_processes,
                     sharding is not None)
    step = 0
    if training.resume and out.saved_checkpoints():
        last = out.saved_checkpoints()[-1]
        state = json.loads((last / "trainer_state.json").read_text())
        _same_recipe(state.get("recipe", recipe), recipe, last)
        if sharding is not None:
            load_checkpoint(wrapped, optimizer.optimizer, scheduler, last)
        else:
            accelerator.load_state(str(last))
        step = state["step"]
        if accelerator.is_main_process:
            print(f"resuming from {last} (update {step} of {total})", file=sys.stderr)
    return Run(accelerator, wrapped, tok, optimizer, scheduler, params, batches_of, per_epoch,
               total, step, recipe, sharding is not None)


def _recipe(training: TrainingSettings, lengths: list[int], content: str, seed: int,
            processes: int, sharded: bool) -> dict[str, Any]:
    """The training options, seed, process count and data (its items' token counts, and the
    hash of what they hold) that a resumed training must share with its checkpoint. A sharded
    checkpoint loads on any process count: it keeps the global batch instead."""
    data = hashlib.sha256(json.dumps(lengths).encode()).hexdigest()[:16]
    recipe = {**recipe_of(dataclasses.asdict(training)), "seed": seed,
              "processes": processes, "items": len(lengths), "data": data, "content": content}
    if sharded:
        recipe["global_batch"] = recipe.pop("per_device_train_batch_size") * recipe.pop(
            "processes")
        recipe["fsdp"] = True           # an accelerate FSDP config asks for it too
    return recipe


def _same_recipe(old: dict[str, Any], new: dict[str, Any], checkpoint: Path) -> None:
    """Refuse to resume a checkpoint under other options: the run would mix two recipes."""
    # Checkpoints of selfplay before d75f237 (2026-12-05) kept the data as its token counts
    # alone ("data"): compared on those, and on options added since at their defaults.
    old = backfilled({"content": new["content"], **old}, new, "train")
    diff = changes(old, new)
    if {"data", "items", "content"} & set(diff):
        raise SelfplayError(
            f"{checkpoint} was made on other data (the content of the pairs or examples read "
            "now differs: the dataset changed since); resume on the data it was made on, or "
            "pass --overwrite to start over; nothing was deleted.")
    if diff:
        raise SelfplayError(
            f"{checkpoint} was made with other options ({describe_changes(old, new, diff)}); "
            "resume with the same options, or pass --overwrite to start over; nothing was "
            "deleted.")


def loop(r: Run, training: TrainingSettings, out: ModelPaths, step_fn: StepFn) -> int:
    """Train from update r.step to r.total; returns the last update's number."""
    acc_ = r.accelerator
    dev, rank, world = acc_.device, acc_.process_index, acc_.num_processes
    ga, step = training.gradient_accumulation_steps, r.step
    log = MetricsLog(r, training, out)

    def forward(batch: dict[str, torch.Tensor]):
        with acc_.autocast():
            return r.wrapped(**{k: v.to(dev) for k, v in batch.items()})

    bar = tqdm(total=r.total, initial=step, desc="train", unit="step",
               disable=not acc_.is_local_main_process, mininterval=1.0)
    micro: dict[str, list[torch.Tensor]] = {}
    epoch = step // r.per_epoch
    while step < r.total:
        skip = (step - epoch * r.per_epoch) * ga
        for gbatch in r.batches_of(epoch)[skip:r.per_epoch * ga]:
            share = len(gbatch) // world
            with acc_.accumulate(r.wrapped):
                if r.sharded:       # FSDP2 reduce-scatters after the update's last batch only
                    r.wrapped.set_requires_gradient_sync(acc_.sync_gradients)
                loss, metrics, n_tok = step_fn(forward, gbatch[rank * share:(rank + 1) * share],
                                               gbatch)
                acc_.backward(loss)
                for k, v in metrics.items():
                    micro.setdefault(k, []).append(v)
                log.tokens += n_tok
                if acc_.sync_gradients:
                    clip = clip_grad_norm if r.sharded else acc_.clip_grad_norm_
                    norm = torch.as_tensor(clip(r.params, training.max_grad_norm or float("inf")),
                                           dtype=torch.float32, device=dev)
                    _stop_if_not_finite(acc_, torch.stack(micro["loss"]), norm, step + 1, out)
                    micro.setdefault("grad_norm", []).append(norm)
                r.optimizer.step()
                if acc_.sync_gradients:
                    r.scheduler.step()
                r.optimizer.zero_grad()
            if not acc_.sync_gradients:
                continue
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{log.update(step, micro):.4f}")
            micro = {}
            if training.save_steps and step % training.save_steps == 0 and step < r.total:
                _save_checkpoint(r, out, step)
            if step >= r.total:
                break
        epoch += 1
    bar.close()
    log.close()
    return step


def _stop_if_not_finite(accelerator, losses: torch.Tensor, norm: torch.Tensor, update: int,
                        out: ModelPaths) -> None:
    """Stop before an update whose loss or gradient norm is not finite on any process: a
    broken model is never stepped into, saved, or marked complete."""
    bad = (~torch.isfinite(losses)).any() | ~torch.isfinite(norm)
    if accelerator.reduce(bad.float(), reduction="sum").item() == 0:
        return
    last = out.saved_checkpoints()
    raise SelfplayError(
        f"update {update}: the loss ({losses.float().mean().item():.4g}) or the gradient norm "
        f"({norm.item():.4g}) is not finite; training stopped before applying it and nothing "
        f"was saved as complete; the last good checkpoint is "
        f"{last[-1] if last else 'none (see --save_steps)'}; lower --learning_rate or --beta, "
        "or look for broken rows in the data.")


def _save_checkpoint(r: Run, out: ModelPaths, step: int) -> None:
    """A resumable checkpoint, written to a temporary name and renamed when complete: sharded
    (each process its own shard) or accelerate's state."""
    accelerator = r.accelerator
    final = out.checkpoint(step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if r.sharded:
        save_checkpoint(r.wrapped, r.optimizer.optimizer, r.scheduler, tmp)
    else:
        accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "recipe": r.recipe}))
        tmp.rename(final)
    accelerator.wait_for_everyone()


def save_final(r: Run, lora: LoraSettings, base: ModelSettings, out: ModelPaths,
               record: dict[str, Any]) -> None:
    """The trained model in out.root, `record` in training_complete.json, checkpoints gone."""
    acc_ = r.accelerator
    acc_.wait_for_everyone()
    model, state = acc_.unwrap_model(r.wrapped).model, None
    if r.sharded:           # every process takes part: the whole weights, on the main one
        record = {**record, "sharding": footprint(r.wrapped, r.optimizer.optimizer)}
        if acc_.is_main_process:
            f = record["sharding"]
            print(f"sharded over {f['processes']} processes: each held at most "
                  f"{max(f['state_bytes_per_process']) / 2**20:.0f} MiB of the "
                  f"{f['state_bytes_whole'] / 2**20:.0f} MiB of weights, gradients and "
                  "optimizer state", file=sys.stderr)
        state = {k[len("model."):]: v for k, v in full_state_dict(r.wrapped).items()
                 if k.startswith("model.")}
        if lora.use_peft and acc_.is_main_process:
            # merged or saved alone by PEFT, from a plain copy that holds the whole weights
            model, _ = load_for_training(base.model_name_or_path, base.dtype, lora,
                                         torch.device("cpu"))
            model.load_state_dict(state)
            state = None
    elif not lora.use_peft:   # every process takes part: it gathers ZeRO-3's partitions
        state = {k[len("model."):]: v for k, v in acc_.get_state_dict(r.wrapped).items()
                 if k.startswith("model.")}
    if acc_.is_main_process:
        save_trained(model, r.tok, out.root, lora, base.model_name_or_path, state, out.adapter)
        write_json_atomic(out.complete, record)
        shutil.rmtree(out.checkpoints, ignore_errors=True)
    acc_.wait_for_everyone()


def releases_group(stage):
    """A training stage that closes the one-process group sharding may have made for it, on
    its way out, failed or not (the next training in the same process makes its own)."""
    @functools.wraps(stage)
    def wrapper(*args, **kwargs):
        try:
            return stage(*args, **kwargs)
        finally:
            close_sharding()
    return wrapper


def skip_if_complete(out: ModelPaths, overwrite: bool) -> bool:
    """True when out holds a finished model to keep (nothing is trained or deleted)."""
    if out.complete.exists() and not overwrite:
        print(f"{out.root} holds a finished model; skipping (--overwrite to train again).",
              file=sys.stderr)
        return True
    return False


def _ours(out: ModelPaths) -> bool:
    """Proof that we wrote out.root: our marker, or our own records (a model directory of
    selfplay before 7e57f44, 2026-11-23, has no marker)."""
    return out.marker.exists() or out.complete.exists() or out.log.exists() or \
        out.checkpoints.exists()


def claim(accelerator: Accelerator, out: ModelPaths, *, overwrite: bool, resume: bool) -> None:
    """Take out.root for this training, once its inputs are read and valid.

    Never deletes what we did not write: a directory holding other files is refused. With
    overwrite, our earlier outputs are cleared; without resume, an interrupted training's
    checkpoints are kept and the command refuses, naming --resume and --overwrite.
    """
    entries = [p for p in out.root.iterdir() if p.name != LOCK_NAME] \
        if out.root.exists() else []           # the command's own lock is not an output
    others = sorted(p.name for p in entries)
    if others and not _ours(out):
        raise SelfplayError(f"{out.root} holds files that selfplay did not write "
                            f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); "
                            "nothing was deleted; give another --output_dir.")
    if not overwrite and not resume and out.saved_checkpoints():
        last = out.saved_checkpoints()[-1]
        raise SelfplayError(f"{out.root} holds an interrupted training (checkpoint {last.name}); "
                            "pass --resume to continue it, or --overwrite to start over; nothing "
                            "was deleted.")
    accelerator.wait_for_everyone()       # every process has looked before anything goes
    if accelerator.is_main_process:
        if overwrite:           # entry by entry: the lock stays; a linked entry is unlinked
            for p in entries:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        out.root.mkdir(parents=True, exist_ok=True)
        out.marker.touch()
    accelerator.wait_for_everyone()
