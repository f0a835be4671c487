"""Each option's effects, declared once (config/options.py), and what is derived from them."""

from __future__ import annotations

import dataclasses

import pytest

from selfplay.config import (FIELDS, RESUMABLE, TrainingSettings, affected_stages, changes,
                             describe_changes, feeds, recipe_of, stage_kind)
from selfplay.config.options import STAGES, opt


def without_effect(fields) -> list[str]:
    """Options that declare no effect: they feed no stage and are not resumable, so a forced
    change, a resume and a reused shard would all pass over them silently."""
    return sorted(f.name for f in fields
                  if not f.metadata["resumable"] and not f.metadata["feeds"])


def test_every_option_feeds_a_stage_or_is_resumable():
    assert without_effect(FIELDS.values()) == []
    both = [k for k, f in FIELDS.items() if f.metadata["resumable"] and f.metadata["feeds"]]
    assert both == [], "a resumable option changes nothing a stage computes"
    unknown = {k: sorted(f.metadata["feeds"] - set(STAGES)) for k, f in FIELDS.items()
               if f.metadata["feeds"] - set(STAGES)}
    assert unknown == {}, f"stages that do not exist: {unknown}"


def test_the_check_sees_an_option_declared_without_effect():
    """A new option added as `opt(default, help, commands)` and nothing more is caught."""
    @dataclasses.dataclass
    class New:
        declared: int = opt(1, "fed", {"run"}, feeds=("train",))
        forgotten: int = opt(0, "a new option whose effect nobody declared", {"run"})
        how: int = opt(0, "resumable", {"run"}, resumable=True)

    assert without_effect(dataclasses.fields(New)) == ["forgotten"]


def test_resumable_keys_leave_every_record_alike():
    """The manifest's recipe, a training checkpoint's recipe and a shard's record are each
    compared without the resumable keys, derived from the one declaration."""
    assert {"batch_size", "engine", "device", "logging_steps", "report_to", "output_dir",
            "gradient_checkpointing", "save_steps"} <= RESUMABLE
    assert not {"learning_rate", "max_new_tokens", "seed", "beta"} & RESUMABLE
    flat = {f.name: f.default for f in dataclasses.fields(TrainingSettings)}
    assert set(recipe_of(flat)) == set(flat) - RESUMABLE
    # a shard made with another batch size or engine is the same shard; another budget is not
    shard = {"model": "m", "max_new_tokens": 8, "batch_size": 64, "engine": "hf"}
    assert changes(shard, {**shard, "batch_size": 16, "engine": "vllm"}) == []
    new = {**shard, "max_new_tokens": 4, "model": "n"}
    assert changes(shard, new) == ["max_new_tokens", "model"]
    assert describe_changes(shard, new, changes(shard, new)) == \
        "max_new_tokens 8 -> 4; model 'm' -> 'n'"


@pytest.mark.parametrize("key,kinds", [
    ("learning_rate", {"train"}), ("sft_learning_rate", {"sft", "control"}),
    ("max_new_tokens", {"generate", "evaluate", "best"}), ("judge", {"rank", "evaluate", "best"}),
    ("patience", {"loop", "best"}), ("batch_size", set()),
    ("no_such_key_of_an_older_manifest", {"sft", "control", "generate", "rank", "convert",
                                          "train", "evaluate", "best"})])
def test_feeds_reads_the_declaration(key, kinds):
    assert feeds(key) == kinds


def test_stage_kinds_of_manifest_keys():
    assert [stage_kind(k) for k in ("sft/train", "sft/evaluate", "iter0/sft", "iter3/rank",
                                    "best/evaluate")] \
        == ["sft", "evaluate", "control", "rank", "best"]
    # --patience changes only the choice; what the evaluations read, the choice too
    order = ["base/evaluate", "iter0/train", "iter0/evaluate", "best/evaluate"]
    assert affected_stages({"patience": 1}, {"patience": 2}, order) == ["best/evaluate"]
    assert affected_stages({"max_new_tokens": 8}, {"max_new_tokens": 4}, order) == \
        ["base/evaluate", "iter0/evaluate", "best/evaluate"]
    order = ["base/evaluate", "iter0/sft", "iter0/evaluate"]
    assert affected_stages({"sft_learning_rate": 1e-5}, {"sft_learning_rate": 2e-5}, order) \
        == ["iter0/sft"]
