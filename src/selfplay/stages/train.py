"""`selfplay train` (SPIN step 2): θ_{t+1} from θ_t on preference pairs, θ_t as the reference,
one model in memory.

`setup` does everything before the first step:
  1. pairs: read (several datasets mix by share), tokenize once, truncate, count truncations
  2. model: full fine-tuning, LoRA, or QLoRA (models.load_for_training)
  3. reference log-probs: the ones stored with the pairs when their stamp matches this
     reference under these truncation settings; otherwise computed once, before the first
     step, with the starting weights (the adapter disabled under LoRA), and cached in the
     output directory with a fingerprint, so that a resumed run does not recompute them from
     weights that have moved
  4. accelerate: devices, DDP / DeepSpeed / FSDP from an accelerate config, mixed precision;
     optimizer, schedule, and the state of an interrupted run
`loop` is the training loop: one forward pass for [chosen; rejected], loss, backward, clip,
step, metrics, resumable checkpoints every save_steps. `train` runs both and saves a Hugging
Face checkpoint (merged LoRA by default).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm
from transformers import get_scheduler

from selfplay.config import (DataSettings, LoraSettings, ModelSettings, ScoringSettings,
                             TrainingSettings)
from selfplay.data.pairs import PreferencePair, ScoreStamp, read_pairs
from selfplay.data.run_layout import ModelLayout
from selfplay.data.shards import write_json_atomic
from selfplay.errors import SelfplayError
from selfplay.logprobs import ResponseLogProbs, response_logps
from selfplay.losses import pair_loss
from selfplay.models import fingerprint, load_for_training, load_model, save_trained
from selfplay.rendering import Encoded, collate, prompt_ids, response_ids, truncate

# The loss arguments each SPPO loss takes, and the pair fields they come from.
LOSS_PROBS = {"sppo": {"p_win": "chosen_probs_win", "p_lose": "chosen_probs_lose"},
              "sppo_single": {"p_chosen": "chosen_probs"}}


@dataclass
class TrainPair:
    """A pair as the trainer sees it: tokenized, truncated, with θ_t's log-probs."""
    record: PreferencePair
    chosen: Encoded              # SPIN: the dataset's answer ("real")
    rejected: Encoded            # SPIN: θ_t's answer ("generated")
    ref_chosen: float | None = None
    ref_rejected: float | None = None


@dataclass
class SourceStats:
    dataset: str
    fraction: float
    pairs: int
    skipped_rows: int


@dataclass
class PairStats:
    sources: list[SourceStats] = field(default_factory=list)
    truncated: int = 0
    stored_reference: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"sources": [vars(s) for s in self.sources], "truncated": self.truncated,
                "stored_reference": self.stored_reference}


# ---------------------------------------------------------------------------------------
# 1. Pairs
# ---------------------------------------------------------------------------------------

def load_pairs(sources: list[tuple[str, float]], data: DataSettings, scoring: ScoringSettings,
               loss_type: str, reference: ScoreStamp | None, tokenizer
               ) -> tuple[list[TrainPair], PairStats]:
    """Read and tokenize the pairs of every (dataset, share); use stored reference log-probs
    whose stamp matches `reference` (the same weights and truncation; None: never, as under
    QLoRA, whose starting policy is the 4-bit base, not the model that scored the pairs)."""
    pairs: list[TrainPair] = []
    stats = PairStats()
    need = LOSS_PROBS.get(loss_type, {})
    for src, share in sources:
        records, res = read_pairs(src, data.split, data)
        n = int(share * len(records))
        stats.sources.append(SourceStats(src, share, n, len(res.skipped)))
        for rec in records[:n]:
            p = prompt_ids(tokenizer, rec.prompt)
            pair = TrainPair(
                rec, truncate(p, response_ids(tokenizer, rec.chosen), scoring.max_length,
                              scoring.max_prompt_length),
                truncate(p, response_ids(tokenizer, rec.rejected), scoring.max_length,
                         scoring.max_prompt_length))
            if reference is not None and rec.has_reference and reference.matches(rec.scored_with):
                pair.ref_chosen, pair.ref_rejected = rec.ref_logp_chosen, rec.ref_logp_rejected
                stats.stored_reference += 1
            missing = [f for f in need.values() if getattr(rec, f) is None]
            if missing:
                raise SelfplayError(f"{src}: --loss_type {loss_type} needs the columns "
                                    f"{', '.join(need.values())} (SPPO pairs, as `selfplay rank` "
                                    f"and `convert` write them); row {rec.prompt_id} lacks "
                                    f"{', '.join(missing)}.")
            stats.truncated += pair.chosen.truncated or pair.rejected.truncated
            pairs.append(pair)
    if not pairs:
        raise SelfplayError(f"--dataset {','.join(s for s, _ in sources)!r} gave no pairs.")
    return pairs, stats


