"""The evaluation record: one typed record that `evaluate` writes (eval.json) and `report`,
`compare` and `run` read.

    Evaluation      a model on a split's held-out prompts: accuracy with its 95% interval, per
                    family, reference likelihood, lengths, each prompt's row; against a
                    previous model, the win rate and the paired change (sign test)
    EvalRow         one prompt: the answer, its length, whether it was right
    FamilyScore     accuracy of one task family

The JSON keys and their order are those eval.json has always had, so files of earlier runs
read, and a rewritten file is byte for byte what evaluate wrote (the run manifest's checksums
cover it).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from selfplay.errors import SelfplayError
from selfplay.io import write_json_atomic
from selfplay.stats import PairedChange


@dataclass
class EvalRow:
    prompt_id: str
    family: str | None
    answer: str | None
    response: str
    n_tokens: int
    finish_reason: str
    correct: bool | None                 # None: no checkable answer

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "EvalRow":
        return cls(d.get("prompt_id"), d.get("family"), d.get("answer"), d.get("response", ""),
                   d.get("n_tokens", 0), d.get("finish_reason", ""), d.get("correct"))


@dataclass
class FamilyScore:
    n: int
    accuracy: float
    ci95: list[float]


@dataclass
class Evaluation:
    n: int
    accuracy: float | None               # None: no prompt has a checkable answer
    accuracy_ci95: list[float] | None    # Wilson interval
    per_family: dict[str, FamilyScore]
    reference_logp_per_token: float | None   # None: not measured
    mean_response_tokens: float
    truncated_share: float               # answers cut by the token limit
    settings: dict[str, Any]             # how the answers were made (budget, engine, ...)
    rows: list[EvalRow] | None           # None only for a baseline model's nested evaluation
    model: str = ""
    lm_eval: dict[str, Any] | None = None
    baseline: "Evaluation | None" = None     # a baseline model evaluated alongside
    win_rate: float | None = None        # against the baseline or previous model
    paired: PairedChange | None = None   # the change against it, on the same prompts
    dataset: str | None = None
    split: str | None = None
    judge_win_rate: float | None = None  # SPPO: the judge's P(this ≻ previous)
    judge: str | None = None

    def correct(self) -> list[bool | None]:
        """Per held-out prompt, whether the model was right (None: not checkable)."""
        return [r.correct for r in self.rows or []]

    def prompt_ids(self) -> list[str]:
        return [r.prompt_id for r in self.rows or []]

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "n": self.n, "accuracy": self.accuracy, "accuracy_ci95": self.accuracy_ci95,
            "per_family": {f: asdict(s) for f, s in self.per_family.items()},
            "reference_logp_per_token": self.reference_logp_per_token,
            "mean_response_tokens": self.mean_response_tokens,
            "truncated_share": self.truncated_share, "settings": self.settings}
        if self.rows is not None:
            d["rows"] = [asdict(r) for r in self.rows]
        d["model"] = self.model
        if self.lm_eval is not None:
            d["lm_eval"] = self.lm_eval
        if self.baseline is not None:
            d["baseline"] = self.baseline.to_json()
        if self.paired is not None:          # the win rate comes with it, null or not
            d["win_rate"], d["paired"] = self.win_rate, asdict(self.paired)
        if self.dataset is not None:
            d["dataset"], d["split"] = self.dataset, self.split
        if self.judge is not None:
            d["judge_win_rate"], d["judge"] = self.judge_win_rate, self.judge
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Evaluation":
        rows = d.get("rows")
        return cls(
            n=d["n"], accuracy=d.get("accuracy"), accuracy_ci95=d.get("accuracy_ci95"),
            per_family={f: FamilyScore(s["n"], s["accuracy"], s.get("ci95") or [])
                        for f, s in (d.get("per_family") or {}).items()},
            reference_logp_per_token=d.get("reference_logp_per_token"),
            mean_response_tokens=d.get("mean_response_tokens", 0.0),
            truncated_share=d.get("truncated_share", 0.0), settings=d.get("settings") or {},
            rows=None if rows is None else [EvalRow.from_json(r) for r in rows],
            model=d.get("model", ""), lm_eval=d.get("lm_eval"),
            baseline=cls.from_json(d["baseline"]) if d.get("baseline") else None,
            win_rate=d.get("win_rate"),
            paired=PairedChange(**d["paired"]) if d.get("paired") else None,
            dataset=d.get("dataset"), split=d.get("split"),
            judge_win_rate=d.get("judge_win_rate"), judge=d.get("judge"))

    @classmethod
    def read(cls, path: Path) -> "Evaluation":
        """An eval.json; one that is cut off or not an evaluation is one sentence."""
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except OSError as e:
            raise SelfplayError(f"{path} cannot be read ({e.strerror}).") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise SelfplayError(f"{path} is not a readable evaluation ({type(e).__name__}); "
                                "it is cut off or corrupt: evaluate the model again.") from None

    def write(self, path: Path) -> None:
        write_json_atomic(Path(path), self.to_json())


