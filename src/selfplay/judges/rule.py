"""The rule judge: for rows with a checker (the bundled task suite's `family` and `answer`),
right beats wrong and equal outcomes tie."""

from __future__ import annotations

from typing import Sequence

from selfplay.data.tasks import check
from selfplay.errors import SelfplayError
from selfplay.judges.preferences import Matrix, from_outcomes


class RuleJudge:
    name = "rule"

    def matrix(self, prompt: list[dict], responses: Sequence[str], extra: dict) -> Matrix:
        if not isinstance(extra.get("family"), str) or not isinstance(extra.get("answer"), str):
            raise SelfplayError("the rule judge needs rows with `family` and `answer` (the "
                                "bundled task suite); use --judge reward-model or pairrm.")
        return from_outcomes([check(extra["family"], extra["answer"], r) for r in responses])
