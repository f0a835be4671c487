"""Preference oracles for SPPO: a judge turns K responses to one prompt into a K×K matrix.

  rule          responses with a checkable answer (the task suite): right beats wrong, ties ½
  reward-model  any Hugging Face sequence-classification reward model: σ(r_i − r_j)
  pairrm        PairRM through llm-blender (optional extra), with either estimator of
                `preferences`
  a callable    `module:function`, for users' own judges

Every judge has a `name` and `matrix(prompt, responses, extra) -> K×K`; the maths on the
matrix lives in `preferences`.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from selfplay.config import RankSettings
from selfplay.errors import SelfplayError
from selfplay.judges.callable import CallableJudge
from selfplay.judges.pairrm import PairRMJudge
from selfplay.judges.preferences import Matrix
from selfplay.judges.reward_model import RewardModelJudge
from selfplay.judges.rule import RuleJudge


class Judge(Protocol):
    name: str

    def matrix(self, prompt: list[dict], responses: Sequence[str], extra: dict) -> Matrix: ...


def make_judge(settings: RankSettings, device: str = "cpu") -> Judge:
    name = settings.judge
    if name == "rule":
        return RuleJudge()
    if name == "reward-model":
        if not settings.reward_model:
            raise SelfplayError("--judge reward-model needs --reward_model (a hub id or path).")
        return RewardModelJudge(settings.reward_model, device)
    if name == "pairrm":
        return PairRMJudge(settings.pairrm_estimator)
    if ":" in name:
        return CallableJudge(name)
    raise SelfplayError(f"--judge {name!r} is not one of: rule, reward-model, pairrm, or "
                        "module:function.")
