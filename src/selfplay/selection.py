"""The best iteration, chosen on validation (`selfplay run --select_on validation`).

Every model of a run (θ_0, then θ_{t+1} after each iteration t) is evaluated on the
validation split, and compared on the same prompts with the best model so far: it gains when
it turns more prompts right than wrong (gained > lost, so its accuracy is higher; the exact
sign test's p-value is kept beside it). After `patience` iterations in a row without a gain
the run stops. The best model is the last to have gained: the highest validation accuracy,
the earliest among equals, and never one below θ_0, which is the first candidate. The test
split is then read once, by θ_0 and that model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from selfplay.data.evaluations import Evaluation
from selfplay.errors import SelfplayError
from selfplay.stats import PairedChange, paired_change


@dataclass
class Candidate:
    """A model of the run and its evaluation on the validation split."""
    name: str
    path: str
    eval: Evaluation


@dataclass
class Verdict:
    """One candidate against the best before it, on the same validation prompts."""
    name: str
    path: str
    accuracy: float
    against: str | None          # the best model before it (None: θ_0, the first)
    change: PairedChange | None
    gain: bool


@dataclass
class Selection:
    verdicts: list[Verdict]
    best: int                    # index into verdicts
    patience: int
    stop: bool = False           # `patience` iterations in a row without a gain
    test: dict[str, Any] = field(default_factory=dict)   # filled once the test split is read

    @property
    def chosen(self) -> Verdict:
        return self.verdicts[self.best]

    def reason(self) -> str:
        """Why the best model is the best, in one sentence."""
        c = self.chosen
        if self.best == 0:
            return (f"No iteration answered more validation prompts right than {c.name} "
                    "(θ_0), which stays the best.")
        ch = c.change
        tail = (f"; the {len(self.verdicts) - 1 - self.best} iteration(s) after it did not gain "
                "on it") if self.best < len(self.verdicts) - 1 else ""
        return (f"{c.name} is the last model to gain on validation: {100 * ch.delta:+.1f} pts "
                f"against {c.against} ({ch.gained}↑ {ch.lost}↓ of {ch.n} prompts, sign test "
                f"p = {ch.p_value:.2g}){tail}.")

    def to_json(self) -> dict[str, Any]:
        return {"best": self.chosen.name, "path": self.chosen.path, "reason": self.reason(),
                "patience": self.patience, "stopped_early": self.stop,
                "verdicts": [{**asdict(v), "change": asdict(v.change) if v.change else None}
                             for v in self.verdicts], "test": self.test}


def select(candidates: list[Candidate], patience: int) -> Selection:
    """The best of `candidates` (θ_0 first, then each iteration's model in order) by paired
    gains on validation, and whether `patience` iterations in a row brought none."""
    first = candidates[0]
    for c in candidates:
        if c.eval.accuracy is None:
            raise SelfplayError(f"--select_on validation compares accuracies, and {c.name}'s "
                                f"evaluation on {c.eval.split or 'validation'} has no checkable "
                                "answer (a dataset without answers to check).")
    verdicts = [Verdict(first.name, first.path, first.eval.accuracy, None, None, True)]
    best, since = 0, 0
    for i, c in enumerate(candidates[1:], start=1):
        b = candidates[best]
        if c.eval.prompt_ids() != b.eval.prompt_ids():
            raise SelfplayError(f"{c.name} and {b.name} were evaluated on other prompts; a "
                                "paired comparison needs the same validation prompts.")
        ch = paired_change(c.eval.correct(), b.eval.correct())
        gain = ch.gained > ch.lost
        verdicts.append(Verdict(c.name, c.path, c.eval.accuracy, b.name, ch, gain))
        best, since = (i, 0) if gain else (best, since + 1)
    return Selection(verdicts, best, patience, stop=bool(patience) and since >= patience)


def read_selection(path: Path) -> dict[str, Any] | None:
    """A run's best/selection.json (None where the run selected nothing)."""
    return json.loads(path.read_text()) if path.exists() else None
