"""The preference pair: one typed record between convert, score and train; its two column sets.

In memory a pair is always (chosen, rejected): for SPIN, chosen is the dataset's answer
("real") and rejected θ_t's ("generated"); for SPPO, the most and least preferred of θ_t's K
samples, with the judge's probabilities. On disk it takes the columns of the published datasets,
so that those and ours are interchangeable:

  spin   `real`, `generated` (message lists), as UCLA-AGI/SPIN_iter*; our extra columns:
         `generated_tokens`, `finish_reason`, `ref_logp_real`, `ref_ntok_real`,
         `ref_logp_generated`, `ref_ntok_generated`, `score_*` (the stamp: model, truncation,
         fingerprint of the weights)
  sppo   `chosen`, `rejected` (whole chats: the prompt's turns and the answer),
         `chosen_probs`, `chosen_probs_win`, `chosen_probs_lose`, as the official SPPO data
         (without its `prompt` string, which TRL's DPOTrainer cannot read beside chats);
         ours: `judge`, `finish_reason`, `ref_logp_chosen`, `ref_logp_rejected`, `score_*`.
         TRL's DPOTrainer reads these files as they are.

This module is the only place that knows those column names. TRL-style preference rows
(`prompt`, `chosen`, `rejected`) read as the sppo columns without probabilities.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from selfplay.config import DataSettings
from selfplay.data.formats import Example, ReadResult, read_examples, report_read
from selfplay.errors import SelfplayError
from selfplay.io import write_parquet_atomic


@dataclass(frozen=True)
class ScoreStamp:
    """What a stored log-prob was computed with; it is valid only for exactly this: the same
    weights (`models.fingerprint`) under the same truncation and precision (--bf16). The
    model's name is kept for people; two stamps compare by the rest."""
    model: str = field(compare=False)
    max_length: int
    max_prompt_length: int
    fingerprint: str | None        # None: written by selfplay before 015e55c (2026-11-23),
                                   # which named models only: never matches
    bf16: bool = False             # written only when true: float32 stamps read as before

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "max_length": self.max_length,
                "max_prompt_length": self.max_prompt_length, "fingerprint": self.fingerprint,
                **({"bf16": True} if self.bf16 else {})}

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> "ScoreStamp | None":
        return cls(d["model"], d["max_length"], d["max_prompt_length"],
                   d.get("fingerprint"), bool(d.get("bf16"))) if d else None

    def matches(self, other: "ScoreStamp | None") -> bool:
        return other is not None and self.fingerprint is not None and self == other


@dataclass
class PreferencePair:
    prompt_id: str
    prompt: list[dict[str, str]]
    chosen: str                          # SPIN: the dataset's answer; SPPO: the preferred sample
    rejected: str                        # SPIN: θ_t's answer; SPPO: the least preferred sample
    rejected_tokens: int | None = None   # θ_t's generated token count (SPIN)
    finish_reason: str | None = None     # of the rejected (generated) answer: eos or length
    # θ_t's summed log-probs, stored so that training needs no second model
    ref_logp_chosen: float | None = None
    ref_logp_rejected: float | None = None
    ref_ntok_chosen: int | None = None
    ref_ntok_rejected: int | None = None
    scored_with: ScoreStamp | None = None
    # SPPO: P(chosen ≻ rejected), P̂(chosen ≻ π_t), P̂(rejected ≻ π_t), and the judge
    chosen_probs: float | None = None
    chosen_probs_win: float | None = None
    chosen_probs_lose: float | None = None
    judge: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)   # the dataset's scalar columns

    @property
    def has_reference(self) -> bool:
        return self.ref_logp_chosen is not None and self.ref_logp_rejected is not None


def _chat(prompt: list[dict[str, str]], answer: str) -> list[dict[str, str]]:
    return prompt + [{"role": "assistant", "content": answer}]


def _stamp_columns(s: ScoreStamp) -> dict[str, Any]:
    return {"score_model": s.model, "score_max_length": s.max_length,
            "score_max_prompt_length": s.max_prompt_length, "score_fingerprint": s.fingerprint,
            **({"score_bf16": True} if s.bf16 else {})}


def spin_row(p: PreferencePair) -> dict[str, Any]:
    row = {"prompt_id": p.prompt_id, "real": _chat(p.prompt, p.chosen),
           "generated": _chat(p.prompt, p.rejected), "generated_tokens": p.rejected_tokens,
           "finish_reason": p.finish_reason, **p.extra}
    if p.scored_with is not None:
        row.update({"ref_logp_real": p.ref_logp_chosen, "ref_ntok_real": p.ref_ntok_chosen,
                    "ref_logp_generated": p.ref_logp_rejected,
                    "ref_ntok_generated": p.ref_ntok_rejected, **_stamp_columns(p.scored_with)})
    return row


def sppo_row(p: PreferencePair) -> dict[str, Any]:
    # No `prompt` column: `chosen`/`rejected` are whole chats, which SPPO's (alignment
    # handbook) reader splits at the last turn and TRL's DPOTrainer splits at their common
    # prefix; beside them, a `prompt` column of messages would give TRL the prompt twice.
    row = {"prompt_id": p.prompt_id, "chosen": _chat(p.prompt, p.chosen),
           "rejected": _chat(p.prompt, p.rejected), "chosen_probs": p.chosen_probs,
           "chosen_probs_win": p.chosen_probs_win, "chosen_probs_lose": p.chosen_probs_lose,
           "judge": p.judge, "finish_reason": p.finish_reason, **p.extra}
    if p.scored_with is not None:
        row.update({"ref_logp_chosen": p.ref_logp_chosen, "ref_logp_rejected": p.ref_logp_rejected,
                    **_stamp_columns(p.scored_with)})
    return row


