"""Files written so that a reader never sees a partial one: a temporary name, then a rename;
the check that an output directory can be written before any work starts; and the reader of
our own JSONL files."""

from __future__ import annotations

import json
import os
from pathlib import Path

from selfplay.errors import SelfplayError


def writable_dir(path: Path, option: str = "--output_dir") -> Path:
    """`path` as a directory we can write, created if need be; checked before any work starts,
    so that a late write cannot lose finished work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SelfplayError(f"{option} {path} is a file, not a directory.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".selfplay-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise SelfplayError(f"{option} {path} cannot be written ({e.strerror}).") from None
    return path


def _tmp(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(path.name + ".tmp")


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    """Write to a temporary name, fsync, rename: readers never see a partial file."""
    tmp = _tmp(path)
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def write_json_atomic(path: Path, obj) -> None:
    """One JSON document, written to a temporary name and renamed."""
    tmp = _tmp(path)
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def write_parquet_atomic(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = _tmp(path)
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    tmp.replace(path)


def read_jsonl(path: Path) -> list[dict]:
    """The rows of one of our JSONL outputs; a truncated or corrupt file is one sentence."""
    rows = []
    with path.open("rb") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line.decode("utf-8")))
            except (UnicodeDecodeError, ValueError) as e:
                raise SelfplayError(f"{path}, line {n}: not a JSON row ({type(e).__name__}); "
                                    "the file is truncated or corrupt.") from None
    return rows
