"""Train θ_{t+1} from θ_t on preference pairs, θ_t as the reference, one model in memory.

Top to bottom:
  1. pairs: read (several datasets mix by fraction), tokenize once, truncate, count truncations
  2. model: full fine-tuning, LoRA, or QLoRA (4-bit NF4 base + LoRA)
  3. reference log-probs: the ones stored with the pairs when they were computed by this model
     under these truncation settings; otherwise computed once, before the first step, with the
     starting weights (the adapter disabled under LoRA), and cached in output_dir so that a
     resumed run does not recompute them from weights that have moved
  4. accelerate: devices, DDP / DeepSpeed / FSDP from an accelerate config, mixed precision
  5. the loop: one forward pass for [real; generated], loss, backward, clip, step, metrics,
     resumable checkpoints every save_steps
  6. a Hugging Face checkpoint in output_dir (merged LoRA by default)
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from selfplay.config import Config
from selfplay.data.formats import read_examples
from selfplay.errors import SelfplayError
from selfplay.logprobs import ResponseLogProbs, response_logps
from selfplay.losses import pair_loss
from selfplay.rendering import Encoded, collate, prompt_ids, response_ids, truncate

COMPLETE = "training_complete.json"
# The loss arguments each SPPO loss takes, and the columns of the official SPPO data they come
# from.
LOSS_PROBS = {"sppo": {"p_win": "chosen_probs_win", "p_lose": "chosen_probs_lose"},
              "sppo_single": {"p_chosen": "chosen_probs"}}
REF_CACHE = "reference_logps.json"


@dataclass
class Pair:
    prompt_id: str
    chosen: Encoded              # SPIN: the dataset's answer ("real")
    rejected: Encoded            # SPIN: θ_t's answer ("generated")
    ref_chosen: float | None = None
    ref_rejected: float | None = None
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# 1. Pairs
# ---------------------------------------------------------------------------------------

def parse_mixture(spec: str) -> list[tuple[str, float]]:
    """`a` or `a:1.0,b:0.5`: datasets and the share of each that is used (the paper trains
    iteration t on iteration t-1's and t's pairs)."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        path, _, frac = part.rpartition(":")
        try:
            f = float(frac)
        except ValueError:
            path, f = part, 1.0
        if not 0 < f <= 1:
            raise SelfplayError(f"--dataset {part!r}: the mixing fraction must lie in (0, 1].")
        out.append((path, f))
    return out


def _response_text(value, source: str) -> str:
    if isinstance(value, list):
        if not value or not isinstance(value[-1], dict) or value[-1].get("role") != "assistant":
            raise SelfplayError(f"{source}: a generated/rejected message list must end with an "
                                "assistant turn.")
        return value[-1]["content"]
    return str(value)


def load_pairs(cfg: Config, tokenizer) -> tuple[list[Pair], dict]:
    pairs: list[Pair] = []
    stats = {"sources": [], "truncated": 0, "stored_reference": 0}
    for src, frac in parse_mixture(cfg.dataset):
        res = read_examples(src, cfg.split, cfg.dataset_layout, cfg.reference_turn,
                            cfg.skip_bad_rows, cfg.max_prompts, cfg.tasks_seed,
                            cfg.tasks_train_size, cfg.tasks_test_size)
        n = int(frac * len(res.examples))
        stats["sources"].append({"dataset": src, "fraction": frac, "pairs": n,
                                 "skipped_rows": len(res.skipped)})
        for ex in res.examples[:n]:
            other = ex.extra.get("generated", ex.extra.get("rejected"))
            if other is None:
                raise SelfplayError(
                    f"{src} has prompts and answers but no generated (or rejected) responses to "
                    "train against; make pairs with `selfplay generate --score` and "
                    "`selfplay convert` first (or use `selfplay run`).")
            p = prompt_ids(tokenizer, ex.prompt)
            chosen = truncate(p, response_ids(tokenizer, ex.reference), cfg.max_length,
                              cfg.max_prompt_length)
            rejected = truncate(p, response_ids(tokenizer, _response_text(other, src)),
                                cfg.max_length, cfg.max_prompt_length)
            pair = Pair(ex.prompt_id, chosen, rejected, extra=ex.extra)
            e = ex.extra
            stored = (e.get("ref_logp_real", e.get("ref_logp_chosen")),
                      e.get("ref_logp_generated", e.get("ref_logp_rejected")))
            # Under QLoRA the starting policy is the 4-bit base, not the model that scored the
            # pairs: its own log-probs (adapter disabled) are the reference.
            if (not cfg.load_in_4bit and None not in stored
                    and e.get("score_model") == (cfg.reference_model or cfg.model_name_or_path)
                    and e.get("score_max_length") == cfg.max_length
                    and e.get("score_max_prompt_length") == cfg.max_prompt_length):
                pair.ref_chosen, pair.ref_rejected = stored
                stats["stored_reference"] += 1
            need = tuple(LOSS_PROBS.get(cfg.loss_type, {}).values())
            missing = [c for c in need if not isinstance(e.get(c), (int, float))]
            if missing:
                raise SelfplayError(f"{src}: --loss_type {cfg.loss_type} needs the columns "
                                    f"{', '.join(need)} (SPPO pairs, as `selfplay rank` and "
                                    f"`convert` write them); row {ex.prompt_id} lacks "
                                    f"{', '.join(missing)}.")
            stats["truncated"] += chosen.truncated or rejected.truncated
            pairs.append(pair)
    if not pairs:
        raise SelfplayError(f"--dataset {cfg.dataset!r} gave no pairs.")
    return pairs, stats


