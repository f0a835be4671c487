"""How an option is declared: its help, the commands that read it, and its effects.

Every option says once, where it is declared, what it changes:
  feeds      the stages of `selfplay run` whose outputs depend on its value (STAGES); a
             forced recipe change redoes exactly those (`effects.affected_stages`)
  resumable  it changes how work is done, not what it computes (a device, a batch size,
             where logs go): a resumed run, a resumed training and a reused generation
             shard may differ in it; every other option is part of the recipe they keep

An option is one or the other, never neither: tests/test_config.py fails on an option that
feeds nothing and is not resumable.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any

from selfplay.errors import SelfplayError

# The stages of `selfplay run`, by kind (effects.stage_kind reads a manifest key's kind):
#   sft       the SFT stage that makes θ_0 (manifest key "sft/train")
#   control   an iteration of the SFT control arm, --method sft ("iter{t}/sft")
#   generate, rank, convert, train, evaluate: the self-play iteration's stages
#   best      --select_on: the best model chosen and read on test ("best/evaluate"); an
#             evaluation, so every key that feeds `evaluate` feeds it too (effects.feeds)
# and two that are not stages of a run directory: `loop`, the shape of the loop itself (which
# stages exist), and `tasks`, the suite's export.
STAGES = ("sft", "control", "generate", "rank", "convert", "train", "evaluate", "best", "loop",
          "tasks")
ALL_STAGES = ("sft", "control", "generate", "rank", "convert", "train", "evaluate", "best")
TRAINING_STAGES = ("sft", "train", "control")

# Commands that read an option; `run` reads what its stages read.
INFER = frozenset({"generate", "score", "evaluate", "sft", "train", "run"})
TRAIN_CMDS = frozenset({"sft", "train", "run"})      # the optimizer and schedule
PAIR_CMDS = frozenset({"train", "run"})               # the pair losses


def opt(default: Any, help: str, commands, *, feeds: tuple[str, ...] = (),
        resumable: bool = False, choices: tuple | None = None,
        aliases: tuple[str, ...] = (), default_factory=None,
        command_defaults: dict[str, Any] | None = None) -> Any:
    """A settings field with its metadata (see the module docstring for feeds/resumable)."""
    meta = {"help": help, "commands": frozenset(commands), "choices": choices,
            "aliases": aliases, "command_defaults": command_defaults or {},
            "feeds": frozenset(feeds), "resumable": resumable}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def need(ok: bool, msg: str) -> None:
    """A settings check: raise `msg` as the one-sentence error when `ok` is false."""
    if not ok:
        raise SelfplayError(msg)
