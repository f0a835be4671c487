"""Read any supported dataset layout into one record type: prompt_id, prompt messages, reference.

Layouts (detected from the columns, or named with --dataset_layout):
  messages           UltraChat-style `messages` (+ optional `prompt`, `prompt_id`)
  spin               the published SPIN pairs: `real`, `generated` (lists of {role, content})
  prompt_completion  `prompt` / `completion` (strings, or TRL's conversational lists)
  alpaca             `instruction`, `input`, `output`
  preference         `prompt`, `chosen`, `rejected` (TRL and SPPO); the reference is `chosen`

A malformed row stops the read with the file and row named, unless skip_bad_rows is set, in
which case it is skipped and counted in the result. Nothing is dropped silently.

A prompt's id is a hash of its messages (roles and contents), whatever the layout or file it
comes from, so that the same prompt read from two layouts is one prompt; a dataset's own
`prompt_id` that differs from it is kept as the column `source_prompt_id`. Within one read, a
row that repeats an earlier row's prompt with the same answer (and, in the pair layouts, the
same generated/rejected answer) is dropped: it would only count that example twice. A row
that repeats a prompt with another answer is kept: several answers to one prompt are data (SFT
references, SPIN's K samples). Both are counted, and the first repeat named, in one line.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from selfplay import hub
from selfplay.data import tasks
from selfplay.data.shards import prompt_hash
from selfplay.errors import SelfplayError

LAYOUTS = ("messages", "spin", "prompt_completion", "alpaca", "preference")
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
BUILTIN_TASKS = "builtin:tasks"


@dataclass
class Example:
    prompt_id: str
    prompt: list[dict[str, str]]    # chat messages; the last one is a user turn
    reference: str                  # the reference (real) answer
    extra: dict[str, Any] = field(default_factory=dict)   # other columns, passed through


@dataclass
class ReadResult:
    examples: list[Example]
    layout: str
    files: list[str]
    skipped: list[str] = field(default_factory=list)   # "file: row N: reason"
    repeats_dropped: int = 0        # rows repeating an earlier row's prompt and answers
    repeats_kept: int = 0           # rows repeating an earlier row's prompt, other answers
    first_repeat: str = ""          # "FILE row N, the prompt of FILE row M"

    def repeats_line(self) -> str:
        """One sentence on the rows that repeat a prompt read before; empty when none do."""
        n = self.repeats_dropped + self.repeats_kept
        if not n:
            return ""
        return (f"{n} rows repeat a prompt read before (first: {self.first_repeat}): "
                f"{self.repeats_dropped} with the same answer dropped, as they would only count "
                f"twice; {self.repeats_kept} with another answer kept, as several answers to one "
                "prompt are data.")

    def summary(self) -> str:
        s = f"{len(self.examples)} examples ({self.layout} layout) from {len(self.files)} file(s)"
        if self.skipped:
            reasons = Counter(r.split(": ", 2)[-1] for r in self.skipped)
            s += f"; skipped {len(self.skipped)} bad rows (" + \
                ", ".join(f"{n}x {r}" for r, n in reasons.most_common(3)) + ")"
        return s


class RowError(ValueError):
    """A row that cannot be read; the reader adds file and row number."""


# ---------------------------------------------------------------------------------------
# Row parsers: one per layout, each returning (prompt messages, reference)
# ---------------------------------------------------------------------------------------

def _check_messages(msgs: Any, column: str) -> list[dict[str, str]]:
    if not isinstance(msgs, list) or not msgs:
        raise RowError(f"`{column}` must be a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or \
                not isinstance(m.get("content"), str):
            raise RowError(f"`{column}` message {i} is not a {{role, content}} pair of strings")
        out.append({"role": m["role"], "content": m["content"]})
    expected = "user"
    for i, m in enumerate(out):
        if i == 0 and m["role"] == "system":
            continue
        if m["role"] != expected:
            raise RowError(f"roles out of order in `{column}`: message {i} is {m['role']!r}, "
                           f"expected {expected!r}")
        expected = "assistant" if expected == "user" else "user"
    return out


def _split_at_assistant(msgs: list[dict[str, str]], turn: str, column: str):
    idx = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    if not idx:
        raise RowError(f"`{column}` has no assistant turn to use as the reference")
    i = idx[0] if turn == "first" else idx[-1]
    return msgs[:i], msgs[i]["content"]


def _as_prompt(value: Any, column: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise RowError(f"empty `{column}`")
        return [{"role": "user", "content": value}]
    msgs = _check_messages(value, column)
    if msgs[-1]["role"] != "user":
        raise RowError(f"`{column}` must end with a user turn")
    return msgs


def _as_answer(value: Any, column: str) -> str:
    if isinstance(value, list):   # TRL conversational: [{"role": "assistant", ...}] (or full chat)
        msgs = [m for m in value if isinstance(m, dict)]
        if not msgs or msgs[-1].get("role") != "assistant" or \
                not isinstance(msgs[-1].get("content"), str):
            raise RowError(f"`{column}` must end with an assistant message")
        value = msgs[-1]["content"]
    if not isinstance(value, str):
        raise RowError(f"`{column}` must be a string or a list of messages")
    return value


def _row_messages(row: dict, turn: str):
    return _split_at_assistant(_check_messages(row.get("messages"), "messages"), turn, "messages")


def _row_spin(row: dict, turn: str):
    return _split_at_assistant(_check_messages(row.get("real"), "real"), "last", "real")


def _row_prompt_completion(row: dict, turn: str):
    if "prompt" not in row or "completion" not in row:
        raise RowError("missing `prompt` or `completion`")
    return _as_prompt(row["prompt"], "prompt"), _as_answer(row["completion"], "completion")


def _row_alpaca(row: dict, turn: str):
    ins, inp = row.get("instruction"), row.get("input") or ""
    if not isinstance(ins, str) or not ins.strip():
        raise RowError("missing or empty `instruction`")
    if not isinstance(inp, str):
        raise RowError("`input` must be a string")
    text = ins.strip() + ("\n\n" + inp.strip() if inp.strip() else "")
    return [{"role": "user", "content": text}], _as_answer(row.get("output"), "output")


def _row_preference(row: dict, turn: str):
    if "chosen" not in row or "rejected" not in row:
        raise RowError("missing `chosen` or `rejected`")
    chosen = row["chosen"]
    if row.get("prompt") is not None:
        prompt = _as_prompt(row["prompt"], "prompt")
    elif isinstance(chosen, list):     # SPPO writes chosen = [user, assistant], prompt optional
        prompt, _ = _split_at_assistant(_check_messages(chosen, "chosen"), "last", "chosen")
    else:
        raise RowError("missing `prompt` (and `chosen` is not a message list to take it from)")
    _as_answer(row["rejected"], "rejected")
    return prompt, _as_answer(chosen, "chosen")


def _answer_text(value: Any) -> str:
    """A pair layout's other answer (a string, or a chat ending with it) as text; "" if none."""
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        return str(value[-1].get("content"))
    return "" if value is None else str(value)


