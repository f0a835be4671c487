"""The K×K preference maths of SPPO: a judge's matrix, win rates against π_t, the training pair.

P[i][j] = P(y_i ≻ y_j), with P[j][i] = 1 − P[i][j] and ½ on the diagonal. From it,
win_rates() estimates each response's win rate against the current policy, P̂(y_i ≻ π_t),
as the mean over the K samples including the self term ½ (as the paper's code does), and
sppo_pair() picks chosen (highest) and rejected (lowest) with the columns of the official
SPPO data: chosen_probs = P[w][l], chosen_probs_win = P̂(y_w ≻ π_t),
chosen_probs_lose = P̂(y_l ≻ π_t).

PairRM-style estimators, over a comparison function C(x, a, b) (a logit, > 0 when a is better):
  paper     s_i = mean_j (C[i,j] − C[j,i]) over all K columns (the zero diagonal included),
            then P[i][j] = σ(s_i − s_j) (uclaml/SPPO; s_i − s_j depends on the other
            candidates, uclaml/SPPO#15)
  pairwise  one comparison per ordered pair, symmetrised: P[i][j] = ½ (σ(C[i,j]) + σ(−C[j,i]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from selfplay.errors import SelfplayError

Matrix = list[list[float]]
Compare = Callable[[list[dict], str, str], float]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def from_scores(scores: Sequence[float]) -> Matrix:
    """Bradley–Terry: P[i][j] = σ(s_i − s_j)."""
    return [[_sigmoid(a - b) for b in scores] for a in scores]


def from_outcomes(correct: Sequence[bool]) -> Matrix:
    """Right beats wrong; equal outcomes count half."""
    return [[0.5 if a == b else (1.0 if a else 0.0) for b in correct] for a in correct]


def _comparisons(compare: Compare, prompt: list[dict], responses: Sequence[str]) -> Matrix:
    k = len(responses)
    return [[0.0 if i == j else compare(prompt, responses[i], responses[j]) for j in range(k)]
            for i in range(k)]


def paper_estimator(compare: Compare, prompt: list[dict], responses: Sequence[str]) -> Matrix:
    c, k = _comparisons(compare, prompt, responses), len(responses)
    s = [sum(c[i][j] - c[j][i] for j in range(k)) / k for i in range(k)]
    return from_scores(s)


def pairwise_estimator(compare: Compare, prompt: list[dict], responses: Sequence[str]) -> Matrix:
    c, k = _comparisons(compare, prompt, responses), len(responses)
    return [[0.5 if i == j else 0.5 * (_sigmoid(c[i][j]) + _sigmoid(-c[j][i]))
             for j in range(k)] for i in range(k)]


def win_rates(p: Matrix) -> list[float]:
    """P̂(y_i ≻ π_t): the mean of row i over all K samples, the self term ½ included."""
    return [sum(row) / len(row) for row in p]


@dataclass(frozen=True)
class SppoChoice:
    chosen_index: int
    rejected_index: int
    chosen_probs: float         # P(y_w ≻ y_l)
    chosen_probs_win: float     # P̂(y_w ≻ π_t)
    chosen_probs_lose: float    # P̂(y_l ≻ π_t)


def sppo_pair(p: Matrix) -> SppoChoice | None:
    """Chosen = highest win rate, rejected = lowest; None when all K responses tie."""
    w = win_rates(p)
    hi, lo = max(range(len(w)), key=w.__getitem__), min(range(len(w)), key=w.__getitem__)
    if math.isclose(w[hi], w[lo], abs_tol=1e-12):
        return None
    return SppoChoice(hi, lo, p[hi][lo], w[hi], w[lo])


def check_matrix(p, k: int, who: str) -> Matrix:
    """A judge's matrix must be K×K probabilities with P[i][j] + P[j][i] = 1."""
    rows = [list(map(float, r)) for r in p]
    if len(rows) != k or any(len(r) != k for r in rows):
        raise SelfplayError(f"judge {who} returned a matrix that is not {k}x{k}.")
    for i in range(k):
        for j in range(k):
            if not 0.0 <= rows[i][j] <= 1.0 or abs(rows[i][j] + rows[j][i] - 1.0) > 1e-6:
                raise SelfplayError(f"judge {who}: P[{i}][{j}] = {rows[i][j]} and P[{j}][{i}] = "
                                    f"{rows[j][i]} are not probabilities that sum to 1.")
    return rows
