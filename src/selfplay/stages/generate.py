"""`selfplay generate` (SPIN step 1): θ_t answers the prompts; one shard file per fraction and
process.

A prompt is answered as training will see it: longer than --max_prompt_length, and with
--max_new_tokens able to take it past --max_length, it is answered from its last
max_prompt_length tokens (rendering.generation_prompt); such prompts are counted in one line.

Under `accelerate launch` each process takes its own contiguous slice of the fraction and
writes its own shard. A complete shard is skipped on re-run unless --overwrite; an interrupted
one is redone (shards are written atomically). With --score, the same loaded model then scores
the references and its own responses (the stored reference log-probs of training).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch
from accelerate import PartialState

from selfplay.config import DataSettings, GenerationSettings, ModelSettings, ScoringSettings
from selfplay.data.formats import read_for
from selfplay.data.shards import (ShardRow, fraction, process_slice, read_shard, shard_name,
                                  write_shard)
from selfplay.engines import SamplingSettings, open_engine, scoring_model
from selfplay.engines.base import stream_seed
from selfplay.errors import SelfplayError
from selfplay.models import load_tokenizer
from selfplay.rendering import prompt_ids
from selfplay.stages.score import score_rows
from selfplay.trainer import check_launch


def generate(model: ModelSettings, data: DataSettings, gen: GenerationSettings,
             scoring: ScoringSettings, out_dir: Path, *, seed: int,
             overwrite: bool = False) -> Path:
    """Generate (and with gen.score, score) this process's shard; returns its path."""
    # cpu=True lets accelerate form a gloo process group when there is no GPU.
    state = PartialState(cpu=model.device == "cpu" or not torch.cuda.is_available())
    check_launch(state)
    examples = read_for(data).examples
    start, end = fraction(len(examples), gen.data_frac, gen.frac_len)
    if start >= len(examples):
        last = (len(examples) - 1) // gen.frac_len
        raise SelfplayError(f"--data_frac {gen.data_frac} is past the end: the split has "
                            f"{len(examples)} prompts, so with --frac_len {gen.frac_len} the "
                            f"last fraction is {last}.")
    lo, hi = process_slice(end - start, state.process_index, state.num_processes)
    mine = examples[start + lo:start + hi]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / shard_name(data.split, gen.data_frac, state.process_index,
                                state.num_processes)
    s = SamplingSettings(gen.max_new_tokens, gen.temperature, gen.top_p, seed,
                         model.inference_batch_size(), scoring.max_length,
                         scoring.max_prompt_length)
    record = {"model": model.model_name_or_path, "num_samples": gen.num_samples,
              **{k: v for k, v in asdict(s).items() if k not in CUT_KEYS}}
    if model.bf16:  # recorded only then, as prompt_truncation below
        record["bf16"] = True
    cut = cut_prompts(model.model_name_or_path, [e.prompt for e in mine], s)
    if cut:         # recorded only then: shards whose prompts all fit stay comparable
        record["prompt_truncation"] = {k: getattr(s, k) for k in CUT_KEYS}
    if path.exists() and not overwrite:
        why = reuse_problem(path, [e.prompt_id for e in mine], record, gen.score)
        if why is None:
            print(f"{path} is complete; skipping it (--overwrite to redo).", file=sys.stderr)
            return path
        print(f"{path} {why}; generating it again.", file=sys.stderr)
    device = str(state.device) if model.device == "auto" else model.device
    engine = open_engine(replace(model, device=device), seed=seed,
                         process_index=state.process_index, num_processes=state.num_processes)
    record["engine"] = engine.name         # the one that ran: auto may fall back to HF
    if cut:
        print(f"{cut} of {len(mine)} prompts are longer than --max_prompt_length "
              f"{s.max_prompt_length} tokens, and with --max_new_tokens {s.max_new_tokens} "
              f"would pass --max_length {s.max_length}: each is answered from its last "
              f"{s.max_prompt_length} tokens, as training truncates it.", file=sys.stderr)
    # All K samples in one pass: K copies of each prompt, sample k of prompt i seeded by
    # (shard, k, i), decoded side by side (same length, same batch), so one long answer holds
    # up one pass instead of K.
    k_ = gen.num_samples
    try:
        flat = engine.generate([e.prompt for e in mine for _ in range(k_)], s,
                               seeds=[stream_seed(s.seed, f"{path.name}/{k}", i)
                                      for i in range(len(mine)) for k in range(k_)],
                               desc=f"generate K={k_}" if k_ > 1 else "generate")
        samples = [flat[k::k_] for k in range(k_)]
        rows = [ShardRow(prompt_id=e.prompt_id, prompt=e.prompt, reference=e.reference,
                         responses=[gs[i].text for gs in samples],
                         response_tokens=[gs[i].n_tokens for gs in samples],
                         finish_reasons=[gs[i].finish_reason for gs in samples],
                         extra=e.extra, settings=record) for i, e in enumerate(mine)]
        if gen.score:
            lm, tok = scoring_model(engine, replace(model, device=device))
            score_rows(lm, tok, rows, model, scoring)
    finally:        # interrupted too: vLLM's engine processes would outlive this one
        engine.close()
    write_shard(path, rows)
    n = sum(len(r.responses) for r in rows)
    long = sum(f == "length" for r in rows for f in r.finish_reasons)
    empty = sum(not t.strip() for r in rows for t in r.responses)
    print(f"wrote {path}: {len(rows)} prompts, {n} responses, {long} cut by --max_new_tokens"
          + (f", {empty} empty" if empty else ""), file=sys.stderr)
    if state.is_main_process and rows:
        r = rows[0]
        print(f"\n[{r.prompt_id}] {r.prompt[-1]['content']}\n-> {r.responses[0]}",
              file=sys.stderr)
    return path


CUT_KEYS = ("max_length", "max_prompt_length")


def cut_prompts(spec: str, prompts: list[list[dict[str, str]]], s: SamplingSettings) -> int:
    """How many prompts generation answers from their end only (SamplingSettings.prompt_tokens)."""
    tok = load_tokenizer(spec)
    return sum(len(s.prompt_tokens(ids)) < len(ids)
               for ids in (prompt_ids(tok, p) for p in prompts))


# How a shard was made, not what it holds: a shard differing only in these is reused (the
# engine, too, is how: it is recorded once it has run and never compared).
HOW = ("batch_size",)


def reuse_problem(path: Path, prompt_ids: list[str], record: dict, scored: bool) -> str | None:
    """Why an existing shard cannot stand for this generation, or None when it can.

    A shard made with other settings is refused (it may be wanted; --overwrite redoes it);
    one that is unreadable or holds other prompts is ours and incomplete, so it is redone."""
    try:
        rows = read_shard(path)
    except SelfplayError as e:
        return f"is unreadable ({e})"
    if len(rows) != len(prompt_ids):
        return f"holds {len(rows)} rows, not the {len(prompt_ids)} prompts of this slice"
    if [r.prompt_id for r in rows] != prompt_ids:
        return "holds other prompts than this slice (or ids of an older selfplay)"
    if scored and not all(r.scored for r in rows):
        return "is not scored"
    old = rows[0].settings or {} if rows else {}
    keys = set(record) | ({"prompt_truncation"} & set(old))
    diff = sorted(k for k in keys if k not in HOW and old.get(k) != record.get(k))
    if diff:
        raise SelfplayError(
            f"{path} was generated with other settings ("
            + "; ".join(f"{k} {old.get(k)!r} -> {record.get(k)!r}" for k in diff[:4])
            + "); pass --overwrite to generate it again, or another --output_dir.")
    return None
