"""A sequence-classification reward model as the judge: P(i beats j) = σ(r_i − r_j)."""

from __future__ import annotations

from typing import Sequence

import torch

from selfplay.judges.preferences import Matrix, from_scores
from selfplay.models import load_reward_model


class RewardModelJudge:
    name = "reward-model"

    def __init__(self, model: str, device: str = "cpu", batch_size: int = 16):
        self.model, self.tok = load_reward_model(model, device)
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def rewards(self, prompt: list[dict], responses: Sequence[str]) -> list[float]:
        texts = [self.tok.apply_chat_template(prompt + [{"role": "assistant", "content": r}],
                                              tokenize=False) for r in responses]
        out = []
        for s in range(0, len(texts), self.batch_size):
            enc = self.tok(texts[s:s + self.batch_size], return_tensors="pt", padding=True,
                           add_special_tokens=False, truncation=True).to(self.device)
            out += self.model(**enc).logits[:, 0].float().tolist()
        return out

    def matrix(self, prompt: list[dict], responses: Sequence[str], extra: dict) -> Matrix:
        return from_scores(self.rewards(prompt, responses))
