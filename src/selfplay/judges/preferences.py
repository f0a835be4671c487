"""The K×K preference maths of SPPO: a judge's matrix, win rates against π_t, the training pair.

P[i][j] = P(y_i ≻ y_j), with P[j][i] = 1 − P[i][j] and ½ on the diagonal. From it,
win_rates() estimates each response's win rate against the current policy, P̂(y_i ≻ π_t),
as the mean over the K samples including the self term ½ (as the paper's code does), and
sppo_pair() picks chosen (highest) and rejected (lowest) with the columns of the official
SPPO data: chosen_probs = P[w][l], chosen_probs_win = P̂(y_w ≻ π_t),
chosen_probs_lose = P̂(y_l ≻ π_t).

PairRM-style estimators, over the K×K matrix of comparison logits C[i][j] = C(x, y_i, y_j)
(y_i in the left slot, y_j in the right; > 0 when y_i is better; the diagonal is never read):
  paper     s_i = mean_j (C[i,j] − C[j,i]) over all K columns (the zero self term included),
            then P[i][j] = σ(s_i − s_j) (uclaml/SPPO: llm-blender's rank(), whose scores are
            get_scores_from_cmps' mean of C − Cᵀ; s_i − s_j depends on the other candidates,
            uclaml/SPPO#15)
  pairwise  one comparison per ordered pair, symmetrised: P[i][j] = ½ (σ(C[i,j]) + σ(−C[j,i]))
`paper_from_logits` and `pairwise_from_logits` take C (a judge computes it batched);
`paper_estimator` and `pairwise_estimator` take a comparison function and build C pair by pair.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


def comparisons(compare: Compare, prompt: list[dict], responses: Sequence[str]) -> Matrix:
    """C[i][j] = compare(prompt, y_i, y_j) off the diagonal, 0 on it."""
    k = len(responses)
    return [[0.0 if i == j else compare(prompt, responses[i], responses[j]) for j in range(k)]
            for i in range(k)]


def paper_from_logits(c: Matrix) -> Matrix:
    """s_i = (1/K) Σ_j (C[i][j] − C[j][i]), P[i][j] = σ(s_i − s_j)."""
    k = len(c)
    s = [sum(c[i][j] - c[j][i] for j in range(k) if j != i) / k for i in range(k)]
    return from_scores(s)


def pairwise_from_logits(c: Matrix) -> Matrix:
    """P[i][j] = ½ (σ(C[i][j]) + σ(−C[j][i])), ½ on the diagonal; P[i][j] + P[j][i] = 1."""
    k = len(c)
    return [[0.5 if i == j else 0.5 * (_sigmoid(c[i][j]) + _sigmoid(-c[j][i]))
             for j in range(k)] for i in range(k)]


ESTIMATORS: dict[str, Callable[[Matrix], Matrix]] = {"paper": paper_from_logits,
                                                      "pairwise": pairwise_from_logits}


def paper_estimator(compare: Compare, prompt: list[dict], responses: Sequence[str]) -> Matrix:
    return paper_from_logits(comparisons(compare, prompt, responses))


def pairwise_estimator(compare: Compare, prompt: list[dict], responses: Sequence[str]) -> Matrix:
    return pairwise_from_logits(comparisons(compare, prompt, responses))


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
