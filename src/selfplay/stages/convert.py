"""`selfplay convert` (SPIN step 1.5): shards in, pairs out, with the published datasets' columns.

Generation shards give SPIN pairs (`real`, `generated`; one per response: SPIN generates one,
K samples give K); ranked shards (`selfplay rank`) give SPPO pairs (`chosen`, `rejected`,
`chosen_probs`, `chosen_probs_win`, `chosen_probs_lose`; prompts whose K responses all tie are
left out and counted). Output: `{train,test}_prefs-00000-of-00001.parquet`, so that published
datasets and ours are interchangeable, plus `convert_report.json`.

A shard row that repeats an earlier row's prompt and reference (overlapping shards) is left
out and counted. A pair with an empty response (θ_t ended at once, or decoded to whitespace) is
kept, as θ_t's own answer, which SPIN trains away from, and counted: never silently.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from selfplay.config import ConvertSettings
from selfplay.data.pairs import ConvertReport, PreferencePair, ScoreStamp, SplitReport, write_pairs
from selfplay.data.shards import (CONVERT_REPORT, SHARD_RE, ShardRow, find_shards, list_shards,
                                  pairs_file, read_shard)
from selfplay.errors import SelfplayError
from selfplay.io import write_json_atomic
from selfplay.judges.preferences import sppo_pair


def pair_split(shard_split: str) -> str:
    """The pairs file a shard split goes to: `train_sft` (UltraChat-200k's name) to train,
    `test_sft` to test; other names keep theirs."""
    return next((s for s in ("train", "test") if shard_split.lower().startswith(s)), shard_split)


def _scalar_extras(extra: dict) -> dict:
    return {k: v for k, v in extra.items() if isinstance(v, (str, int, float, bool))}


def _stamp(r: ShardRow) -> ScoreStamp | None:
    return ScoreStamp.from_json(r.score_settings) if r.scored else None


def spin_pairs(rows: list[ShardRow], drop_identical: bool = False
               ) -> tuple[list[PreferencePair], int]:
    """One SPIN pair per generated response: the dataset's answer against θ_t's (with
    drop_identical, not where the two are the same text); and how many were left out."""
    pairs, identical = [], 0
    for r in rows:
        for k, resp in enumerate(r.responses):
            if drop_identical and resp.strip() == r.reference.strip():
                identical += 1
                continue
            pairs.append(PreferencePair(
                prompt_id=r.prompt_id, prompt=r.prompt, chosen=r.reference, rejected=resp,
                rejected_tokens=r.response_tokens[k], finish_reason=r.finish_reasons[k],
                ref_logp_chosen=r.ref_logp_reference, ref_ntok_chosen=r.ref_ntok_reference,
                ref_logp_rejected=r.ref_logp_responses[k] if r.scored else None,
                ref_ntok_rejected=r.ref_ntok_responses[k] if r.scored else None,
                scored_with=_stamp(r), extra=_scalar_extras(r.extra)))
    return pairs, identical


def draw_opponents(rows: list[ShardRow], earlier: list[list[ShardRow]], key: str
                   ) -> tuple[list[ShardRow], int]:
    """Fictitious play (regularized SPIN, arXiv 2404.04291): each prompt's generated answers
    come from one of the last h iterates (θ_t's rows and `earlier`, h − 1 iterates' rows of
    the same prompts), drawn uniformly per prompt, seeded by `key`. Answers of an earlier
    iterate lose their stored log-probs, which were not θ_t's: training computes them with
    θ_t. Returns the rows and how many came from earlier iterates."""
    by_prompt = [{(r.prompt_id, r.reference): r for r in old} for old in earlier]
    out, drawn = [], 0
    for r in rows:
        options = [r] + [b[(r.prompt_id, r.reference)] for b in by_prompt
                         if (r.prompt_id, r.reference) in b]
        h = int(hashlib.sha256(f"{key}|{r.prompt_id}".encode()).hexdigest(), 16)
        pick = options[h % len(options)]
        if pick is not r:
            drawn += 1
            r = replace(r, responses=pick.responses, response_tokens=pick.response_tokens,
                        finish_reasons=pick.finish_reasons, ref_logp_responses=None,
                        ref_ntok_responses=None, score_settings=None)
        out.append(r)
    return out, drawn


def sppo_pairs(rows: list[ShardRow]) -> tuple[list[PreferencePair], int]:
    """The SPPO pair of each ranked prompt, and how many prompts tied throughout."""
    pairs, ties = [], 0
    for r in rows:
        c = sppo_pair(r.matrix)
        if c is None:
            ties += 1
            continue
        w, l = c.chosen_index, c.rejected_index
        pairs.append(PreferencePair(
            prompt_id=r.prompt_id, prompt=r.prompt, chosen=r.responses[w],
            rejected=r.responses[l], finish_reason=r.finish_reasons[l],
            ref_logp_chosen=r.ref_logp_responses[w] if r.scored else None,
            ref_logp_rejected=r.ref_logp_responses[l] if r.scored else None,
            scored_with=_stamp(r), chosen_probs=c.chosen_probs,
            chosen_probs_win=c.chosen_probs_win, chosen_probs_lose=c.chosen_probs_lose,
            judge=r.judge, extra=_scalar_extras(r.extra)))
    return pairs, ties


def convert(settings: ConvertSettings, out_dir: Path, opponents: list[Path] = (),
            draw_key: str = "") -> ConvertReport:
    """Merge the shards of settings.shards_dir into pair files in out_dir. With `opponents`
    (earlier iterates' shard directories), SPIN's generated answers of the train split are
    drawn from them too (draw_opponents, seeded by `draw_key`)."""
    shards_dir, out_dir = Path(settings.shards_dir), Path(out_dir)
    if not shards_dir.is_dir():
        raise SelfplayError(f"shard directory {shards_dir} does not exist.")
    report = ConvertReport(str(shards_dir))
    by_pairs: dict[str, list[str]] = {}
    for name in sorted({SHARD_RE.match(p.name)["split"] for p in list_shards(shards_dir)}):
        by_pairs.setdefault(pair_split(name), []).append(name)
    for split, names in sorted(by_pairs.items(), key=lambda kv: (kv[0] != "train", kv[0])):
        if len(names) > 1:
            raise SelfplayError(f"{shards_dir} holds shards of splits {' and '.join(names)}, "
                                f"which would both become {split} pairs: keep one of them.")
        shard_split = names[0]
        # As in the official convert_data.py, --num_fracs counts train fractions; the test split
        # is generated once, whole, as fraction 0.
        files, missing = find_shards(shards_dir, shard_split,
                                     settings.num_fracs if split == "train" else 0)
        if missing and not settings.allow_missing_shards:
            raise SelfplayError(f"{shards_dir}: missing {'; '.join(missing)} (generate them, or "
                                "pass --allow_missing_shards to convert what is there).")
        rows, seen, dups = [], set(), 0
        for f in tqdm(files, desc=f"convert {shard_split}", unit="shard", mininterval=1.0):
            for row in read_shard(f):
                # the same prompt with another reference is other data (the readers keep it)
                if (row.prompt_id, row.reference) in seen:
                    dups += 1
                    continue
                seen.add((row.prompt_id, row.reference))
                rows.append(row)
        ranked = bool(rows) and rows[0].ranked
        earlier = None
        if opponents and split == "train" and not ranked:
            rows, earlier = draw_opponents(
                rows, [[r for f in find_shards(d, shard_split, 0)[0] for r in read_shard(f)]
                       for d in opponents], draw_key)
        if ranked:
            (pairs, ties), identical = sppo_pairs(rows), 0
        else:
            (pairs, identical), ties = spin_pairs(rows, settings.drop_identical), 0
        out_dir.mkdir(parents=True, exist_ok=True)
        dest = pairs_file(out_dir, split)
        if pairs:
            write_pairs(dest, pairs, "sppo" if ranked else "spin")
        n = len(pairs)
        report.splits[split] = SplitReport(
            shards=len(files), missing=missing, prompts=len(rows), pairs=n,
            duplicate_prompt_ids_dropped=dups, all_tie_prompts_left_out=ties,
            identical_pairs_dropped=identical,
            empty_responses=sum(not (p.rejected.strip() and p.chosen.strip()) for p in pairs),
            truncated_share=sum(p.finish_reason == "length" for p in pairs) / n if n else 0.0,
            scored=bool(pairs) and all(p.has_reference for p in pairs),
            file=str(dest) if pairs else None,
            mean_chosen_probs_win=sum(p.chosen_probs_win for p in pairs) / n
            if ranked and n else None,
            mean_chosen_probs_lose=sum(p.chosen_probs_lose for p in pairs) / n
            if ranked and n else None, earlier_opponents=earlier)
    if not report.splits:
        raise SelfplayError(f"{shards_dir} holds no generation shards (files named "
                            "SPLIT-fracNNNNN-rankNNN-ofNNN.jsonl, as `selfplay generate` writes).")
    write_json_atomic(out_dir / CONVERT_REPORT, report.to_json())
    return report