PARSERS = {"messages": _row_messages, "spin": _row_spin,
           "prompt_completion": _row_prompt_completion, "alpaca": _row_alpaca,
           "preference": _row_preference}
# Columns a layout consumes; everything else is passed through in Example.extra.
CONSUMED = {"messages": {"messages", "prompt", "prompt_id"}, "spin": {"real", "prompt_id"},
            "prompt_completion": {"prompt", "completion", "prompt_id"},
            "alpaca": {"instruction", "input", "output", "prompt_id"},
            "preference": {"prompt", "chosen", "prompt_id"}}


def detect_layout(columns: set[str], source: str) -> str:
    if "real" in columns:
        return "spin"
    if {"chosen", "rejected"} <= columns:
        return "preference"
    if "messages" in columns:
        return "messages"
    if {"instruction", "output"} <= columns:
        return "alpaca"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    raise SelfplayError(
        f"{source}: cannot tell the layout from its columns {sorted(columns)}; expected "
        "`messages`, `real`/`generated`, `prompt`/`completion`, `instruction`/`output` or "
        "`prompt`/`chosen`/`rejected` (or name it with --dataset_layout).")


# ---------------------------------------------------------------------------------------
# Sources: files, directories, hub ids, the bundled suite
# ---------------------------------------------------------------------------------------

