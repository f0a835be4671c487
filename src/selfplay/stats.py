"""The statistics every evaluation reports: an accuracy's 95% interval, and a paired test of a
change on the same prompts; and the interval of a speed ratio measured in paired rounds
(bench/). Pure functions of counts and measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z95 = 1.959963984540054          # the 97.5% quantile of the standard normal


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion k/n (95% by default):

        centre = (p̂ + z²/2n) / (1 + z²/n)
        half   = z √(p̂(1 − p̂)/n + z²/4n²) / (1 + z²/n)

    Unlike p̂ ± z√(p̂(1 − p̂)/n) it stays inside [0, 1] and does not collapse at 0 or n.
    """
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At k = 0 and k = n one end is exactly 0 or 1; rounding must not put it just inside.
    return (0.0 if correct == 0 else max(0.0, centre - half),
            1.0 if correct == n else min(1.0, centre + half))


# Student's t, 97.5% quantiles by degrees of freedom.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def ratio_interval(ratios: list[float]) -> tuple[float, float, float]:
    """Geometric mean of n paired speed ratios and its 95% t-interval, on the log scale:

        m = mean(log r),  s = sd(log r),  exp(m ± t₀.₉₇₅(n − 1) s / √n)

    Logs, because a ratio's noise is multiplicative and 2x and 0.5x should cancel. With one
    round there is no interval (NaN ends). Degrees of freedom between or past the table's rows
    take the next smaller row's quantile (wider, so never an optimistic interval).
    """
    if not ratios or any(r <= 0 for r in ratios):
        raise ValueError("ratio_interval needs positive ratios")
    logs = [math.log(r) for r in ratios]
    n = len(logs)
    m = sum(logs) / n
    if n == 1:
        return math.exp(m), math.nan, math.nan
    s = math.sqrt(sum((x - m) ** 2 for x in logs) / (n - 1))
    half = T975[max(k for k in T975 if k <= n - 1)] * s / math.sqrt(n)
    return math.exp(m), math.exp(m - half), math.exp(m + half)


def sign_test(gained: int, lost: int) -> float:
    """Exact two-sided sign test (exact McNemar) of a paired change: of the prompts whose
    outcome changed, `gained` went wrong → right and `lost` right → wrong. Under no change each
    is Binomial(g + l, ½):

        p = min(1, 2 · P(X ≤ min(g, l))),  X ~ Bin(g + l, ½)
    """
    n = gained + lost
    if n == 0:
        return 1.0
    k = min(gained, lost)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class PairedChange:
    """A model against a baseline on the same prompts (rows where both were checked)."""
    n: int
    gained: int          # baseline wrong, model right
    lost: int            # baseline right, model wrong
    delta: float         # the accuracy difference, model − baseline, on these n prompts
    p_value: float       # exact sign test


def paired_change(ours: list[bool | None], theirs: list[bool | None]) -> PairedChange:
    both = [(a, b) for a, b in zip(ours, theirs) if a is not None and b is not None]
    gained = sum(a and not b for a, b in both)
    lost = sum(b and not a for a, b in both)
    return PairedChange(len(both), gained, lost, (gained - lost) / len(both) if both else 0.0,
                        sign_test(gained, lost))
