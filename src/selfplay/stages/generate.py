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
from typing import Any

from selfplay.config import (DataSettings, GenerationSettings, ModelSettings, ScoringSettings,
                             changes, describe_changes)
from selfplay.data.formats import Example
from selfplay.data.shards import (ShardRow, fraction, process_slice, read_shard, shard_name,
                                  write_shard)
from selfplay.data.splits import read_for
from selfplay.engines import SamplingSettings, open_engine, scoring_model
from selfplay.engines.base import stream_seed
from selfplay.errors import SelfplayError
from selfplay.launch import process_state
from selfplay.models import load_tokenizer
from selfplay.rendering import prompt_ids
from selfplay.stages.score import score_rows


def generate(model: ModelSettings, data: DataSettings, gen: GenerationSettings,
             scoring: ScoringSettings, out_dir: Path, *, seed: int,
             overwrite: bool = False) -> Path:
    """Generate (and with gen.score, score) this process's shard; returns its path."""
    state = process_state(model)
    mine = this_slice(read_for(data).examples, gen, state.process_index, state.num_processes)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / shard_name(data.split, gen.data_frac, state.process_index,
                                state.num_processes)
    s = SamplingSettings(gen.max_new_tokens, gen.temperature, gen.top_p, seed,
                         model.inference_batch_size(), scoring.max_length,
                         scoring.max_prompt_length)
    cut = cut_prompts(model.model_name_or_path, [e.prompt for e in mine], s)
    record = made_with(model, gen, s, cut)
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
    try:
        rows = answer(engine, mine, s, gen.num_samples, path.name, record)
        if gen.score:
            lm, tok = scoring_model(engine, replace(model, device=device))
            score_rows(lm, tok, rows, model, scoring)
    finally:        # interrupted too: vLLM's engine processes would outlive this one
        engine.close()
    write_shard(path, rows)
    say_written(path, rows, state.is_main_process)
    return path


def this_slice(examples: list[Example], gen: GenerationSettings, rank: int,
               world: int) -> list[Example]:
    """This process's contiguous share of fraction gen.data_frac."""
    start, end = fraction(len(examples), gen.data_frac, gen.frac_len)
    if start >= len(examples):
        last = (len(examples) - 1) // gen.frac_len
        raise SelfplayError(f"--data_frac {gen.data_frac} is past the end: the split has "
                            f"{len(examples)} prompts, so with --frac_len {gen.frac_len} the "
                            f"last fraction is {last}.")
    lo, hi = process_slice(end - start, rank, world)
    return examples[start + lo:start + hi]


def made_with(model: ModelSettings, gen: GenerationSettings, s: SamplingSettings,
              cut: int) -> dict[str, Any]:
    """The settings a shard's rows record: what a reused shard must share."""
    record = {"model": model.model_name_or_path, "num_samples": gen.num_samples,
              **{k: v for k, v in asdict(s).items() if k not in CUT_KEYS}}
    if model.bf16:  # recorded only then, as prompt_truncation below
        record["bf16"] = True
    if cut:         # recorded only then: shards whose prompts all fit stay comparable
        record["prompt_truncation"] = {k: getattr(s, k) for k in CUT_KEYS}
    return record


def answer(engine, mine: list[Example], s: SamplingSettings, k_: int, stream: str,
           record: dict[str, Any]) -> list[ShardRow]:
    """θ_t's K answers to each prompt. All K samples in one pass: K copies of each prompt,
    sample k of prompt i seeded by (shard, k, i), decoded side by side (same length, same
    batch), so one long answer holds up one pass instead of K."""
    flat = engine.generate([e.prompt for e in mine for _ in range(k_)], s,
                           seeds=[stream_seed(s.seed, f"{stream}/{k}", i)
                                  for i in range(len(mine)) for k in range(k_)],
                           desc=f"generate K={k_}" if k_ > 1 else "generate")
    samples = [flat[k::k_] for k in range(k_)]
    return [ShardRow(prompt_id=e.prompt_id, prompt=e.prompt, reference=e.reference,
                     responses=[gs[i].text for gs in samples],
                     response_tokens=[gs[i].n_tokens for gs in samples],
                     finish_reasons=[gs[i].finish_reason for gs in samples],
                     extra=e.extra, settings=record) for i, e in enumerate(mine)]


def say_written(path: Path, rows: list[ShardRow], main: bool) -> None:
    n = sum(len(r.responses) for r in rows)
    long = sum(f == "length" for r in rows for f in r.finish_reasons)
    empty = sum(not t.strip() for r in rows for t in r.responses)
    print(f"wrote {path}: {len(rows)} prompts, {n} responses, {long} cut by --max_new_tokens"
          + (f", {empty} empty" if empty else ""), file=sys.stderr)
    if main and rows:
        r = rows[0]
        print(f"\n[{r.prompt_id}] {r.prompt[-1]['content']}\n-> {r.responses[0]}",
              file=sys.stderr)


CUT_KEYS = ("max_length", "max_prompt_length")


def cut_prompts(spec: str, prompts: list[list[dict[str, str]]], s: SamplingSettings) -> int:
    """How many prompts generation answers from their end only (SamplingSettings.prompt_tokens)."""
    tok = load_tokenizer(spec)
    return sum(len(s.prompt_tokens(ids)) < len(ids)
               for ids in (prompt_ids(tok, p) for p in prompts))


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
        # a shard of selfplay before 08ba4b1 (2026-11-23) holds a dataset's own prompt_id
        # column: ours, and redone
        return ("holds other prompts than this slice (or the ids of selfplay before 08ba4b1, "
                "2026-11-23)")
    if scored and not all(r.scored for r in rows):
        return "is not scored"
    # What the rows hold, not how they were made: options such as the batch size and the
    # engine are resumable (config.changes passes over them).
    old = rows[0].settings or {} if rows else {}
    diff = changes(old, record)
    if diff:
        raise SelfplayError(
            f"{path} was generated with other settings ({describe_changes(old, record, diff)}); "
            "pass --overwrite to generate it again, or another --output_dir.")
    return None
