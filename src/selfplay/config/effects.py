"""What the options' declared effects (options.py) decide: which recipe keys a resumed run,
a resumed training and a reused shard must share, which stages of `selfplay run` a changed key
redoes, and the one sentence that says what changed."""

from __future__ import annotations

import dataclasses
from typing import Any

from selfplay.config.options import ALL_STAGES
from selfplay.config.schema import FIELDS

# Keys that change how work is done, not what it computes.
RESUMABLE: frozenset[str] = frozenset(k for k, f in FIELDS.items() if f.metadata["resumable"])


def feeds(key: str) -> frozenset[str]:
    """The stage kinds a key's value changes (none for a resumable key; a key of no option,
    such as one of a manifest written by another version, feeds every stage)."""
    f = FIELDS.get(key)
    if f is None:
        return frozenset(ALL_STAGES)
    kinds = f.metadata["feeds"]
    return kinds | {"best"} if "evaluate" in kinds else kinds


def recipe_of(flat: dict[str, Any]) -> dict[str, Any]:
    """The keys of a flat config that what is computed depends on."""
    return {k: v for k, v in flat.items() if k not in RESUMABLE}


def backfilled(old: dict[str, Any], new: dict[str, Any], command: str) -> dict[str, Any]:
    """`old` (a recipe recorded by an earlier version) with the options it lacks, which did
    not exist then, taken at their defaults for `command`: the earlier version did what the
    default does, so they are no change."""
    missing = {k: FIELDS[k].metadata["command_defaults"].get(command, FIELDS[k].default)
               for k in new if k not in old and k in FIELDS
               and FIELDS[k].default is not dataclasses.MISSING}
    return {**missing, **old}


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The keys, not resumable, whose values differ between two records (a key of no option,
    such as a shard record's `model`, is always compared)."""
    return sorted(k for k in set(old) | set(new)
                  if k not in RESUMABLE and old.get(k) != new.get(k))


def describe_changes(old: dict[str, Any], new: dict[str, Any], keys: list[str],
                     most: int = 4) -> str:
    """`lr 1e-06 -> 2e-06; beta 0.1 -> 0.5`: the first `most` changed keys, old -> new."""
    return "; ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:most])


def stage_kind(stage: str) -> str:
    """The kind of a manifest stage key: "sft/train" is the SFT stage that makes θ_0, an
    iteration's "sft" the control arm's, "best/evaluate" the choice of the best model, the rest
    their own name after the "/"."""
    if stage == "sft/train":
        return "sft"
    if stage.startswith("best/"):
        return "best"
    kind = stage.split("/", 1)[1]
    return "control" if kind == "sft" else kind


def affected_stages(old: dict, new: dict, order: list[str]) -> list[str]:
    """The stages of `order` whose work reads a key that differs between two recipes;
    `iterations` entries count for their own iteration only."""
    hit: set[str] = set()
    for key in (k for k in set(old) | set(new) if old.get(k) != new.get(k)):
        if key != "iterations":
            hit |= {s for s in order if stage_kind(s) in feeds(key)}
            continue
        a, b = old.get(key) or [], new.get(key) or []
        for t in range(max(len(a), len(b))):
            o, n = (a[t] if t < len(a) else {}) or {}, (b[t] if t < len(b) else {}) or {}
            for k in (k for k in set(o) | set(n) if o.get(k) != n.get(k)):
                hit |= {s for s in order
                        if s.startswith(f"iter{t}/") and stage_kind(s) in feeds(k)}
    return [s for s in order if s in hit]
