"""Generation shards in, the published SPIN pair layout out (`selfplay convert`).

Output: `{train,test}_prefs-00000-of-00001.parquet` with columns `real` and `generated` (lists of
{role, content}), as in the published UCLA-AGI/SPIN_iter* datasets, so that those and ours are
interchangeable; plus `prompt_id`, the generation's token count and finish reason, and, when the
shards were scored, the reference log-probs the trainer uses instead of a second model.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from selfplay.errors import SelfplayError
from selfplay.generation import read_jsonl

SHARD_RE = re.compile(r"^(?P<split>.+)-frac(?P<frac>\d+)-rank(?P<rank>\d+)-of(?P<world>\d+)\.jsonl$")
SPLITS = ("train", "test")


def pairs_file(output_dir: Path, split: str) -> Path:
    return output_dir / f"{split}_prefs-00000-of-00001.parquet"


def find_shards(shards_dir: Path, split: str, num_fracs: int) -> tuple[list[Path], list[str]]:
    """Complete shard files of a split, in order, and a description of each missing one."""
    by_frac: dict[int, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
    paths: dict[tuple[int, int, int], Path] = {}
    for p in shards_dir.glob(f"{split}-frac*.jsonl"):
        m = SHARD_RE.match(p.name)
        if not m or m["split"] != split:
            continue
        f, r, w = int(m["frac"]), int(m["rank"]), int(m["world"])
        by_frac[f][w].add(r)
        paths[(f, w, r)] = p
    missing: list[str] = []
    fracs = range(num_fracs) if num_fracs else range(max(by_frac) + 1 if by_frac else 0)
    chosen: list[Path] = []
    for f in fracs:
        if f not in by_frac:
            missing.append(f"{split} fraction {f}")
            continue
        # A fraction re-generated with another process count: the complete set wins.
        complete = [w for w, ranks in by_frac[f].items() if ranks == set(range(w))]
        if not complete:
            w = max(by_frac[f], key=lambda w: len(by_frac[f][w]))
            lost = sorted(set(range(w)) - by_frac[f][w])
            missing.append(f"{split} fraction {f} process shard(s) {lost} of {w}")
            chosen += [paths[(f, w, r)] for r in sorted(by_frac[f][w])]
        else:
            w = min(complete)
            chosen += [paths[(f, w, r)] for r in range(w)]
    return chosen, missing


def _scalar_extras(extra: dict) -> dict:
    return {k: v for k, v in extra.items() if isinstance(v, (str, int, float, bool))}


def shard_rows_to_pairs(rows: list[dict]) -> list[dict]:
    """One SPIN pair per generated response (SPIN generates one; K samples give K pairs)."""
    pairs = []
    for r in rows:
        real = r["prompt"] + [{"role": "assistant", "content": r["reference"]}]
        for k, resp in enumerate(r["responses"]):
            pair = {"prompt_id": r["prompt_id"], "real": real,
                    "generated": r["prompt"] + [{"role": "assistant", "content": resp}],
                    "generated_tokens": r["response_tokens"][k],
                    "finish_reason": r["finish_reasons"][k], **_scalar_extras(r.get("extra", {}))}
            if "ref_logp_reference" in r:
                s = r["score_settings"]
                pair.update({"ref_logp_real": r["ref_logp_reference"],
                             "ref_ntok_real": r["ref_ntok_reference"],
                             "ref_logp_generated": r["ref_logp_responses"][k],
                             "ref_ntok_generated": r["ref_ntok_responses"][k],
                             "score_model": s["model"], "score_max_length": s["max_length"],
                             "score_max_prompt_length": s["max_prompt_length"]})
            pairs.append(pair)
    return pairs


def ranked_rows_to_sppo_pairs(rows: list[dict]) -> tuple[list[dict], int]:
    """SPPO pairs from ranked rows (K responses + the judge's K×K matrix), in the official
    SPPO columns; prompts whose K responses all tie are left out and counted."""
    from selfplay.judges import sppo_pair

    pairs, ties = [], 0
    for r in rows:
        sel = sppo_pair(r["matrix"])
        if sel is None:
            ties += 1
            continue
        w, l = sel["chosen_index"], sel["rejected_index"]
        pair = {"prompt_id": r["prompt_id"], "prompt": r["prompt"],
                "chosen": r["prompt"] + [{"role": "assistant", "content": r["responses"][w]}],
                "rejected": r["prompt"] + [{"role": "assistant", "content": r["responses"][l]}],
                "chosen_probs": sel["chosen_probs"], "chosen_probs_win": sel["chosen_probs_win"],
                "chosen_probs_lose": sel["chosen_probs_lose"], "judge": r["judge"],
                "finish_reason": r["finish_reasons"][l], **_scalar_extras(r.get("extra", {}))}
        if "ref_logp_responses" in r:
            s = r["score_settings"]
            pair.update({"ref_logp_chosen": r["ref_logp_responses"][w],
                         "ref_logp_rejected": r["ref_logp_responses"][l],
                         "score_model": s["model"], "score_max_length": s["max_length"],
                         "score_max_prompt_length": s["max_prompt_length"]})
        pairs.append(pair)
    return pairs, ties


def write_parquet_atomic(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    tmp.replace(path)


def convert(shards_dir: str | Path, output_dir: str | Path, num_fracs: int = 0,
            allow_missing: bool = False) -> dict:
    """Merge shards into pair files; returns the report (also written as JSON).

    Generation shards give SPIN pairs (`real`, `generated`); ranked shards (`selfplay rank`)
    give SPPO pairs (`chosen`, `rejected`, `chosen_probs`, `chosen_probs_win`,
    `chosen_probs_lose`).
    """
    shards_dir, output_dir = Path(shards_dir), Path(output_dir)
    if not shards_dir.is_dir():
        raise SelfplayError(f"shard directory {shards_dir} does not exist.")
    report: dict = {"shards_dir": str(shards_dir), "splits": {}}
    found_any = False
    for split in SPLITS:
        # As in the official convert_data.py, --num_fracs counts train fractions; the test split
        # is generated once, whole, as fraction 0.
        files, missing = find_shards(shards_dir, split, num_fracs if split == "train" else 0)
        if not files and not missing:
            continue
        found_any = True
        if missing and not allow_missing:
            raise SelfplayError(f"{shards_dir}: missing {'; '.join(missing)} (generate them, or "
                                "pass --allow_missing_shards to convert what is there).")
        rows, seen, dups = [], set(), 0
        for f in files:
            for row in read_jsonl(f):
                if row["prompt_id"] in seen:
                    dups += 1
                    continue
                seen.add(row["prompt_id"])
                rows.append(row)
        ties = 0
        if rows and "matrix" in rows[0]:
            pairs, ties = ranked_rows_to_sppo_pairs(rows)
        else:
            pairs = shard_rows_to_pairs(rows)
        output_dir.mkdir(parents=True, exist_ok=True)
        if pairs:
            write_parquet_atomic(pairs_file(output_dir, split), pairs)
        n_trunc = sum(p["finish_reason"] == "length" for p in pairs)
        report["splits"][split] = {
            "shards": len(files), "missing": missing, "prompts": len(rows), "pairs": len(pairs),
            "duplicate_prompt_ids_dropped": dups, "all_tie_prompts_left_out": ties,
            "truncated_share": n_trunc / len(pairs) if pairs else 0.0,
            "scored": bool(pairs) and all("ref_logp_real" in p or "ref_logp_chosen" in p
                                          for p in pairs),
            "file": str(pairs_file(output_dir, split)) if pairs else None}
        if pairs and "chosen_probs_win" in pairs[0]:
            for col in ("chosen_probs_win", "chosen_probs_lose"):
                report["splits"][split][f"mean_{col}"] = sum(p[col] for p in pairs) / len(pairs)
    if not found_any:
        raise SelfplayError(f"{shards_dir} holds no generation shards (files named "
                            "SPLIT-fracNNNNN-rankNNN-ofNNN.jsonl, as `selfplay generate` writes).")
    (output_dir / "convert_report.json").write_text(json.dumps(report, indent=2))
    return report
