"""`selfplay score`: θ_t's summed log-prob of every reference and response, computed once.

Stored next to the pairs, these let the trainer run with one model in memory. Each stored
log-prob carries a stamp of what computed it (the fingerprint of the model's weights and the
truncation settings): it is only valid for exactly those tokens under exactly those weights,
and the trainer uses it only when the stamp matches its reference.
Input: generation shards (columns are added, same file names) or a pair dataset (written back
with its own columns).
"""

from __future__ import annotations

import sys
from pathlib import Path

from selfplay.config import DataSettings, ModelSettings, ScoringSettings
from selfplay.data.pairs import PreferencePair, ScoreStamp, read_pairs, write_pairs
from selfplay.data.shards import ShardRow, list_shards, pairs_file, pending, read_shard, write_shard
from selfplay.logprobs import score_texts
from selfplay.models import fingerprint, load_model


def stamp_for(model: ModelSettings, scoring: ScoringSettings) -> ScoreStamp:
    return ScoreStamp(model.model_name_or_path, scoring.max_length, scoring.max_prompt_length,
                      fingerprint(model.model_name_or_path), model.bf16)


def score_rows(lm, tok, rows: list[ShardRow], model: ModelSettings,
               scoring: ScoringSettings) -> None:
    """Fill the ref_logp_* / ref_ntok_* columns of generation rows, in place."""
    scored = score_texts(lm, tok, [(r.prompt, [r.reference] + r.responses) for r in rows],
                         scoring.max_length, scoring.max_prompt_length,
                         model.inference_batch_size(), scoring.logprob_chunk_size,
                         bf16=model.bf16)
    stamp = stamp_for(model, scoring).to_json()
    for r, (lps, nts) in zip(rows, scored):
        r.ref_logp_reference, r.ref_ntok_reference = lps[0], nts[0]
        r.ref_logp_responses, r.ref_ntok_responses = lps[1:], nts[1:]
        r.score_settings = stamp


def score_pairs(lm, tok, pairs: list[PreferencePair], model: ModelSettings,
                scoring: ScoringSettings) -> None:
    """Fill the reference log-probs of chosen and rejected, in place."""
    scored = score_texts(lm, tok, [(p.prompt, [p.chosen, p.rejected]) for p in pairs],
                         scoring.max_length, scoring.max_prompt_length,
                         model.inference_batch_size(), scoring.logprob_chunk_size,
                         bf16=model.bf16)
    stamp = stamp_for(model, scoring)
    for p, (lps, nts) in zip(pairs, scored):
        p.ref_logp_chosen, p.ref_logp_rejected = lps
        p.ref_ntok_chosen, p.ref_ntok_rejected = nts
        p.scored_with = stamp


def score(model: ModelSettings, data: DataSettings, scoring: ScoringSettings, out_dir: Path,
          overwrite: bool = False) -> list[Path]:
    """Score data.dataset (shards or pairs) into out_dir; finished files are skipped."""
    src, out_dir = Path(data.dataset), Path(out_dir)
    shards = list_shards(src) if src.is_dir() else []
    out_dir.mkdir(parents=True, exist_ok=True)
    lm = tok = None
    if shards:                                   # our own generation shards: add columns
        for p, dest in pending(shards, out_dir, overwrite, "scored"):
            if lm is None:
                lm, tok = load_model(model.model_name_or_path, model.device, model.dtype)
            rows = read_shard(p)
            score_rows(lm, tok, rows, model, scoring)
            write_shard(dest, rows)
            print(f"wrote {dest}: {len(rows)} prompts scored", file=sys.stderr)
        return [out_dir / p.name for p in shards]
    dest = pairs_file(out_dir, data.split)
    if dest.exists() and not overwrite:
        print(f"{dest} exists; skipping (--overwrite to redo).", file=sys.stderr)
        return [dest]
    pairs, res = read_pairs(data.dataset, data.split, data)
    lm, tok = load_model(model.model_name_or_path, model.device, model.dtype)
    score_pairs(lm, tok, pairs, model, scoring)
    write_pairs(dest, pairs, "spin" if res.layout == "spin" else "sppo")
    print(f"wrote {dest}: {len(pairs)} pairs scored", file=sys.stderr)
    return [dest]
