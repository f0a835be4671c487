"""Shard files and the record they hold.

A generation shard is one process's slice of one fraction of a split:
`{split}-frac{NNNNN}-rank{NNN}-of{NNN}.jsonl`, one `ShardRow` per prompt. `generate` writes
it, `score` and `rank` add columns to the same rows (same file names in their own
directories), and `convert` merges them into pairs. Every file is written to a temporary name
and renamed when complete, so a finished file is never partial and a re-run never appends.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from selfplay.errors import SelfplayError
from selfplay.io import read_jsonl, write_jsonl_atomic

SHARD_RE = re.compile(
    r"^(?P<split>.+)-frac(?P<frac>\d+)-rank(?P<rank>\d+)-of(?P<world>\d+)\.jsonl$")


# ---------------------------------------------------------------------------------------
# The shard row
# ---------------------------------------------------------------------------------------

def prompt_hash(messages: list[dict[str, str]]) -> str:
    """A prompt's id (the key of shard rows and pairs): its messages' roles and contents, not
    the layout or file they came from."""
    blob = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class ShardRow:
    """One prompt with θ_t's K responses; scoring and ranking fill the optional columns.

    The field order is the JSON key order of the files (published shards stay byte-stable).
    """
    prompt_id: str
    prompt: list[dict[str, str]]
    reference: str
    responses: list[str]
    response_tokens: list[int | None]
    finish_reasons: list[str | None]
    extra: dict[str, Any] = field(default_factory=dict)      # the dataset's other columns
    settings: dict[str, Any] | None = None                   # how the responses were generated
    # `score`: θ_t's summed log-prob and token count of the reference and of each response
    ref_logp_reference: float | None = None
    ref_ntok_reference: int | None = None
    ref_logp_responses: list[float] | None = None
    ref_ntok_responses: list[int] | None = None
    score_settings: dict[str, Any] | None = None   # model, truncation, fingerprint
    # `rank`: the judge's K×K matrix, each response's win rate against π_t, and who judged
    matrix: list[list[float]] | None = None
    win_rates: list[float] | None = None
    judge: str | None = None

    @property
    def scored(self) -> bool:
        return self.ref_logp_responses is not None

    @property
    def ranked(self) -> bool:
        return self.matrix is not None

    def to_json(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None or f.name in _REQUIRED:
                out[f.name] = v
        return out

    @classmethod
    def from_json(cls, row: dict[str, Any], source: str = "") -> "ShardRow":
        try:
            return cls(**{k: row[k] for k in _KNOWN if k in row})
        except TypeError as e:
            raise SelfplayError(f"{source}: row {row.get('prompt_id', '?')!r} is not a "
                                f"generation shard row ({e}).") from None


_KNOWN = [f.name for f in fields(ShardRow)]
_REQUIRED = {"prompt_id", "prompt", "reference", "responses", "response_tokens",
             "finish_reasons", "extra"}


def read_shard(path: Path) -> list[ShardRow]:
    return [ShardRow.from_json(r, str(path)) for r in read_jsonl(path)]


def write_shard(path: Path, rows: list[ShardRow]) -> None:
    write_jsonl_atomic(path, [r.to_json() for r in rows])


# ---------------------------------------------------------------------------------------
# Naming and scanning
# ---------------------------------------------------------------------------------------

def shard_name(split: str, data_frac: int, rank: int, world: int) -> str:
    return f"{split}-frac{data_frac:05d}-rank{rank:03d}-of{world:03d}.jsonl"


CONVERT_REPORT = "convert_report.json"     # beside the pair files: what convert made of them


def pairs_file(output_dir: Path, split: str) -> Path:
    """Where `convert` writes a split's pairs: the published datasets' naming."""
    return Path(output_dir) / f"{split}_prefs-00000-of-00001.parquet"


def list_shards(directory: Path) -> list[Path]:
    """Every complete shard file in a directory, sorted by name."""
    return sorted(p for p in Path(directory).glob("*.jsonl") if SHARD_RE.match(p.name))


def pending(shards: list[Path], out_dir: Path, overwrite: bool, done: str, say: bool = True
            ) -> list[tuple[Path, Path]]:
    """(shard, its output in out_dir) for each shard a stage has still to process; a finished
    output is skipped, with a word (`say`), unless overwrite."""
    todo = []
    for p in shards:
        dest = Path(out_dir) / p.name
        if dest.exists() and not overwrite:
            if say:
                print(f"{dest} is {done} already; skipping it.", file=sys.stderr)
        else:
            todo.append((p, dest))
    return todo


def find_shards(shards_dir: Path, split: str, num_fracs: int) -> tuple[list[Path], list[str]]:
    """Complete shard files of a split, in order, and a description of each missing one."""
    by_frac: dict[int, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
    paths: dict[tuple[int, int, int], Path] = {}
    for p in list_shards(shards_dir):
        m = SHARD_RE.match(p.name)
        if m["split"] != split:
            continue
        f, r, w = int(m["frac"]), int(m["rank"]), int(m["world"])
        by_frac[f][w].add(r)
        paths[(f, w, r)] = p
    missing: list[str] = []
    fracs = range(num_fracs) if num_fracs else range(max(by_frac) + 1 if by_frac else 0)
    chosen: list[Path] = []
    for f in fracs:
        if f not in by_frac:
            missing.append(f"{split} fraction {f}")
            continue
        # A fraction re-generated with another process count: the complete set wins.
        complete = [w for w, ranks in by_frac[f].items() if ranks == set(range(w))]
        if not complete:
            w = max(by_frac[f], key=lambda w: len(by_frac[f][w]))
            lost = sorted(set(range(w)) - by_frac[f][w])
            missing.append(f"{split} fraction {f} process shard(s) {lost} of {w}")
            chosen += [paths[(f, w, r)] for r in sorted(by_frac[f][w])]
        else:
            w = min(complete)
            chosen += [paths[(f, w, r)] for r in range(w)]
    return chosen, missing


def fraction(n: int, data_frac: int, frac_len: int) -> tuple[int, int]:
    """[start, end) of fraction data_frac; frac_len 0 is the whole split."""
    if frac_len == 0:
        return 0, n
    start = data_frac * frac_len
    return start, min(start + frac_len, n)


def process_slice(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous, balanced [start, end) of n items for one of `world` processes."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)
