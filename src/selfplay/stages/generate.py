"""`selfplay generate` (SPIN step 1): θ_t answers the prompts; one shard file per fraction and
process.

Under `accelerate launch` each process takes its own contiguous slice of the fraction and
writes its own shard. A complete shard is skipped on re-run unless --overwrite; an interrupted
one is redone (shards are written atomically). With --score, the same loaded model then scores
the references and its own responses (the stored reference log-probs of training).
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import PartialState

from selfplay.config import DataSettings, GenerationSettings, ModelSettings, ScoringSettings
from selfplay.data.formats import read_for
from selfplay.data.shards import ShardRow, fraction, process_slice, shard_name, write_shard
from selfplay.engines.hf import SamplingSettings, generate as decode_all
from selfplay.errors import SelfplayError
from selfplay.models import load_model
from selfplay.stages.score import score_rows


def generate(model: ModelSettings, data: DataSettings, gen: GenerationSettings,
             scoring: ScoringSettings, out_dir: Path, *, seed: int,
             overwrite: bool = False) -> Path:
    """Generate (and with gen.score, score) this process's shard; returns its path."""
    # cpu=True lets accelerate form a gloo process group when there is no GPU.
    state = PartialState(cpu=model.device == "cpu" or not torch.cuda.is_available())
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
    if path.exists() and not overwrite:
        print(f"{path} is complete; skipping it (--overwrite to redo).", file=sys.stderr)
        return path
    lm, tok = load_model(model.model_name_or_path, str(state.device) if model.device == "auto"
                         else model.device, model.dtype)
    s = SamplingSettings(gen.max_new_tokens, gen.temperature, gen.top_p, seed,
                         model.inference_batch_size())
    prompts = [e.prompt for e in mine]
    samples = [decode_all(lm, tok, prompts, s, stream=f"{path.name}/{k}",
                          desc=f"generate {k + 1}/{gen.num_samples}")
               for k in range(gen.num_samples)]
    record = {"model": model.model_name_or_path, "num_samples": gen.num_samples, **asdict(s)}
    rows = [ShardRow(prompt_id=e.prompt_id, prompt=e.prompt, reference=e.reference,
                     responses=[gs[i].text for gs in samples],
                     response_tokens=[gs[i].n_tokens for gs in samples],
                     finish_reasons=[gs[i].finish_reason for gs in samples],
                     extra=e.extra, settings=record) for i, e in enumerate(mine)]
    if gen.score:
        score_rows(lm, tok, rows, model, scoring)
    write_shard(path, rows)
    n = sum(len(r.responses) for r in rows)
    cut = sum(f == "length" for r in rows for f in r.finish_reasons)
    print(f"wrote {path}: {len(rows)} prompts, {n} responses, {cut} cut by --max_new_tokens",
          file=sys.stderr)
    if state.is_main_process and rows:
        r = rows[0]
        print(f"\n[{r.prompt_id}] {r.prompt[-1]['content']}\n-> {r.responses[0]}",
              file=sys.stderr)
    return path
