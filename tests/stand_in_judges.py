"""Judges for tests, importable as `stand_in_judges:NAME` (a user's `module:function`)."""

import time

from selfplay.judges.preferences import from_scores


def by_length(prompt, responses, extra):
    """Prefers longer responses: P(i ≻ j) = σ((len_i − len_j) / 10)."""
    return from_scores([len(r) / 10 for r in responses])


def always_tie(prompt, responses, extra):
    """Cannot tell any two responses apart."""
    return from_scores([0.0] * len(responses))


def slow_by_length(prompt, responses, extra):
    """by_length at a model judge's pace (10 ms a prompt): a rank long enough to interrupt."""
    time.sleep(0.01)
    return by_length(prompt, responses, extra)
