"""`selfplay train` (SPIN step 2): θ_{t+1} from θ_t on preference pairs, θ_t as the reference,
one model in memory.

`train`, top to bottom:
  1. accelerate: devices, DDP / DeepSpeed / FSDP from an accelerate config, mixed precision
  2. model: full fine-tuning, LoRA, or QLoRA (models.load_for_training)
  3. pairs: read (several datasets mix by share), tokenize once, truncate, count truncations
  4. reference log-probs: the ones stored with the pairs when their stamp matches this
     reference's weights and truncation; otherwise computed once, before the first step, with
     the starting weights (the adapter disabled under LoRA) through the prepared model (under
     FSDP and ZeRO-3 only it holds whole weights), and cached in the output directory with a
     fingerprint, so that a resumed run does not recompute them from weights that have moved
  5. the loop (trainer.loop) with `pair_step`: one forward pass for [chosen; rejected], the
     loss, the official SPIN metrics
  6. a Hugging Face checkpoint (merged LoRA by default)
"""

from __future__ import annotations

import hashlib
import json
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from selfplay.config import (DataSettings, LoraSettings, ModelSettings, ScoringSettings,
                             TrainingSettings)
from selfplay.data.pairs import PreferencePair, ScoreStamp, read_pairs
from selfplay.data.run_paths import ModelPaths
from selfplay.errors import SelfplayError
from selfplay.io import write_json_atomic
from selfplay.launch import sharding_for
from selfplay.logprobs import ResponseLogProbs
from selfplay.losses import pair_loss, regularized
from selfplay.models import fingerprint, load_model
from selfplay.rendering import Encoded, collate, prompt_ids, response_ids, truncate
from selfplay.trainer import (StepFn, claim, content_hash, loop, prepare, releases_group,
                              save_final, skip_if_complete, start)

# The loss arguments each SPPO loss takes, and the pair fields they come from.
LOSS_PROBS = {"sppo": {"p_win": "chosen_probs_win", "p_lose": "chosen_probs_lose"},
              "sppo_single": {"p_chosen": "chosen_probs"}}
# Losses of the pair alone: SPPO's win probabilities, where a dataset has them, go unused.
PAIR_ONLY_LOSSES = ("sigmoid", "hinge")


@dataclass
class TrainPair:
    """A pair as the trainer sees it: tokenized, truncated, with θ_t's log-probs."""
    record: PreferencePair
    chosen: Encoded              # SPIN: the dataset's answer ("real")
    rejected: Encoded            # SPIN: θ_t's answer ("generated")
    ref_chosen: float | None = None
    ref_rejected: float | None = None
    base_chosen: float | None = None     # θ_0's, for the regularized losses
    base_rejected: float | None = None


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
    unused_probs: list[str] = field(default_factory=list)   # sources whose SPPO columns go unused

    def to_json(self) -> dict[str, Any]:
        return {"sources": [vars(s) for s in self.sources], "truncated": self.truncated,
                "stored_reference": self.stored_reference}


# ---------------------------------------------------------------------------------------
# 3. Pairs
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
        if loss_type in PAIR_ONLY_LOSSES and any(r.chosen_probs_win is not None or
                                                 r.chosen_probs is not None for r in records[:n]):
            stats.unused_probs.append(src)
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
# 4. Reference log-probs, computed once
# ---------------------------------------------------------------------------------------