def write_pairs(path: Path, pairs: list[PreferencePair], columns: str) -> None:
    """Pairs to parquet with the `spin` or `sppo` columns."""
    write_parquet_atomic(path, [(sppo_row if columns == "sppo" else spin_row)(p) for p in pairs])


# ---------------------------------------------------------------------------------------
# Reading: any pair dataset the readers accept, into PreferencePair
# ---------------------------------------------------------------------------------------

# Columns of either kind that become PreferencePair fields (not extra).
_SPIN_COLS = {"generated", "generated_tokens", "finish_reason", "ref_logp_real", "ref_ntok_real",
              "ref_logp_generated", "ref_ntok_generated", "score_model", "score_max_length",
              "score_max_prompt_length", "score_fingerprint", "score_bf16"}
_SPPO_COLS = {"rejected", "chosen_probs", "chosen_probs_win", "chosen_probs_lose", "judge",
              "finish_reason", "ref_logp_chosen", "ref_logp_rejected", "ref_ntok_chosen",
              "ref_ntok_rejected", "score_model", "score_max_length", "score_max_prompt_length",
              "score_fingerprint", "score_bf16"}


def _answer(value: Any, source: str) -> str:
    if isinstance(value, list):
        if not value or not isinstance(value[-1], dict) or value[-1].get("role") != "assistant":
            raise SelfplayError(f"{source}: a generated/rejected message list must end with an "
                                "assistant turn.")
        return value[-1]["content"]
    return str(value)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def pair_from_example(ex: Example, source: str) -> PreferencePair:
    """An Example read from a pair dataset; fails with the reason when it holds no pair."""
    e = ex.extra
    spin = "generated" in e
    if not spin and "rejected" not in e:
        raise SelfplayError(
            f"{source} has prompts and answers but no generated (or rejected) responses to "
            "train against; make pairs with `selfplay generate --score` and "
            "`selfplay convert` first (or use `selfplay run`).")
    w, l = ("real", "generated") if spin else ("chosen", "rejected")
    stamp = ScoreStamp(e["score_model"], e["score_max_length"], e["score_max_prompt_length"],
                       e.get("score_fingerprint"), bool(e.get("score_bf16"))) \
        if e.get("score_model") is not None else None
    cols = _SPIN_COLS if spin else _SPPO_COLS
    return PreferencePair(
        prompt_id=ex.prompt_id, prompt=ex.prompt, chosen=ex.reference,
        rejected=_answer(e["generated" if spin else "rejected"], source),
        rejected_tokens=e.get("generated_tokens"), finish_reason=e.get("finish_reason"),
        ref_logp_chosen=_num(e.get(f"ref_logp_{w}")),
        ref_logp_rejected=_num(e.get(f"ref_logp_{l}")),
        ref_ntok_chosen=e.get(f"ref_ntok_{w}"), ref_ntok_rejected=e.get(f"ref_ntok_{l}"),
        scored_with=stamp, chosen_probs=_num(e.get("chosen_probs")),
        chosen_probs_win=_num(e.get("chosen_probs_win")),
        chosen_probs_lose=_num(e.get("chosen_probs_lose")), judge=e.get("judge"),
        extra={k: v for k, v in e.items() if k not in cols})


def read_pairs(source: str, split: str, data: DataSettings
               ) -> tuple[list[PreferencePair], ReadResult]:
    """Every pair of one dataset, and the reader's result (layout, files, skipped rows); what
    was read, skipped and repeated is reported on stderr."""
    res = read_examples(source, split, data.dataset_layout, data.reference_turn,
                        data.skip_bad_rows, data.max_prompts, data.tasks_seed,
                        data.tasks_sizes(), data.skip_prompts)
    report_read(res)
    return [pair_from_example(ex, source) for ex in res.examples], res


# ---------------------------------------------------------------------------------------
# What convert made of the shards
# ---------------------------------------------------------------------------------------

@dataclass
class SplitReport:
    shards: int
    missing: list[str]
    prompts: int
    pairs: int
    duplicate_prompt_ids_dropped: int
    all_tie_prompts_left_out: int
    truncated_share: float               # rejected (generated) answers cut by the token limit
    scored: bool                         # every pair carries reference log-probs
    file: str | None
    identical_pairs_dropped: int = 0              # SPIN, with drop_identical
    empty_responses: int = 0        # pairs with an empty side: kept (θ_t's answer), counted
    mean_chosen_probs_win: float | None = None    # SPPO only
    mean_chosen_probs_lose: float | None = None
    earlier_opponents: int | None = None   # --opponent_history: answers of earlier iterates

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items()
                if v is not None or not k.startswith(("mean_", "earlier_"))}


@dataclass
class ConvertReport:
    shards_dir: str
    splits: dict[str, SplitReport] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"shards_dir": self.shards_dir,
                "splits": {k: v.to_json() for k, v in self.splits.items()}}

    @classmethod
    def read(cls, path: Path) -> "ConvertReport":
        d = json.loads(Path(path).read_text())
        return cls(d["shards_dir"], {k: SplitReport(**v) for k, v in d["splits"].items()})
