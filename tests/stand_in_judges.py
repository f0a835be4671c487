"""Judges for tests, importable as `stand_in_judges:NAME` (a user's `module:function`)."""

import time

from selfplay.judges.preferences import from_scores


def by_length(prompt, responses, extra):
    """Prefers longer responses: P(i ≻ j) = σ((len_i − len_j) / 10)."""
    return from_scores([len(r) / 10 for r in responses])


def always_tie(prompt, responses, extra):
    """Cannot tell any two responses apart."""
    return from_scores([0.0] * len(responses))


def tie_on_odd(prompt, responses, extra):
    """Ties all samples of a prompt whose text has an odd length; else by_length."""
    if len(prompt[-1]["content"]) % 2:
        return always_tie(prompt, responses, extra)
    return by_length(prompt, responses, extra)


def slow_by_length(prompt, responses, extra):
    """by_length at a model judge's pace (10 ms a prompt): a rank long enough to interrupt."""
    time.sleep(0.01)
    return by_length(prompt, responses, extra)
