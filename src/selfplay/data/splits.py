"""Which rows a command reads: the split a run evaluates on, the prompts held out of a
training split that is also evaluated on (by their id hashes), and the read itself with a
command's data settings (`read_for`)."""

from __future__ import annotations

import sys
from pathlib import Path

from selfplay.config import DataSettings
from selfplay.data.formats import (BUILTIN_TASKS, ReadResult, files_for_split, read_examples,
                                   report_read, split_of)
from selfplay.errors import SelfplayError


def read_for(data: DataSettings, split: str | None = None, held_out: bool = False
             ) -> ReadResult:
    """read_examples with a command's data settings, reporting what was read and skipped.

    Where the training split is also the one evaluated (holds_out), its prompts with the
    smallest ids (hashes of the prompt) are held out: `held_out` reads them alone, for an
    evaluation; otherwise they are left out, for training."""
    split = split or data.split
    if split != data.split or not holds_out(data):
        res = read_examples(data.dataset, split, data.dataset_layout, data.reference_turn,
                            data.skip_bad_rows, data.max_prompts, data.tasks_seed,
                            data.tasks_sizes(), data.skip_prompts)
        report_read(res)
        return res
    res = read_examples(data.dataset, split, data.dataset_layout, data.reference_turn,
                        data.skip_bad_rows, 0, data.tasks_seed, data.tasks_sizes(), 0)
    n = data.holdout_size if data.holdout_size > 0 else min(500, len(res.examples) // 10)
    if n == 0 or n >= len(res.examples):
        raise SelfplayError(f"{data.dataset} has no test split and {len(res.examples)} "
                            f"usable rows: too few to hold --holdout_size {n} out for "
                            "evaluation; give an evaluation split (--eval_split) or more rows.")
    held = set(sorted(e.prompt_id for e in res.examples)[:n])
    keep = [e for e in res.examples if (e.prompt_id in held) == held_out]
    if not held_out:
        rest = len(keep)
        keep = keep[data.skip_prompts:]
        keep = keep[:data.max_prompts] if data.max_prompts else keep
        if not keep:
            raise SelfplayError(f"{data.dataset} (split {split!r}) has {rest} prompts left to "
                                f"train on once {n} are held out for evaluation, and "
                                f"--skip_prompts {data.skip_prompts} skips them all.")
    print(f"{data.dataset} has no test split: {n} of its {len(res.examples)} prompts, those "
          "with the smallest id hashes, are held out for evaluation (--holdout_size), and "
          f"training reads the others; this read takes {len(keep)}.", file=sys.stderr)
    res.examples = keep
    report_read(res)
    return res


def has_split(source: str, split: str) -> bool:
    """Whether a local dataset directory has files of `split`, named as files_for_split names
    them (a hub dataset: never decided by what the cache holds; name its split with
    --eval_split)."""
    path = Path(source).expanduser()
    if not path.is_dir():
        return False
    try:
        files = files_for_split(path, split)     # every file, where none names a split
    except SelfplayError:
        return False
    return any(split_of(f) == split.lower() for f in files)


def holds_out(data: DataSettings) -> bool:
    """Whether the training split must give up prompts for evaluation: asked for
    (--holdout_size N), or, in `selfplay run` (-1), because the dataset has no split to
    evaluate on but the one it trains on."""
    if data.holdout_size == 0 or data.eval_split or data.dataset == BUILTIN_TASKS:
        return False
    return data.holdout_size > 0 or not has_split(data.dataset, "test")


def held_out_split(data: DataSettings) -> str:
    """The split evaluations read: --eval_split if given; else the suite's test split when the
    run trains on its train split; else, in `selfplay run`, a test split of the dataset's own,
    or the split given with prompts held out of it (holds_out)."""
    if data.eval_split:
        return data.eval_split
    if data.dataset == BUILTIN_TASKS and data.split == "train":
        return "test"
    if data.holdout_size < 0 and data.split != "test" and has_split(data.dataset, "test"):
        return "test"
    return data.split
