"""`selfplay rank` (SPPO): a judge compares the K responses of each prompt; the shards come
back with the K×K matrix, each response's win rate against π_t, and the judge's name.

Under `accelerate launch` each process judges a contiguous share of every shard's prompts
with its own judge (on its own GPU, where there are several), and the main process writes
the shard whole: the same file as one process would write.
"""

from __future__ import annotations

import sys
from pathlib import Path

from accelerate.utils import gather_object
from tqdm.auto import tqdm

from selfplay.data.shards import list_shards, pending, process_slice, read_shard, write_shard
from selfplay.errors import SelfplayError
from selfplay.judges import Judge, judge_many
from selfplay.judges.preferences import win_rates
from selfplay.launch import process_state

# Prompts judged per call: a batching judge (PairRM) compares all their pairs in one run,
# K·(K − 1) each, while the progress bar still moves every chunk.
PROMPTS_PER_CALL = 64


def rank(shards_dir: Path, out_dir: Path, judge: Judge, overwrite: bool = False) -> list[Path]:
    """Judge every shard of `shards_dir` into `out_dir` (same names); finished ones skip."""
    shards_dir, out_dir = Path(shards_dir), Path(out_dir)
    shards = list_shards(shards_dir)
    if not shards:
        raise SelfplayError(f"{shards_dir} holds no generation shards to rank.")
    state = process_state()
    out_dir.mkdir(parents=True, exist_ok=True)
    for p, dest in pending(shards, out_dir, overwrite, "ranked", say=state.is_main_process):
        rows = read_shard(p)
        if rows and len(rows[0].responses) < 2:
            raise SelfplayError(f"{p}: ranking needs K >= 2 responses per prompt; generate "
                                "with --num_samples 5 --temperature 0.7 --top_p 0.9.")
        lo, hi = process_slice(len(rows), state.process_index, state.num_processes)
        mine = rows[lo:hi]
        mats = []
        with tqdm(total=len(mine), desc=f"rank {p.name}", unit="prompt", mininterval=1.0,
                  disable=not state.is_local_main_process) as bar:
            for s in range(0, len(mine), PROMPTS_PER_CALL):
                chunk = mine[s:s + PROMPTS_PER_CALL]
                mats += judge_many(judge, [r.prompt for r in chunk],
                                   [r.responses for r in chunk], [r.extra for r in chunk])
                bar.update(len(chunk))
        mats = gather_object(mats)         # in process order: the shard's order
        for r, m in zip(rows, mats, strict=True):
            r.matrix, r.win_rates, r.judge = m, win_rates(m), judge.name
        if state.is_main_process:
            write_shard(dest, rows)
        state.wait_for_everyone()
    if state.is_main_process:
        print(f"ranked {len(shards)} shard(s) into {out_dir}", file=sys.stderr)
    return [out_dir / p.name for p in shards]
