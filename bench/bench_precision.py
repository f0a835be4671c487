"""float32 against --bf16 (bfloat16 autocast, float32 weights) on this machine, side by side.

Two measures on the embedded default model (or --model), each precision in its own process,
the two precisions alternating so that both see the same machine:

  train      `selfplay train` on task-suite pairs (batch 8, one epoch): seconds of the loop
  decode     our decoder, greedy, on held-out prompts of the suite (the work of `selfplay
             evaluate` and of SPIN's generation): generated tokens/s

Also printed: how many greedy answers bfloat16 changes, the price of its speed. On a CPU,
bfloat16 pays only with bfloat16 instructions (avx512_bf16, AMX); elsewhere it is slower.

    python bench/bench_precision.py [--pairs 64] [--prompts 128] [--repeats 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_training import make_pairs  # noqa: E402

PRECISIONS = ("float32", "bf16")


def run_one(precision: str, args) -> dict:
    import torch

    from selfplay.config import load_config, parse_mixture
    from selfplay.data.tasks import generate as tasks
    from selfplay.engines.base import SamplingSettings
    from selfplay.engines.hf import HFEngine
    from selfplay.stages.train import train

    bf16 = precision == "bf16"
    work = Path(args.work) / precision
    cfg = load_config("train", None, [
        "--model", args.model, "--dataset", args.data, "--output_dir", str(work),
        "--per_device_train_batch_size", "8", "--num_train_epochs", "1", "--logging_steps", "1",
        "--overwrite", "--report_to", "none", "--bf16", str(bf16).lower()])
    train(cfg.model, cfg.data, parse_mixture(cfg.data.dataset), cfg.scoring, cfg.training,
          cfg.lora, work, seed=42, overwrite=True)
    log = [json.loads(x) for x in (work / "train_log.jsonl").read_text().splitlines()]

    engine = HFEngine(args.model, "cpu", "auto", bf16)
    prompts = [[{"role": "user", "content": t.prompt}]
               for t in tasks("test", args.prompts, seed=0)]
    s = SamplingSettings(max_new_tokens=64, temperature=0.0, batch_size=64)
    t = time.perf_counter()
    gens = engine.generate(prompts, s)
    decode_s = time.perf_counter() - t
    n_tok = sum(g.n_tokens for g in gens)
    return {"precision": precision, "threads": torch.get_num_threads(),
            "train_loop_s": log[-1]["elapsed_s"],
            "train_steps": log[-1]["step"], "decode_s": decode_s, "decode_tokens": n_tok,
            "answers": [g.text for g in gens]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default="")
    ap.add_argument("--only", choices=PRECISIONS, help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:
        Path(args.out).write_text(json.dumps(run_one(args.only, args)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs"
        make_pairs(args.pairs, data)
        runs: dict[str, list[dict]] = {p: [] for p in PRECISIONS}
        for r in range(args.repeats):
            for p in PRECISIONS:
                out = Path(tmp) / f"{p}-{r}.json"
                subprocess.run([sys.executable, __file__, "--only", p, "--model", args.model,
                                "--prompts", str(args.prompts), "--data", str(data),
                                "--work", tmp, "--out", str(out)], check=True)
                runs[p].append(json.loads(out.read_text()))
    best = {p: {"train_loop_s": min(x["train_loop_s"] for x in v),
                "decode_s": min(x["decode_s"] for x in v), **{k: v[0][k] for k in (
                    "threads", "train_steps", "decode_tokens", "answers")}}
            for p, v in runs.items()}
    f, b = best["float32"], best["bf16"]
    same = sum(x == y for x, y in zip(f["answers"], b["answers"]))
    print(f"\n{'':24}{'float32':>12}{'bf16':>12}{'speed-up':>10}")
    print(f"{'train loop s (' + str(f['train_steps']) + ' steps)':24}"
          f"{f['train_loop_s']:12.1f}{b['train_loop_s']:12.1f}"
          f"{f['train_loop_s'] / b['train_loop_s']:9.2f}x")
    print(f"{'decode tokens/s':24}{f['decode_tokens'] / f['decode_s']:12.1f}"
          f"{b['decode_tokens'] / b['decode_s']:12.1f}"
          f"{(b['decode_tokens'] / b['decode_s']) / (f['decode_tokens'] / f['decode_s']):9.2f}x")
    print(f"greedy answers unchanged by bf16: {same} of {len(f['answers'])}; "
          f"{f['threads']} threads; best of {args.repeats} runs each")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"bench": "precision", "model": args.model, "pairs": args.pairs,
             "prompts": args.prompts, "repeats": args.repeats, "same_answers": same,
             "runs": {p: [{k: x[k] for k in x if k != "answers"} for x in v]
                      for p, v in runs.items()}}, indent=1))


if __name__ == "__main__":
    main()