def _fingerprint(reference: ScoreStamp, load_in_4bit: bool, pairs: list[TrainPair],
                 bf16_params: bool = False) -> str:
    """The identity of a reference pass: the reference's weights, truncation, precision and
    tokens."""
    h = hashlib.sha256(f"{reference.fingerprint}|{reference.max_length}|"
                       f"{reference.max_prompt_length}|{load_in_4bit}".encode())
    # Only then: a float32 cache, such as those of selfplay before f513a22 (2026-11-24, which
    # added --bf16), keeps the fingerprint it was written with.
    if reference.bf16:
        h.update(b"|bf16")
    if bf16_params:     # FSDP's bf16 weights: another computation of the same reference
        h.update(b"|bf16-params")
    for p in pairs:
        h.update(repr((p.chosen.input_ids, p.rejected.input_ids)).encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def compute_reference(scorer, pairs: list[TrainPair], pad_id: int, batch_size: int,
                      accelerator, fields: tuple[str, str] = ("ref_chosen", "ref_rejected")
                      ) -> None:
    """θ_t's log-probs (or, by `fields`, θ_0's) for pairs that have none stored; each process
    scores a share.

    `scorer` is a log-prob module (logprobs.ResponseLogProbs): the one prepared for training,
    before any update (under FSDP and ZeRO-3 only its wrapper holds whole weights: it gathers
    each layer's shards in forward, as in training), or one around θ_t loaded for this pass.
    A sharded forward is a collective, so every process runs the same number of batches."""
    chosen_field, rejected_field = fields
    todo = [i for i, p in enumerate(pairs) if getattr(p, chosen_field) is None]
    if not todo:
        return
    inner = accelerator.unwrap_model(scorer).model
    ctx = inner.disable_adapter() if hasattr(inner, "disable_adapter") else nullcontext()
    was_training = scorer.training
    scorer.eval()
    order = sorted(todo, key=lambda i: -len(pairs[i].chosen.input_ids))
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    world, rank = accelerator.num_processes, accelerator.process_index
    mine = batches[rank::world]
    n_real = len(mine)
    mine += [batches[0]] * (-(-len(batches) // world) - n_real)    # repeats, results dropped
    results: list[tuple[int, float, float]] = []
    bar = tqdm(total=sum(map(len, mine[:n_real])), desc="reference log-probs", unit="pair",
               disable=not accelerator.is_local_main_process, mininterval=1.0)
    with ctx:
        for k, idx in enumerate(mine):
            seqs = [pairs[i].chosen for i in idx] + [pairs[i].rejected for i in idx]
            b = {k_: v.to(accelerator.device) for k_, v in collate(seqs, pad_id).items()}
            with accelerator.autocast():
                lp, _ = scorer(**b)
            if k < n_real:
                w, l = lp.float().cpu().chunk(2)
                results += list(zip(idx, w.tolist(), l.tolist()))
                bar.update(len(idx))
    bar.close()
    for i, w, l in gather_object(results):
        setattr(pairs[i], chosen_field, w)
        setattr(pairs[i], rejected_field, l)
    scorer.train(was_training)


@dataclass
class LogProbPass:
    """One set of log-probs every pair needs before training: θ_t's (the reference) or θ_0's
    (the base the regularizers pull toward), with the file that caches them."""
    stamp: ScoreStamp
    cache: Path
    fields: tuple[str, str]


def reference_logps(scorer, pairs: list[TrainPair], pad_id: int, accelerator, out: ModelPaths,
                    *, start: ModelSettings, reference: ScoreStamp, chunk: int,
                    training: TrainingSettings, load_in_4bit: bool,
                    bf16_params: bool = False, base: ScoreStamp | None = None) -> None:
    """Fill every pair's reference log-probs (and, with `base`, θ_0's): from the cache, the
    pairs, or computed once (by `scorer`, the prepared log-prob module, when the model scored
    is the one being trained)."""
    passes = [LogProbPass(reference, out.reference_cache, ("ref_chosen", "ref_rejected"))]
    if base is not None:
        passes.append(LogProbPass(base, out.base_cache, ("base_chosen", "base_rejected")))
    for lp in passes:
        if lp.fields[0] == "base_chosen" and lp.stamp.fingerprint == reference.fingerprint:
            for p in pairs:            # θ_0 is θ_t (iteration 0): the same log-probs
                p.base_chosen, p.base_rejected = p.ref_chosen, p.ref_rejected
            continue
        _fill(lp, scorer, pairs, pad_id, accelerator, out, start=start, chunk=chunk,
              training=training, load_in_4bit=load_in_4bit, bf16_params=bf16_params)


def _fill(lp: LogProbPass, scorer, pairs: list[TrainPair], pad_id: int, accelerator,
          out: ModelPaths, *, start: ModelSettings, chunk: int, training: TrainingSettings,
          load_in_4bit: bool, bf16_params: bool) -> None:
    fp = _fingerprint(lp.stamp, load_in_4bit, pairs, bf16_params)
    w_field, l_field = lp.fields
    # not the starting point (θ_t under start_from sft; θ_0 after iteration 0): loaded for
    # this pass alone, so its log-probs can be computed again at any time
    separate = lp.stamp.fingerprint != fingerprint(start.model_name_or_path)
    # Every process reads the cache between two barriers, before the main one may write it, so
    # all take the same path: one that found the cache the main process had just written, and
    # returned, left the others waiting forever at the barrier below (seen with two launchers).
    accelerator.wait_for_everyone()
    cached = json.loads(lp.cache.read_text()) if lp.cache.exists() else None
    accelerator.wait_for_everyone()
    if cached is not None:
        if cached["fingerprint"] == fp:
            for p, w, l in zip(pairs, cached["chosen"], cached["rejected"]):
                setattr(p, w_field, w)
                setattr(p, l_field, l)
            return
    elif training.resume and not separate and out.checkpoints.exists() and \
            any(getattr(p, w_field) is None for p in pairs):
        raise SelfplayError(f"{out.root} has checkpoints but no {lp.cache.name}: the log-probs "
                            f"of {lp.stamp.model} cannot be recomputed from moved weights; "
                            "start over with --overwrite.")
    batch = training.per_device_train_batch_size * 2
    if separate:
        ref, _ = load_model(lp.stamp.model, str(accelerator.device), start.dtype)
        compute_reference(ResponseLogProbs(ref, chunk), pairs, pad_id, batch, accelerator,
                          lp.fields)
        del ref
    else:
        compute_reference(scorer, pairs, pad_id, batch, accelerator, lp.fields)
    if accelerator.is_main_process:
        write_json_atomic(lp.cache, {"fingerprint": fp,
                                     "chosen": [getattr(p, w_field) for p in pairs],
                                     "rejected": [getattr(p, l_field) for p in pairs]})
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------
# 5. One step: [chosen; rejected] in one forward pass
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


def regularizes(training: TrainingSettings) -> bool:
    return bool(training.ref_mixture or training.kl_coef)


def pair_step(pairs: list[TrainPair], pad_id: int, training: TrainingSettings) -> StepFn:
    # SPIN's pairs are real against generated; SPPO's and iterative DPO's the judge's chosen
    # against rejected, both samples of θ_t
    sampled = training.loss_type.startswith("sppo") or \
        any(p.record.chosen_probs is not None for p in pairs)
    names = ("chosen", "rejected") if sampled else ("real", "generated")
    probs_of = LOSS_PROBS.get(training.loss_type, {})

    def step(forward, idx: list[int], _: list[int]):   # a mean over pairs: equal shares
        ps = [pairs[i] for i in idx]
        batch = collate([p.chosen for p in ps] + [p.rejected for p in ps], pad_id)
        logps, _ = forward(batch)
        dev = logps.device
        pw, pl = logps.float().chunk(2)
        rw = torch.tensor([p.ref_chosen for p in ps], device=dev)
        rl = torch.tensor([p.ref_rejected for p in ps], device=dev)
        probs = {arg: torch.tensor([getattr(p.record, f) for p in ps], device=dev,
                                   dtype=torch.float32) for arg, f in probs_of.items()}
        if regularizes(training):
            bw = torch.tensor([p.base_chosen for p in ps], device=dev)
            bl = torch.tensor([p.base_rejected for p in ps], device=dev)
            # the dataset's answer (SPIN) is no sample of θ_t: no KL estimate on it
            loss_vec = regularized(training.loss_type, pw, pl, rw, rl, training.beta,
                                   base_w=bw, base_l=bl, ref_mixture=training.ref_mixture,
                                   kl_coef=training.kl_coef, kl_type=training.kl_type,
                                   kl_on_chosen=sampled, **probs)
        else:
            loss_vec = pair_loss(training.loss_type, pw, pl, rw, rl, training.beta, **probs)
        return (loss_vec.mean(), _metrics(loss_vec, pw, pl, rw, rl, training.beta, names),
                int(batch["attention_mask"].sum()))

    return step


# ---------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------

@releases_group
def train(model: ModelSettings, data: DataSettings, sources: list[tuple[str, float]],
          scoring: ScoringSettings, training: TrainingSettings, lora: LoraSettings,
          out_dir: Path, *, seed: int, overwrite: bool = False) -> Path:
    """Train on the pairs of `sources` (dataset, share used); returns the output directory,
    a Hugging Face checkpoint."""
    out = ModelPaths(Path(out_dir))
    if skip_if_complete(out, overwrite):
        return out.root
    accelerator, lm, tok = start(model, training, lora, out, seed)
    ref_spec = training.reference_model or model.model_name_or_path
    reference = ScoreStamp(ref_spec, scoring.max_length, scoring.max_prompt_length,
                           fingerprint(ref_spec), model.bf16)
    base = None
    if regularizes(training):
        if not training.base_model:
            raise SelfplayError("--ref_mixture and --kl_coef regularize toward θ_0: name it "
                                "with --base_model (`selfplay run` sets it).")
        base = ScoreStamp(training.base_model, scoring.max_length, scoring.max_prompt_length,
                          fingerprint(training.base_model), model.bf16)
    # Under QLoRA the starting policy is the 4-bit base, and with FSDP's bf16 weights the
    # policy computes in bf16: neither is the float model that scored the pairs.
    sharding = sharding_for(training)
    bf16_params = sharding is not None and sharding.bf16_params
    stored_ok = not (lora.load_in_4bit or bf16_params)
    pairs, stats = load_pairs(sources, data, scoring, training.loss_type,
                              reference if stored_ok else None, tok)
    if accelerator.is_main_process and stats.unused_probs:
        print(f"{', '.join(stats.unused_probs)} holds SPPO win probabilities (chosen_probs, "
              f"chosen_probs_win, chosen_probs_lose), which --loss_type {training.loss_type} "
              "does not read: it trains the best answer against the worst, as iterative DPO "
              "(--loss_type sppo trains on them).", file=sys.stderr)
    if accelerator.is_main_process:
        print(f"{len(pairs)} pairs; {stats.truncated} truncated to max_length "
              f"{scoring.max_length} / max_prompt_length {scoring.max_prompt_length}; "
              f"{stats.stored_reference} with stored reference log-probs", file=sys.stderr)
    claim(accelerator, out, overwrite=overwrite, resume=training.resume)
    lengths = [max(len(p.chosen.input_ids), len(p.rejected.input_ids)) for p in pairs]

    def fill_reference(scorer) -> None:       # θ_t's weights: prepared, not yet restored
        reference_logps(scorer, pairs, tok.pad_token_id, accelerator, out, start=model,
                        reference=reference, chunk=scoring.logprob_chunk_size,
                        training=training, load_in_4bit=lora.load_in_4bit,
                        bf16_params=bf16_params, base=base)

    # read before the reference pass fills what was not stored
    content = content_hash([(p.chosen.input_ids, p.chosen.n_prompt, p.rejected.input_ids,
                             p.rejected.n_prompt, p.ref_chosen, p.ref_rejected,
                             p.record.chosen_probs, p.record.chosen_probs_win,
                             p.record.chosen_probs_lose) for p in pairs])
    r = prepare(accelerator, lm, tok, lengths, content, training, scoring.logprob_chunk_size,
                out, seed,
                before_restore=fill_reference)
    step = loop(r, training, out, pair_step(pairs, tok.pad_token_id, training))
    save_final(r, lora, model, out, {"steps": step, **stats.to_json()})
    return out.root
