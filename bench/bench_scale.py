"""Reading, sharding and converting at scale: time and memory against the number of rows.

A synthetic dataset shaped like UltraChat-200k (the SPIN paper's data: `prompt`, `prompt_id`,
`messages` of one to three user/assistant turns, answers of about 200 words, split over three
`train_sft-*.parquet` files) is made at each size; then, each stage in its own process so that
its peak memory is its own:

  read      read_examples over the split (the readers, prompt ids, repeat detection)
  generate  `selfplay generate --data_frac f --frac_len N/10` for f = 0..9, as the official
            scripts shard a split, with a stand-in engine that answers at once (echoing the
            prompt's words): what is measured is ours (reading, slicing, the prompt-length
            check, shard writing), not decoding
  convert   `selfplay convert --num_fracs 10`: the ten shards into SPIN pairs

Peak memory is the process's peak resident set during the stage (sampled every 5 ms) minus
its resident set before it, after a warm-up run of the same stage on 100 rows (imports, the
tokenizer). Linear growth means the ratios at 10x the rows stay near 10, not near 100.

    .venv/bin/python bench/bench_scale.py [--sizes 5000 50000] [--model default] [--json out.json]
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

STAGES = ("read", "generate", "convert")
FRACS = 10
WARM = 100          # rows of the warm-up copy


def ultrachat_rows(n: int, seed: int = 0) -> list[dict]:
    """n rows in UltraChat-200k's layout, words drawn from a fixed vocabulary."""
    import hashlib

    import numpy as np
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(5000)])

    def text(mean_words: float) -> str:
        return " ".join(rng.choice(vocab, size=max(3, int(rng.exponential(mean_words)))))

    rows = []
    for i in range(n):
        messages = []
        for _ in range(int(rng.integers(1, 4))):
            messages += [{"content": f"Question {i}: " + text(60), "role": "user"},
                         {"content": text(200), "role": "assistant"}]
        prompt = messages[0]["content"]
        rows.append({"prompt": prompt, "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(),
                     "messages": messages})
    return rows


def make_dataset(n: int, directory: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = ultrachat_rows(n)
    data = directory / "data"
    data.mkdir(parents=True, exist_ok=True)
    for k in range(3):
        part = rows[k * n // 3:(k + 1) * n // 3]
        pq.write_table(pa.Table.from_pylist(part), data / f"train_sft-{k:05d}-of-00003.parquet")
    return data


class EchoEngine:
    """Answers every prompt at once with the first words of its last turn."""
    name = "echo"

    def generate(self, prompts, settings, seeds=None, desc="generate"):
        from selfplay.engines.base import Generation
        out = []
        for p in prompts:
            words = p[-1]["content"].split()[:settings.max_new_tokens]
            out.append(Generation(" ".join(words), len(words), "length"))
        return out

    def close(self):
        pass


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_stage(stage: str, n: int, work: Path, model: str) -> None:
    from selfplay.cli import main
    from selfplay.data.formats import read_examples
    data, shards, pairs = work / "data", work / "shards", work / "pairs"
    if stage == "read":
        got = len(read_examples(str(data), "train_sft").examples)
        assert got == n, f"read {got} of {n} rows"
    elif stage == "generate":
        for f in range(FRACS):
            assert main(["generate", "--model", model, "--dataset", str(data), "--split",
                         "train_sft", "--data_frac", str(f), "--frac_len", str(n // FRACS),
                         "--max_new_tokens", "64", "--output_dir", str(shards)]) == 0
    else:
        assert main(["convert", "--input_dir", str(shards), "--num_fracs", str(FRACS),
                     "--output_dir", str(pairs)]) == 0


def child(stage: str, n: int, work: Path, model: str) -> dict:
    """One stage in this process: its seconds and peak memory above the start. The stage runs
    once first on the small warm-up copy, so that lazy imports and the tokenizer are loaded
    before the measured run and the baseline is what any size pays."""
    import threading

    import selfplay.stages.generate as generate_stage
    generate_stage.open_engine = lambda *a, **k: EchoEngine()
    run_stage(stage, WARM, work / "warm", model)
    before = peak = rss_bytes()
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.wait(0.005):
            peak = max(peak, rss_bytes())

    sampler = threading.Thread(target=sample)
    sampler.start()
    t = time.perf_counter()
    run_stage(stage, n, work, model)
    seconds = time.perf_counter() - t
    done.set()
    sampler.join()
    peak = max(peak, rss_bytes())
    return {"seconds": seconds, "peak_mib": (peak - before) / 2**20}


def measure(sizes: list[int], model: str, root: Path) -> dict[int, dict[str, dict]]:
    results = {}
    for n in sizes:
        work = root / f"n{n}"
        t = time.perf_counter()
        make_dataset(n, work)
        make_dataset(WARM, work / "warm")
        print(f"{n} rows made in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        results[n] = {}
        for stage in STAGES:
            out = subprocess.run([sys.executable, __file__, "--child", stage, str(n), str(work),
                                  "--model", model], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{stage} at {n} rows failed:\n{out.stderr[-3000:]}")
            results[n][stage] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def table(results: dict[int, dict[str, dict]]) -> str:
    small, large = min(results), max(results)
    lines = [f"| stage | {small:,} rows | {large:,} rows | time ratio | memory ratio |",
             "|---|---|---|---|---|"]
    for stage in STAGES:
        a, b = results[small][stage], results[large][stage]
        lines.append(f"| {stage} | {a['seconds']:.2f} s, {a['peak_mib']:.0f} MiB | "
                     f"{b['seconds']:.2f} s, {b['peak_mib']:.0f} MiB | "
                     f"{b['seconds'] / a['seconds']:.1f}x | "
                     f"{b['peak_mib'] / max(a['peak_mib'], 1):.1f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs=2, default=[5000, 50000])
    ap.add_argument("--model", default="default", help="whose tokenizer checks prompt lengths")
    ap.add_argument("--json", default="")
    ap.add_argument("--child", nargs=3, metavar=("STAGE", "N", "DIR"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], int(a.child[1]), Path(a.child[2]), a.model)))
        return
    with tempfile.TemporaryDirectory() as root:
        results = measure(a.sizes, a.model, Path(root))
    print(table(results))
    if a.json:
        Path(a.json).write_text(json.dumps({"sizes": a.sizes, "fracs": FRACS,
                                            "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