def _iter_file(path: Path) -> Iterator[tuple[int, dict | Exception]]:
    """(row number, row) pairs; a row that is not valid JSON comes back as the exception."""
    if path.suffix == ".jsonl":
        with path.open("rb") as fh:      # decoded per line: one bad byte is one bad row
            for n, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8").lstrip("\ufeff")
                except UnicodeDecodeError as e:
                    yield n, RowError(f"not UTF-8 text (byte {e.start} of the line)")
                    continue
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    yield n, RowError(f"not valid JSON ({e.msg})")
                    continue
                yield n, row if isinstance(row, dict) else RowError("not a JSON object")
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as e:
            raise SelfplayError(f"{path}: not valid JSON at line {e.lineno} ({e.msg}).") from None
        except UnicodeDecodeError as e:
            raise SelfplayError(f"{path}: not UTF-8 text (byte {e.start}).") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise SelfplayError(f"{path}: a .json dataset must hold a list of rows.")
        for n, row in enumerate(data, 1):
            yield n, row if isinstance(row, dict) else RowError("not a JSON object")
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq
        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises many types for a bad file
            raise SelfplayError(f"{path}: not a readable parquet file ({e}).") from None
        for n, row in enumerate(table.to_pylist(), 1):
            yield n, row
    else:
        raise SelfplayError(f"{path}: unsupported file type; use .jsonl, .json or .parquet.")


SPLIT_NAMES = ("train", "test", "validation", "valid", "eval", "dev")


def split_of(p: Path) -> str | None:
    """The split a data file's name gives it (`train_prefs-…`, `test.jsonl`), if any."""
    stem = p.stem.lower()
    return next((s for s in SPLIT_NAMES if stem == s or stem.startswith((s + "_", s + "-"))),
                None)


def files_for_split(directory: Path, split: str) -> list[Path]:
    """Data files of a split in a directory, in the naming of the published datasets.

    `train_prefs-00000-of-00001.parquet`, `data/train-*.parquet` and `train_sft*.parquet` are
    all split `train`. A directory whose files name no split is one split, whatever is asked.
    """
    files = sorted(p for p in directory.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file()
                   and not p.name.startswith("."))
    if not files:
        raise SelfplayError(f"{directory} holds no .jsonl, .json or .parquet files.")
    if not any(split_of(p) for p in files):
        return files
    chosen = [p for p in files if split_of(p) == split.lower()
              or p.stem.lower().startswith(split.lower())]
    if not chosen:
        found = sorted({split_of(p) for p in files if split_of(p)})
        raise SelfplayError(f"{directory} has no files for split {split!r}; it has: "
                            f"{', '.join(found)}.")
    return chosen


