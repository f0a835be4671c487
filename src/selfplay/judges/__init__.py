"""Preference oracles for SPPO: a judge turns K responses to one prompt into a K×K matrix.

  rule          responses with a checkable answer (the task suite): right beats wrong, ties ½
  reward-model  any Hugging Face sequence-classification reward model: σ(r_i − r_j)
  pairrm        llm-blender's PairRM (reimplemented on transformers, `pairrm`), with either
                estimator of `preferences`
  a callable    `module:function`, for users' own judges

Every judge has a `name` and `matrix(prompt, responses, extra) -> K×K`; a judge that gains from
seeing many prompts at once (PairRM batches all their comparisons) also has
`matrices(prompts, responses, extras)`, which `judge_many` uses. The maths on the matrix lives
in `preferences`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

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


def judge_many(judge: Judge, prompts: Sequence[list[dict]], responses: Sequence[Sequence[str]],
               extras: Sequence[dict]) -> list[Matrix]:
    """Each prompt's matrix: in one call where the judge has `matrices`, else one by one."""
    many = getattr(judge, "matrices", None)
    if many is not None:
        return many(prompts, responses, extras)
    return [judge.matrix(p, r, e) for p, r, e in zip(prompts, responses, extras)]


def make_judge(settings: RankSettings, device: str | None = None) -> Judge:
    """`device`: the reward model's (default cpu) or PairRM's (default auto: a GPU if any)."""
    name = settings.judge
    if name == "rule":
        return RuleJudge()
    if name == "reward-model":
        if not settings.reward_model:
            raise SelfplayError("--judge reward-model needs --reward_model (a hub id or path).")
        return RewardModelJudge(settings.reward_model, device or "cpu")
    if name == "pairrm":
        return PairRMJudge(settings.pairrm_estimator, settings.pairrm_model, device or "auto")
    if ":" in name:
        return CallableJudge(name)
    raise SelfplayError(f"--judge {name!r} is not one of: rule, reward-model, pairrm, or "
                        "module:function.")
