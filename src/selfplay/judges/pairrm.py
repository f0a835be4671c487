"""PairRM through llm-blender, an optional extra (`pip install llm-blender` and its weights)."""

from __future__ import annotations

import importlib
from typing import Sequence

from selfplay.errors import SelfplayError
from selfplay.judges.preferences import Matrix, pairwise_estimator, paper_estimator


class PairRMJudge:
    name = "pairrm"

    def __init__(self, estimator: str = "paper", model: str = "llm-blender/PairRM"):
        try:
            blender_mod = importlib.import_module("llm_blender")
        except ImportError:
            raise SelfplayError("--judge pairrm needs the optional package llm-blender "
                                "(pip install llm-blender) and the PairRM weights.") from None
        self.blender = blender_mod.Blender()
        self.blender.loadranker(model)
        self.estimate = paper_estimator if estimator == "paper" else pairwise_estimator

    def _compare(self, prompt: list[dict], a: str, b: str) -> float:
        text = prompt[-1]["content"]
        return float(self.blender.compare([text], [a], [b], return_logits=True)[0])

    def matrix(self, prompt: list[dict], responses: Sequence[str], extra: dict) -> Matrix:
        return self.estimate(self._compare, prompt, responses)
