"""Memory of sharded training (FSDP2) on 1, 2 and 4 CPU processes, the default model.

    python bench/bench_sharding.py [--processes 1,2,4] [--steps 2] [--json out.json]

Each configuration is `accelerate launch --multi_gpu --num_processes P -m selfplay train
--fsdp true` on the embedded default model (SmolLM2-135M-Instruct), AdamW, the same global
batch at every P, a few updates on short pairs; and one plain (unsharded) process for
reference. What each process held comes from the training's own record
(training_complete.json, "sharding"): its bytes of weights, gradients and AdamW state (about
16 bytes a parameter unsharded), and its peak resident memory. Printed side by side with
their ratios to one process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
MIB = 2 ** 20


def pairs(d: Path, n: int = 16) -> Path:
    rows = []
    for i in range(n):
        u = {"role": "user", "content": f"What is {i} plus {i}?"}
        rows.append({"prompt_id": f"p{i}",
                     "real": [u, {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}],
                     "generated": [u, {"role": "assistant", "content": f"Maybe {i}?"}]})
    d.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), d / "train_prefs-00000-of-00001.parquet")
    return d


def train(processes: int, sharded: bool, data: Path, out: Path, steps: int,
          global_batch: int) -> dict:
    args = ["train", "--model", "default", "--dataset", str(data), "--output_dir", str(out),
            "--optim", "adamw", "--max_steps", str(steps), "--report_to", "none",
            "--max_length", "128", "--max_prompt_length", "64",
            "--per_device_train_batch_size", str(global_batch // processes)]
    if sharded:
        args += ["--fsdp", "true"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
              "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision",
              "no", "--dynamo_backend", "no"] if processes > 1 else [sys.executable]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    res = subprocess.run(launch + ["-m", "selfplay", *args], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // processes))})
    if res.returncode != 0:
        raise SystemExit(res.stderr[-3000:])
    seconds = time.perf_counter() - t
    done = json.loads((out / "training_complete.json").read_text())
    if not sharded:             # the plain process: the largest child's peak, no record
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        return {"processes": 1, "sharded": False, "seconds": round(seconds, 1),
                "peak_rss_bytes_per_process": [peak * 1024] if peak > before else None}
    return {**done["sharding"], "sharded": True, "seconds": round(seconds, 1)}


def table(runs: list[dict]) -> str:
    base = next(r for r in runs if r["sharded"] and r["processes"] == 1)
    state0 = max(base["state_bytes_per_process"])
    rss0 = base["peak_rss_bytes_per_process"][0]
    lines = ["| processes | sharded state per process, MiB | vs 1 process | peak RSS, main "
             "process, MiB | peak RSS, other processes (max), MiB | others vs 1 process |"
             " seconds |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        rss = r.get("peak_rss_bytes_per_process") or [0]
        if not r["sharded"]:
            lines.append(f"| 1, unsharded | – | – | {rss[0] / MIB:.0f} | – | – | "
                         f"{r['seconds']} |")
            continue
        state = max(r["state_bytes_per_process"])
        others = max(rss[1:]) if len(rss) > 1 else None
        lines.append(
            f"| {r['processes']} | {state / MIB:.0f} | {state / state0:.2f}x | "
            f"{rss[0] / MIB:.0f} | {'–' if others is None else f'{others / MIB:.0f}'} | "
            f"{'–' if others is None else f'{others / rss0:.2f}x'} | {r['seconds']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--processes", default="1,2,4")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--global_batch", type=int, default=4)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    counts = [int(p) for p in a.processes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        data = pairs(Path(tmp) / "pairs")
        runs = [train(1, False, data, Path(tmp) / "plain", a.steps, a.global_batch)]
        for p in counts:
            runs.append(train(p, True, data, Path(tmp) / f"fsdp{p}", a.steps, a.global_batch))
            print(f"{p} process(es): {runs[-1]}", file=sys.stderr)
    out = {"model": "SmolLM2-135M-Instruct (the embedded default)", "optimizer": "adamw",
           "steps": a.steps, "global_batch": a.global_batch, "max_length": 128,
           "cpu": os.cpu_count(), "runs": runs}
    print(table(runs))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