# ---------------------------------------------------------------------------------------
# 3. Reference log-probs, computed once
# ---------------------------------------------------------------------------------------

def _fingerprint(reference: ScoreStamp, load_in_4bit: bool, pairs: list[TrainPair]) -> str:
    """The identity of a reference pass: the reference's weights, truncation, and tokens."""
    h = hashlib.sha256(f"{reference.fingerprint}|{reference.max_length}|"
                       f"{reference.max_prompt_length}|{load_in_4bit}".encode())
    for p in pairs:
        h.update(repr((p.chosen.input_ids, p.rejected.input_ids)).encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def compute_reference(model, pairs: list[TrainPair], pad_id: int, batch_size: int, chunk: int,
                      accelerator) -> None:
    """θ_t's log-probs for pairs that have none stored; each process scores a slice."""
    todo = [i for i, p in enumerate(pairs) if p.ref_chosen is None]
    if not todo:
        return
    ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    was_training = model.training
    model.eval()
    results: list[tuple[int, float, float]] = []
    with accelerator.split_between_processes(todo) as mine, ctx:
        bar = tqdm(total=len(mine), desc="reference log-probs", unit="pair",
                   disable=not accelerator.is_local_main_process, mininterval=1.0)
        order = sorted(mine, key=lambda i: -len(pairs[i].chosen.input_ids))
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            seqs = [pairs[i].chosen for i in idx] + [pairs[i].rejected for i in idx]
            b = {k: v.to(accelerator.device) for k, v in collate(seqs, pad_id).items()}
            with accelerator.autocast():
                lp, _ = response_logps(model, b["input_ids"], b["attention_mask"],
                                       b["response_mask"], chunk)
            w, l = lp.float().cpu().chunk(2)
            results += list(zip(idx, w.tolist(), l.tolist()))
            bar.update(len(idx))
        bar.close()
    for i, w, l in gather_object(results):
        pairs[i].ref_chosen, pairs[i].ref_rejected = w, l
    model.train(was_training)


def reference_logps(model, pairs: list[TrainPair], pad_id: int, accelerator, out: ModelLayout,
                    *, start: ModelSettings, reference: ScoreStamp, chunk: int,
                    training: TrainingSettings, load_in_4bit: bool) -> None:
    """Fill every pair's reference log-probs: from the cache, the pairs, or computed once."""
    fp = _fingerprint(reference, load_in_4bit, pairs)
    if out.reference_cache.exists():
        data = json.loads(out.reference_cache.read_text())
        if data["fingerprint"] == fp:
            for p, w, l in zip(pairs, data["chosen"], data["rejected"]):
                p.ref_chosen, p.ref_rejected = w, l
            return
    elif training.resume and any(p.ref_chosen is None for p in pairs) and \
            out.checkpoints.exists():
        raise SelfplayError(f"{out.root} has checkpoints but no {out.reference_cache.name}: the "
                            "reference log-probs of θ_t cannot be recomputed from moved weights; "
                            "start over with --overwrite.")
    batch = training.per_device_train_batch_size * 2
    if reference.fingerprint != fingerprint(start.model_name_or_path):
        # θ_t is not the starting point (start_from: sft): load it for this pass only.
        ref, _ = load_model(reference.model, str(accelerator.device), start.dtype)
        compute_reference(ref, pairs, pad_id, batch, chunk, accelerator)
        del ref
    else:
        compute_reference(model, pairs, pad_id, batch, chunk, accelerator)
    if accelerator.is_main_process:
        write_json_atomic(out.reference_cache,
                          {"fingerprint": fp, "chosen": [p.ref_chosen for p in pairs],
                           "rejected": [p.ref_rejected for p in pairs]})
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------
# 4. Setup
# ---------------------------------------------------------------------------------------

def epoch_batches(lengths: list[int], per_device: int, world: int, seed: int, epoch: int,
                  group_by_length: bool = True) -> list[list[int]]:
    """The global batches (per_device x world pair indices each) of one epoch.

    A seeded permutation of the pairs (the same seed and epoch, the same order). With
    group_by_length, each run of 32 global batches is sorted by pair length before it is cut,
    and the batches are then shuffled: pairs of similar length share a batch, so padding
    shrinks (random batches of SPIN pairs on the task suite pad to 2.5x their tokens, grouped
    ones to 1.3x). The last batch is filled from the start of the permutation when needed so
    that every process gets the same number of pairs.
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


def _checkpoints(out: ModelLayout) -> list[Path]:
    d = out.checkpoints
    return sorted(p for p in d.glob("step-*") if (p / "trainer_state.json").exists()) \
        if d.exists() else []


@dataclass
class Run:
    """What the loop needs, made by `setup`."""
    accelerator: Accelerator
    model: torch.nn.Module          # the model being trained (PEFT-wrapped under LoRA)
    wrapped: torch.nn.Module        # its log-prob function, as accelerate prepared it
    tok: Any
    optimizer: Any
    scheduler: Any
    params: list[torch.nn.Parameter]
    pairs: list[TrainPair]
    stats: PairStats
    batches_of: Callable[[int], list[list[int]]]
    per_epoch: int                  # updates per epoch
    total: int                      # updates in all
    step: int                       # updates done (> 0 when resumed)


def setup(model: ModelSettings, data: DataSettings, sources: list[tuple[str, float]],
          scoring: ScoringSettings, training: TrainingSettings, lora: LoraSettings,
          out: ModelLayout, seed: int) -> Run:
    accelerator = Accelerator(cpu=model.device == "cpu" or not torch.cuda.is_available(),
                              mixed_precision="bf16" if training.bf16 else "no",
                              gradient_accumulation_steps=training.gradient_accumulation_steps)
    set_seed(seed)
    out.root.mkdir(parents=True, exist_ok=True)
    main = accelerator.is_main_process

    lm, tok = load_for_training(model.model_name_or_path, model.dtype, lora, accelerator.device,
                                bf16=training.bf16,
                                gradient_checkpointing=training.gradient_checkpointing)
    ref_spec = training.reference_model or model.model_name_or_path
    reference = ScoreStamp(ref_spec, scoring.max_length, scoring.max_prompt_length,
                           fingerprint(ref_spec))
    pairs, stats = load_pairs(sources, data, scoring, training.loss_type,
                              None if lora.load_in_4bit else reference, tok)
    if main:
        print(f"{len(pairs)} pairs; {stats.truncated} truncated to max_length "
              f"{scoring.max_length} / max_prompt_length {scoring.max_prompt_length}; "
              f"{stats.stored_reference} with stored reference log-probs", file=sys.stderr)
    reference_logps(lm, pairs, tok.pad_token_id, accelerator, out, start=model,
                    reference=reference, chunk=scoring.logprob_chunk_size, training=training,
                    load_in_4bit=lora.load_in_4bit)

    wrapped = ResponseLogProbs(lm, scoring.logprob_chunk_size)
    params = [p for p in lm.parameters() if p.requires_grad]
    optimizer = _optimizer(training, params)
    wrapped, optimizer = accelerator.prepare(wrapped, optimizer)
    lengths = [max(len(p.chosen.input_ids), len(p.rejected.input_ids)) for p in pairs]
    ga = training.gradient_accumulation_steps

    def batches_of(epoch: int) -> list[list[int]]:
        return epoch_batches(lengths, training.per_device_train_batch_size,
                             accelerator.num_processes, seed, epoch, training.group_by_length)

    # An update is exactly `ga` batches; an epoch's few leftover batches (< ga) are dropped.
    per_epoch = len(batches_of(0)) // ga
    if per_epoch == 0:
        raise SelfplayError(f"{len(pairs)} pairs make fewer batches than "
                            f"--gradient_accumulation_steps {ga}.")
    total = training.max_steps or math.ceil(training.num_train_epochs * per_epoch)
    # Stepped by hand once per update: accelerate's wrapper would step it once per process.
    scheduler = get_scheduler(training.lr_scheduler_type, optimizer,
                              num_warmup_steps=math.ceil(training.warmup_ratio * total),
                              num_training_steps=total)
    accelerator.register_for_checkpointing(scheduler)

    step = 0
    if not training.resume and main:
        shutil.rmtree(out.checkpoints, ignore_errors=True)   # stale, from an earlier run
    if training.resume and _checkpoints(out):
        last = _checkpoints(out)[-1]
        accelerator.load_state(str(last))
        step = json.loads((last / "trainer_state.json").read_text())["step"]
        if main:
            print(f"resuming from {last} (update {step} of {total})", file=sys.stderr)
    return Run(accelerator, lm, wrapped, tok, optimizer, scheduler, params, pairs, stats,
               batches_of, per_epoch, total, step)


# ---------------------------------------------------------------------------------------
# 5. The loop
# ---------------------------------------------------------------------------------------

def _metrics(loss_vec, pw, pl, rw, rl, beta, names=("real", "generated")
             ) -> dict[str, torch.Tensor]:
    """The official SPIN metrics (SPPO names the pair chosen/rejected)."""
    w, l = names
    real, gen = beta * (pw - rw).detach(), beta * (pl - rl).detach()
    return {"loss": loss_vec.detach().mean(), f"rewards/{w}": real.mean(),
            f"rewards/{l}": gen.mean(), "rewards/margins": (real - gen).mean(),
            "rewards/accuracies": (real > gen).float().mean(),
            f"logps/{w}": pw.detach().mean(), f"logps/{l}": pl.detach().mean()}


def loop(r: Run, training: TrainingSettings, out: ModelLayout) -> int:
    """Train from update r.step to r.total; returns the last update's number."""
    acc_, main = r.accelerator, r.accelerator.is_main_process
    dev, rank, world = acc_.device, acc_.process_index, acc_.num_processes
    ga, step = training.gradient_accumulation_steps, r.step
    if main:   # a resumed run rewrites what came after its checkpoint, never duplicates it
        kept = [ln for ln in (out.log.read_text().splitlines() if out.log.exists() else [])
                if json.loads(ln)["step"] <= step]
        out.log.write_text("".join(ln + "\n" for ln in kept))
        tb = SummaryWriter(str(out.tensorboard), purge_step=step + 1 if step else None)

    bar = tqdm(total=r.total, initial=step, desc="train", unit="step",
               disable=not acc_.is_local_main_process, mininterval=1.0)
    window: dict[str, list[float]] = {}
    micro: dict[str, list[torch.Tensor]] = {}
    t0, tokens = time.perf_counter(), 0
    names = ("chosen", "rejected") if training.loss_type.startswith("sppo") \
        else ("real", "generated")
    probs_of = LOSS_PROBS.get(training.loss_type, {})
    epoch = step // r.per_epoch
    while step < r.total:
        skip = (step - epoch * r.per_epoch) * ga
        for gbatch in r.batches_of(epoch)[skip:r.per_epoch * ga]:
            share = len(gbatch) // world
            ps = [r.pairs[i] for i in gbatch[rank * share:(rank + 1) * share]]
            batch = {k: v.to(dev) for k, v in collate(
                [p.chosen for p in ps] + [p.rejected for p in ps], r.tok.pad_token_id).items()}
            rw = torch.tensor([p.ref_chosen for p in ps], device=dev)
            rl = torch.tensor([p.ref_rejected for p in ps], device=dev)
            with acc_.accumulate(r.wrapped):
                with acc_.autocast():
                    logps, _ = r.wrapped(**batch)          # one forward for [chosen; rejected]
                pw, pl = logps.float().chunk(2)
                probs = {arg: torch.tensor([getattr(p.record, f) for p in ps], device=dev,
                                           dtype=torch.float32) for arg, f in probs_of.items()}
                loss_vec = pair_loss(training.loss_type, pw, pl, rw, rl, training.beta, **probs)
                acc_.backward(loss_vec.mean())
                for k, v in _metrics(loss_vec, pw, pl, rw, rl, training.beta, names).items():
                    micro.setdefault(k, []).append(v)
                tokens += int(batch["attention_mask"].sum())
                if acc_.sync_gradients:
                    norm = acc_.clip_grad_norm_(r.params, training.max_grad_norm or float("inf"))
                    micro.setdefault("grad_norm", []).append(
                        torch.as_tensor(norm, dtype=torch.float32, device=dev))
                r.optimizer.step()
                if acc_.sync_gradients:
                    r.scheduler.step()
                r.optimizer.zero_grad()
            if not acc_.sync_gradients:
                continue
            step += 1
            for k, vs in micro.items():    # mean over micro-batches, then over processes
                window.setdefault(k, []).append(
                    acc_.reduce(torch.stack(vs).mean(), reduction="mean").item())
            micro = {}
            bar.update(1)
            bar.set_postfix(loss=f"{window['loss'][-1]:.4f}")
            if step % training.logging_steps == 0 or step == r.total:
                rec = {"step": step, "epoch": round(step / r.per_epoch, 4),
                       "learning_rate": r.scheduler.get_last_lr()[0],
                       **{k: sum(v) / len(v) for k, v in window.items()},
                       "tokens_per_s": tokens * world / (time.perf_counter() - t0),
                       "elapsed_s": time.perf_counter() - t0}
                window = {}
                if main:
                    with out.log.open("a") as fh:
                        fh.write(json.dumps(rec) + "\n")
                    for k, v in rec.items():
                        if k != "step":
                            tb.add_scalar(k, v, step)
            if training.save_steps and step % training.save_steps == 0 and step < r.total:
                _save_checkpoint(acc_, out, step)
            if step >= r.total:
                break
        epoch += 1
    bar.close()
    if main:
        tb.close()
    return step


def _save_checkpoint(accelerator, out: ModelLayout, step: int) -> None:
    final = out.checkpoint(step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
        tmp.rename(final)
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------

def train(model: ModelSettings, data: DataSettings, sources: list[tuple[str, float]],
          scoring: ScoringSettings, training: TrainingSettings, lora: LoraSettings,
          out_dir: Path, *, seed: int, overwrite: bool = False) -> Path:
    """Train on the pairs of `sources` (dataset, share used); returns the output directory,
    a Hugging Face checkpoint."""
    out = ModelLayout(Path(out_dir))
    if out.complete.exists() and not overwrite:
        print(f"{out.root} holds a finished model; skipping (--overwrite to train again).",
              file=sys.stderr)
        return out.root
    if overwrite and out.root.exists():
        shutil.rmtree(out.root)
    r = setup(model, data, sources, scoring, training, lora, out, seed)
    step = loop(r, training, out)
    _save_final(r, lora, model.model_name_or_path, out, step)
    return out.root


def _save_final(r: Run, lora: LoraSettings, base_spec: str, out: ModelLayout,
                step: int) -> None:
    acc_ = r.accelerator
    acc_.wait_for_everyone()
    state = None
    if not lora.use_peft:   # every process takes part: it gathers ZeRO-3 / FSDP shards
        state = {k[len("model."):]: v for k, v in acc_.get_state_dict(r.wrapped).items()
                 if k.startswith("model.")}
    if acc_.is_main_process:
        save_trained(acc_.unwrap_model(r.wrapped).model, r.tok, out.root, lora, base_spec,
                     state, out.adapter)
        write_json_atomic(out.complete, {"steps": step, **r.stats.to_json()})
        shutil.rmtree(out.checkpoints, ignore_errors=True)
    acc_.wait_for_everyone()
