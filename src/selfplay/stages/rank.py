"""`selfplay rank` (SPPO): a judge compares the K responses of each prompt; the shards come
back with the K×K matrix, each response's win rate against π_t, and the judge's name."""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from selfplay.data.shards import list_shards, pending, read_shard, write_shard
from selfplay.errors import SelfplayError
from selfplay.judges import Judge
from selfplay.judges.preferences import win_rates


def rank(shards_dir: Path, out_dir: Path, judge: Judge, overwrite: bool = False) -> list[Path]:
    """Judge every shard of `shards_dir` into `out_dir` (same names); finished ones skip."""
    shards_dir, out_dir = Path(shards_dir), Path(out_dir)
    shards = list_shards(shards_dir)
    if not shards:
        raise SelfplayError(f"{shards_dir} holds no generation shards to rank.")
    out_dir.mkdir(parents=True, exist_ok=True)
    for p, dest in pending(shards, out_dir, overwrite, "ranked"):
        rows = read_shard(p)
        if rows and len(rows[0].responses) < 2:
            raise SelfplayError(f"{p}: ranking needs K >= 2 responses per prompt; generate "
                                "with --num_samples 5 --temperature 0.7 --top_p 0.9.")
        for r in tqdm(rows, desc=f"rank {p.name}", unit="prompt", mininterval=1.0):
            r.matrix = judge.matrix(r.prompt, r.responses, r.extra)
            r.win_rates = win_rates(r.matrix)
            r.judge = judge.name
        write_shard(dest, rows)
    return [out_dir / p.name for p in shards]
