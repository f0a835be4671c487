"""rank and evaluate on 1 and 2 processes: wall time side by side, and the ratio.

    python bench/bench_processes.py [--prompts 32] [--eval_prompts 64] [--json out.json]

Under a launcher each process judges or answers its share of the prompts and the main one
merges (tests/test_processes.py checks the outputs equal one process's). Here each command
is timed as a user runs it, `selfplay CMD` against `accelerate launch --num_processes 2 -m
selfplay CMD`, on the embedded default model:

  rank      K = 5 samples of the default model per train prompt, judged by a reward model of
            the default model's architecture (its weights, and a random score head: the
            time of a forward pass does not depend on the head's values)
  evaluate  the default model, greedy, on the suite's test prompts

On a machine with one GPU per process the shares run side by side; on CPU cores the two
processes share the machine's cores (each process is given half).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
          "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def timed(args: list[str], processes: int) -> float:
    cores = os.cpu_count() or 2
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // processes)),
           "SELFPLAY_ENGINE": "hf"}
    cmd = (LAUNCH if processes == 2 else [sys.executable]) + ["-m", "selfplay", *args]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(res.stderr[-3000:])
    return time.perf_counter() - t


def reward_model(where: Path) -> Path:
    import torch
    from transformers import AutoModelForSequenceClassification

    from selfplay.models import ensure_default_model, load_tokenizer
    torch.manual_seed(0)
    src = ensure_default_model()
    model = AutoModelForSequenceClassification.from_pretrained(src, num_labels=1)
    model.config.pad_token_id = load_tokenizer(str(src)).pad_token_id
    model.save_pretrained(where)
    load_tokenizer(str(src)).save_pretrained(where)
    return where


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--eval_prompts", type=int, default=64)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    out: dict = {"cpu_cores": os.cpu_count(), "model": "SmolLM2-135M-Instruct"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rm = reward_model(tmp / "rm")
        timed(["generate", "--output_dir", str(tmp / "samples"), "--max_prompts",
               str(a.prompts), "--num_samples", "5", "--temperature", "0.7", "--top_p", "0.9",
               "--max_new_tokens", "48"], 1)
        rank = ["rank", "--input_dir", str(tmp / "samples"), "--judge", "reward-model",
                "--reward_model", str(rm)]
        secs = {p: timed(rank + ["--output_dir", str(tmp / f"ranked{p}")], p) for p in (1, 2)}
        shard = "train-frac00000-rank000-of001.jsonl"
        mats = [[json.loads(r)["matrix"] for r in (tmp / f"ranked{p}" / shard).open()]
                for p in (1, 2)]
        # the processes' matrix products run on fewer threads: the same up to float rounding
        diff = max(abs(x - y) for m1, m2 in zip(*mats, strict=True) for r1, r2 in zip(m1, m2)
                   for x, y in zip(r1, r2))
        out["rank"] = {"prompts": a.prompts, "k": 5, "seconds": secs,
                       "ratio": secs[1] / secs[2], "max_abs_difference": diff}
        ev = ["evaluate", "--tasks_test_size", str(a.eval_prompts)]
        secs = {p: timed(ev + ["--output_dir", str(tmp / f"eval{p}")], p) for p in (1, 2)}
        rows = [json.loads((tmp / f"eval{p}" / "eval.json").read_text())["rows"] for p in (1, 2)]
        out["evaluate"] = {"prompts": a.eval_prompts, "seconds": secs,
                           "ratio": secs[1] / secs[2], "same_rows": rows[0] == rows[1]}
    print("| command | 1 process, s | 2 processes, s | speed-up | the same (rank: largest "
          "difference in P) |")
    print("|---|---|---|---|---|")
    for name, same in (("rank", "max_abs_difference"), ("evaluate", "same_rows")):
        r = out[name]
        print(f"| {name} ({r['prompts']} prompts) | {r['seconds'][1]:.1f} | "
              f"{r['seconds'][2]:.1f} | {r['ratio']:.2f}x | {r[same]} |")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