# ---------------------------------------------------------------------------------------
# 2. Model
# ---------------------------------------------------------------------------------------

def load_for_training(cfg: Config, device: torch.device):
    from transformers import AutoModelForCausalLM

    from selfplay.models import _from_pretrained, load_tokenizer, pick_dtype, resolve

    src = resolve(cfg.model_name_or_path)
    tok = load_tokenizer(src)
    # Master weights stay float32 unless asked: bf16 is mixed precision (--bf16).
    dtype = torch.float32 if cfg.dtype == "auto" else pick_dtype(cfg.dtype, device)
    kwargs = {"dtype": dtype}
    if cfg.load_in_4bit:
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if cfg.bf16 else torch.float32)
        kwargs["device_map"] = {"": device}
    model = _from_pretrained(AutoModelForCausalLM, src, **kwargs)
    if not cfg.load_in_4bit:
        model.to(device)
    model.config.use_cache = False
    if cfg.load_in_4bit:
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # As the official trainer (disable_dropout): the log-probs must be deterministic, or the
    # policy/reference ratio at step 0 would not be 1.
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    if cfg.use_peft:
        from peft import LoraConfig, get_peft_model
        targets = cfg.lora_target_modules
        model = get_peft_model(model, LoraConfig(
            task_type="CAUSAL_LM", r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=targets if targets == "all-linear" else
            [t.strip() for t in targets.split(",") if t.strip()]))
    model.train()
    return model, tok


# ---------------------------------------------------------------------------------------
# 3. Reference log-probs, computed once
# ---------------------------------------------------------------------------------------

