"""Files written so that a reader never sees a partial one: a temporary name, then a rename;
the check that an output directory can be written before any work starts; the lock that
keeps a second command from writing into it meanwhile; and the reader of our own JSONL
files."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
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


@contextlib.contextmanager
def _atomic(path: Path):
    """The temporary name to write `path` under, renamed to it when the write completes and
    removed when it fails (a full disk leaves no half file behind)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    """Write to a temporary name, fsync, rename: readers never see a partial file."""
    with _atomic(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def write_json_atomic(path: Path, obj) -> None:
    """One JSON document, written to a temporary name and renamed."""
    with _atomic(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2))


def write_parquet_atomic(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with _atomic(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)


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


# ---------------------------------------------------------------------------------------
# One writer per output directory
# ---------------------------------------------------------------------------------------

LOCK_NAME = ".selfplay-lock"


@contextlib.contextmanager
def output_lock(directory: Path, command: str):
    """Hold `directory` for one command while it writes: a second writer fails at once, in a
    sentence naming the holder. The hold is an exclusive flock on OUT/.selfplay-lock, which
    also names the holder (pid, host, command); the kernel releases it when the holder dies,
    so a lock left by a process killed with -9 is taken over, with a line saying so. A lock
    naming another host (a shared filesystem) is respected: its process cannot be checked
    from here. Under a launcher the job's main process (RANK 0) holds it for all its
    processes: if it cannot, it fails, and the launcher ends the others before they write."""
    if int(os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0"))) != 0:
        yield
        return
    path = Path(directory) / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
          "since": time.time()}
    fd = _acquire(path, me)
    try:
        yield
    finally:
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                path.unlink()
        except FileNotFoundError:
            pass
        os.close(fd)


def _held(path: Path, holder: dict, elsewhere: bool = False) -> SelfplayError:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return SelfplayError(
        f"{path.parent} is being written by another selfplay command (`selfplay "
        f"{holder.get('command', '?')}`, pid {holder.get('pid', '?')} on "
        f"{holder.get('host', '?')}, since {since}); wait for it to end, or give another "
        "--output_dir" + (f" (if nothing runs there any more, remove {path})" if elsewhere
                          else "") + ".")


def _acquire(path: Path, me: dict) -> int:
    """The open lock file, flocked and naming us."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _held(path, _read_lock(path)) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:               # the holder removed it as we opened it: open the new one
            os.close(fd)
            continue
        holder = _read_lock(path)
        if holder.get("host") not in (None, me["host"]):
            os.close(fd)
            raise _held(path, holder, elsewhere=True)
        if holder.get("pid") not in (None, me["pid"]):
            print(f"{path.parent}: taking over the lock of `selfplay "
                  f"{holder.get('command', '?')}` (pid {holder['pid']}), which is no longer "
                  "running.", file=sys.stderr)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        return fd


def _read_lock(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}