def _hub_rows(dataset_id: str, split: str) -> Iterator[tuple[str, int, dict]]:
    online = hub.reachable()
    if not online:    # datasets would retry the network for half a minute; offline, it reads
        os.environ["HF_DATASETS_OFFLINE"] = "1"                 # only its local cache
    import datasets

    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE or not online
    try:
        ds = datasets.load_dataset(dataset_id, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises connection and lookup errors alike
        # Offline, datasets reads only what an earlier load_dataset prepared in its own cache,
        # not the hub cache that `hf download --repo-type dataset` fills; that snapshot is a
        # plain directory, which load_dataset reads with the hub's split names.
        snapshot = None if online else hub_snapshot(dataset_id)
        if snapshot is None:
            where = "a cached hub dataset, and the hub cannot be reached" if not online else \
                f"a hub dataset ({type(e).__name__})"
            raise SelfplayError(
                f"dataset {dataset_id!r} split {split!r} is neither a local file or directory "
                f"nor {where}; pass a local path with --dataset.") from None
        try:
            ds = datasets.load_dataset(snapshot, split=split)
        except Exception as e:  # noqa: BLE001 - an unknown split is a ValueError, others vary
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise SelfplayError(f"dataset {dataset_id!r} is in the local Hugging Face cache "
                                f"({snapshot}) but split {split!r} cannot be read from it: "
                                f"{why}") from None
    for n, row in enumerate(ds, 1):
        yield f"{dataset_id}[{split}]", n, row


def hub_snapshot(dataset_id: str) -> str | None:
    """The directory of a hub dataset's cached snapshot (refs/main), or None."""
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(dataset_id, repo_type="dataset", local_files_only=True)
    except (OSError, ValueError):      # not cached, or not a valid repository id
        return None


def _source_rows(source: str, split: str, tasks_seed: int, tasks_sizes: dict[str, int] | None
                 ) -> tuple[list[str], Iterator[tuple[str, int, Any]]]:
    """The files a source reads, and its rows as (file, row number, row)."""
    if source == BUILTIN_TASKS:
        rows = tasks.split_rows(split, seed=tasks_seed, sizes=tasks_sizes)
        return [BUILTIN_TASKS], ((f"{BUILTIN_TASKS}[{split}]", n, r)
                                 for n, r in enumerate(rows, 1))
    path = Path(source).expanduser()
    if path.is_file():
        return [str(path)], ((str(path), n, r) for n, r in _iter_file(path))
    if path.is_dir():
        paths = files_for_split(path, split)
        return [str(p) for p in paths], ((str(p), n, r) for p in paths
                                         for n, r in _iter_file(p))
    if source.startswith((".", "/", "~")) or Path(source).suffix in DATA_SUFFIXES:
        raise SelfplayError(f"dataset {source} does not exist.")
    return [source], _hub_rows(source, split)


def read_examples(source: str, split: str = "train", layout: str = "auto",
                  reference_turn: str = "first", skip_bad_rows: bool = False,
                  max_prompts: int = 0, tasks_seed: int = 0,
                  tasks_sizes: dict[str, int] | None = None, skip_prompts: int = 0) -> ReadResult:
    """Read a dataset into Examples; see the module docstring for layouts and error handling."""
    files, stream = _source_rows(source, split, tasks_seed, tasks_sizes)
    if layout != "auto" and layout not in PARSERS:
        raise SelfplayError(f"--dataset_layout {layout!r} is not one of: {', '.join(LAYOUTS)}.")
    examples: list[Example] = []
    skipped: list[str] = []
    file_layout: dict[str, str] = {}
    first_seen: dict[str, str] = {}                 # prompt_id -> where it was first read
    answers_seen: set[tuple[str, str, str]] = set()
    dropped = kept = 0
    first_repeat = ""
    for fname, n, row in stream:
        if max_prompts and len(examples) >= skip_prompts + max_prompts:
            break
        try:
            if isinstance(row, Exception):
                raise row
            lay = layout if layout != "auto" else file_layout.get(fname)
            if lay is None:
                lay = file_layout[fname] = detect_layout(set(row), fname)
            prompt, reference = PARSERS[lay](row, reference_turn)
            if not reference.strip():
                raise RowError("empty reference answer")
            if not prompt or prompt[-1]["role"] != "user":
                raise RowError("the prompt does not end with a user turn")
        except RowError as e:
            msg = f"{fname}: row {n}: {e}"
            if not skip_bad_rows:
                raise SelfplayError(msg + " (use --skip_bad_rows to skip such rows).") from None
            skipped.append(msg)
            continue
        pid = prompt_hash(prompt)
        extra = {k: v for k, v in row.items() if k not in CONSUMED[lay]}
        if row.get("prompt_id") not in (None, "") and str(row["prompt_id"]) != pid:
            extra.setdefault("source_prompt_id", row["prompt_id"])
        where = f"{fname} row {n}"
        if pid in first_seen:
            first_repeat = first_repeat or f"{where}, the prompt of {first_seen[pid]}"
        key = (pid, reference, _answer_text(extra.get("generated", extra.get("rejected"))))
        if key in answers_seen:
            dropped += 1
            continue
        kept += pid in first_seen
        first_seen.setdefault(pid, where)
        answers_seen.add(key)
        examples.append(Example(pid, prompt, reference, extra))
    layouts = sorted(set(file_layout.values())) or ([layout] if layout != "auto" else ["?"])
    usable = len(examples)
    examples = examples[skip_prompts:]
    if not examples and usable:
        raise SelfplayError(f"{source} (split {split!r}) has {usable} usable rows, and "
                            f"--skip_prompts {skip_prompts} skips them all.")
    if not examples:
        raise SelfplayError(f"{source} (split {split!r}) has no usable rows"
                            + (f": all {len(skipped)} were bad." if skipped else "."))
    return ReadResult(examples, "+".join(layouts), files, skipped, dropped, kept, first_repeat)


def report_read(res: ReadResult) -> None:
    """What a read gave, skipped and found repeated, on stderr."""
    print(f"read {res.summary()}", file=sys.stderr)
    for msg in res.skipped[:5]:
        print(f"  skipped: {msg}", file=sys.stderr)
    if res.repeats_line():
        print(res.repeats_line(), file=sys.stderr)