def _fingerprint(cfg: Config, pairs: list[Pair]) -> str:
    h = hashlib.sha256(f"{cfg.reference_model or cfg.model_name_or_path}|{cfg.max_length}|"
                       f"{cfg.max_prompt_length}|{cfg.load_in_4bit}".encode())
    for p in pairs:
        h.update(repr((p.chosen.input_ids, p.rejected.input_ids)).encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def compute_reference(model, pairs: list[Pair], pad_id: int, batch_size: int, chunk: int,
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
    from accelerate.utils import gather_object
    for i, w, l in gather_object(results):
        pairs[i].ref_chosen, pairs[i].ref_rejected = w, l
    model.train(was_training)


def reference_logps(cfg: Config, model, pairs: list[Pair], pad_id: int, accelerator,
                    out: Path) -> None:
    cache = out / REF_CACHE
    fp = _fingerprint(cfg, pairs)
    if cache.exists():
        data = json.loads(cache.read_text())
        if data["fingerprint"] == fp:
            for p, w, l in zip(pairs, data["chosen"], data["rejected"]):
                p.ref_chosen, p.ref_rejected = w, l
            return
    elif cfg.resume and any(p.ref_chosen is None for p in pairs) and \
            (out / "checkpoints").exists():
        raise SelfplayError(f"{out} has checkpoints but no {REF_CACHE}: the reference log-probs "
                            "of θ_t cannot be recomputed from moved weights; start over with "
                            "--overwrite.")
    if cfg.reference_model and cfg.reference_model != cfg.model_name_or_path:
        # θ_t is not the starting point (start_from: sft): load it for this pass only.
        from selfplay.models import load_model
        ref, _ = load_model(cfg.reference_model, str(accelerator.device), cfg.dtype)
        compute_reference(ref, pairs, pad_id, cfg.per_device_train_batch_size * 2,
                          cfg.logprob_chunk_size, accelerator)
        del ref
    else:
        compute_reference(model, pairs, pad_id, cfg.per_device_train_batch_size * 2,
                          cfg.logprob_chunk_size, accelerator)
    if accelerator.is_main_process:
        from selfplay.generation import write_json_atomic
        write_json_atomic(cache, {"fingerprint": fp, "chosen": [p.ref_chosen for p in pairs],
                                  "rejected": [p.ref_rejected for p in pairs]})
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------
# 4-5. The loop
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


def _optimizer(cfg: Config, params):
    if cfg.optim == "rmsprop":   # the paper's choice; torch defaults alpha 0.99, eps 1e-8
        return torch.optim.RMSprop(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def _checkpoints(out: Path) -> list[Path]:
    d = out / "checkpoints"
    return sorted(p for p in d.glob("step-*") if (p / "trainer_state.json").exists()) \
        if d.exists() else []


def _metrics(loss_vec, pw, pl, rw, rl, beta, names=("real", "generated")
             ) -> dict[str, torch.Tensor]:
    """The official SPIN metrics (SPPO names the pair chosen/rejected)."""
    w, l = names
    real, gen = beta * (pw - rw).detach(), beta * (pl - rl).detach()
    return {"loss": loss_vec.detach().mean(), f"rewards/{w}": real.mean(),
            f"rewards/{l}": gen.mean(), "rewards/margins": (real - gen).mean(),
            "rewards/accuracies": (real > gen).float().mean(),
            f"logps/{w}": pw.detach().mean(), f"logps/{l}": pl.detach().mean()}


def train(cfg: Config) -> Path:
    """Run the training stage; returns the output directory (a Hugging Face checkpoint)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    out = Path(cfg.output_dir)
    if (out / COMPLETE).exists() and not cfg.overwrite:
        print(f"{out} holds a finished model; skipping (--overwrite to train again).",
              file=sys.stderr)
        return out
    if cfg.overwrite and out.exists():
        shutil.rmtree(out)
    cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    accelerator = Accelerator(cpu=cpu, mixed_precision="bf16" if cfg.bf16 else "no",
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    set_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    main = accelerator.is_main_process

    model, tok = load_for_training(cfg, accelerator.device)
    pairs, stats = load_pairs(cfg, tok)
    if main:
        print(f"{len(pairs)} pairs; {stats['truncated']} truncated to max_length "
              f"{cfg.max_length} / max_prompt_length {cfg.max_prompt_length}; "
              f"{stats['stored_reference']} with stored reference log-probs", file=sys.stderr)
    reference_logps(cfg, model, pairs, tok.pad_token_id, accelerator, out)

    wrapped = ResponseLogProbs(model, cfg.logprob_chunk_size)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(cfg, params)
    wrapped, optimizer = accelerator.prepare(wrapped, optimizer)
    lengths = [max(len(p.chosen.input_ids), len(p.rejected.input_ids)) for p in pairs]
    rank, world, ga = accelerator.process_index, accelerator.num_processes, \
        cfg.gradient_accumulation_steps

    def batches_of(epoch: int) -> list[list[int]]:
        return epoch_batches(lengths, cfg.per_device_train_batch_size, world, cfg.seed, epoch,
                             cfg.group_by_length)

    # An update is exactly `ga` batches; an epoch's few leftover batches (< ga) are dropped.
    per_epoch = len(batches_of(0)) // ga
    if per_epoch == 0:
        raise SelfplayError(f"{len(pairs)} pairs make fewer batches than "
                            f"--gradient_accumulation_steps {ga}.")
    total = cfg.max_steps or math.ceil(cfg.num_train_epochs * per_epoch)
    # Stepped by hand once per update: accelerate's wrapper would step it once per process.
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer,
                              num_warmup_steps=math.ceil(cfg.warmup_ratio * total),
                              num_training_steps=total)
    accelerator.register_for_checkpointing(scheduler)

    step = 0
    if not cfg.resume and accelerator.is_main_process:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)   # stale, from an earlier run
    if cfg.resume and _checkpoints(out):
        last = _checkpoints(out)[-1]
        accelerator.load_state(str(last))
        step = json.loads((last / "trainer_state.json").read_text())["step"]
        if main:
            print(f"resuming from {last} (update {step} of {total})", file=sys.stderr)
    log_path = out / "train_log.jsonl"
    if main:   # a resumed run rewrites what came after its checkpoint, never duplicates it
        kept = [ln for ln in (log_path.read_text().splitlines() if log_path.exists() else [])
                if json.loads(ln)["step"] <= step]
        log_path.write_text("".join(ln + "\n" for ln in kept))
        from torch.utils.tensorboard import SummaryWriter
        tb = SummaryWriter(str(out / "tensorboard"), purge_step=step + 1 if step else None)

    bar = tqdm(total=total, initial=step, desc="train", unit="step",
               disable=not accelerator.is_local_main_process, mininterval=1.0)
    window: dict[str, list[float]] = {}
    acc: dict[str, list[torch.Tensor]] = {}
    t0, tokens = time.perf_counter(), 0
    names = ("chosen", "rejected") if cfg.loss_type.startswith("sppo") else ("real", "generated")
    epoch = step // per_epoch
    while step < total:
        skip = (step - epoch * per_epoch) * ga
        for gbatch in batches_of(epoch)[skip:per_epoch * ga]:
            share = len(gbatch) // world
            ps = [pairs[i] for i in gbatch[rank * share:(rank + 1) * share]]
            batch = {k: v.to(accelerator.device) for k, v in collate(
                [p.chosen for p in ps] + [p.rejected for p in ps], tok.pad_token_id).items()}
            rw = torch.tensor([p.ref_chosen for p in ps], device=accelerator.device)
            rl = torch.tensor([p.ref_rejected for p in ps], device=accelerator.device)
            with accelerator.accumulate(wrapped):
                with accelerator.autocast():
                    logps, _ = wrapped(**batch)               # one forward for [real; generated]
                pw, pl = logps.float().chunk(2)
                probs = {arg: torch.tensor([p.extra[col] for p in ps], device=accelerator.device,
                                           dtype=torch.float32)
                         for arg, col in LOSS_PROBS.get(cfg.loss_type, {}).items()}
                loss_vec = pair_loss(cfg.loss_type, pw, pl, rw, rl, cfg.beta, **probs)
                accelerator.backward(loss_vec.mean())
                for k, v in _metrics(loss_vec, pw, pl, rw, rl, cfg.beta, names).items():
                    acc.setdefault(k, []).append(v)
                tokens += int(batch["attention_mask"].sum())
                if accelerator.sync_gradients:
                    norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
                    acc.setdefault("grad_norm", []).append(torch.as_tensor(norm, dtype=torch.float32,
                                                                           device=accelerator.device))
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            for k, vs in acc.items():    # mean over micro-batches, then over processes
                window.setdefault(k, []).append(
                    accelerator.reduce(torch.stack(vs).mean(), reduction="mean").item())
            acc = {}
            bar.update(1)
            bar.set_postfix(loss=f"{window['loss'][-1]:.4f}")
            if step % cfg.logging_steps == 0 or step == total:
                rec = {"step": step, "epoch": round(step / per_epoch, 4),
                       "learning_rate": scheduler.get_last_lr()[0],
                       **{k: sum(v) / len(v) for k, v in window.items()},
                       "tokens_per_s": tokens * accelerator.num_processes /
                       (time.perf_counter() - t0), "elapsed_s": time.perf_counter() - t0}
                window = {}
                if main:
                    with log_path.open("a") as fh:
                        fh.write(json.dumps(rec) + "\n")
                    for k, v in rec.items():
                        if k != "step":
                            tb.add_scalar(k, v, step)
            if cfg.save_steps and step % cfg.save_steps == 0 and step < total:
                _save_checkpoint(accelerator, out, step)
            if step >= total:
                break
        epoch += 1
    bar.close()
    _save_final(cfg, accelerator, wrapped, tok, out, stats, step)
    if main:
        tb.close()
    return out


def _save_checkpoint(accelerator, out: Path, step: int) -> None:
    final = out / "checkpoints" / f"step-{step:06d}"
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
# 6. Output
# ---------------------------------------------------------------------------------------

def _save_final(cfg: Config, accelerator, wrapped, tok, out: Path, stats: dict,
                step: int) -> None:
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(wrapped).model
    state = None
    if not cfg.use_peft:   # every process takes part: it gathers ZeRO-3 / FSDP shards
        state = {k[len("model."):]: v for k, v in accelerator.get_state_dict(wrapped).items()
                 if k.startswith("model.")}
    if accelerator.is_main_process:
        model.config.use_cache = True           # generation from the checkpoint wants the cache
        if cfg.use_peft and cfg.merge_adapter:
            _save_merged(cfg, model, tok, out)
        else:   # full weights, or the adapter alone (PeftModel.save_pretrained)
            model.save_pretrained(out, state_dict=state,
                                  safe_serialization=True)
        tok.save_pretrained(out)
        (out / COMPLETE).write_text(json.dumps({"steps": step, **stats}, indent=2))
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    accelerator.wait_for_everyone()


def _save_merged(cfg: Config, peft_model, tok, out: Path) -> None:
    """LoRA merged into full-precision base weights: what the next iteration generates from.

    Under QLoRA the base in memory is 4-bit, so the adapter is merged into a fresh
    full-precision copy of the base instead, which is what generation should load.
    """
    if not cfg.load_in_4bit:
        merged = peft_model.merge_and_unload()
        merged.config.use_cache = True
        merged.save_pretrained(out, safe_serialization=True)
        return
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from selfplay.models import _from_pretrained, resolve
    adapter_dir = out / "adapter"
    peft_model.save_pretrained(adapter_dir)
    base = _from_pretrained(AutoModelForCausalLM, resolve(cfg.model_name_or_path),
                            dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.config.use_cache = True
    merged.save_pretrained(out, safe_serialization=True)
