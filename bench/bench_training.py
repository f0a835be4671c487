"""Training throughput and peak memory: selfplay's trainer against TRL's DPOTrainer, side by side.

Same model (the embedded default unless --model), same pairs, batch, lengths, optimizer
(RMSprop), schedule and β; one epoch each, every configuration in its own process so that its
peak memory is its own:

  selfplay              `selfplay train` with the reference log-probs stored with the pairs
                        (computed by θ_t when it generated them, as `selfplay run` does)
  selfplay+reference    the same, computing the reference log-probs once before training
  trl                   DPOTrainer as a user runs it: the reference model live, every step
  trl+precompute        DPOTrainer with precompute_ref_log_probs=True

tokens/s = prompt + response tokens of both sequences of every pair, over the epoch's wall
time (the training loop only; model loading excluded). Peak memory: on GPU the peak of
torch.cuda.max_memory_allocated; on CPU the process's peak resident set minus its resident set
after imports (the Python/torch baseline is the same for all).

With --gradient_checkpointing both trainers recompute activations in backward (the official
SPIN and SPPO recipes train this way), so that what remains is what each keeps resident:
weights, gradients, optimizer state and, for TRL, its live reference model.

    python bench/bench_training.py [--pairs 64] [--batch 8] [--gradient_checkpointing] [--json out.json]
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

CONFIGS = ("selfplay", "selfplay+reference", "trl", "trl+precompute")


def make_pairs(n: int, path: Path) -> None:
    """Task-suite prompts; real = the worked reference, generated = another task's answer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from selfplay.data.tasks import generate
    tasks = generate("train", n + 1, seed=0)
    rows = []
    for i, t in enumerate(tasks[:n]):
        u = {"role": "user", "content": t.prompt}
        wrong = tasks[i + 1].reference
        rows.append({"prompt_id": f"b{i}", "real": [u, {"role": "assistant", "content": t.reference}],
                     "generated": [u, {"role": "assistant", "content": wrong}]})
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path / "train_prefs-00000-of-00001.parquet")


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def prepare_scored(args) -> None:
    """θ's reference log-probs stored with the pairs, as `selfplay generate --score` stores
    them; done in its own process so that no configuration's memory includes it."""
    from selfplay.config import load_config
    from selfplay.stages.score import score

    out = Path(args.work) / "scored"
    cfg = load_config("score", None, ["--model", args.model, "--dataset", args.data,
                                      "--output_dir", str(out), "--max_length", "1024",
                                      "--max_prompt_length", "512", "--overwrite"])
    score(cfg.model, cfg.data, cfg.scoring, out, overwrite=True)


def run_one(name: str, args) -> dict:
    import accelerate  # noqa: F401 - every library imported before the baseline is taken
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401
    import trl  # noqa: F401

    from selfplay.config import load_config, parse_mixture
    from selfplay.models import load_tokenizer, resolve
    from selfplay.stages.train import load_pairs, train

    base_rss = rss_mb()
    on_gpu = torch.cuda.is_available()
    data, work = Path(args.data), Path(args.work) / name.replace("+", "_")
    if name == "selfplay":          # the pairs with their stored reference log-probs
        data = Path(args.work) / "scored"
    common = {"per_device_train_batch_size": args.batch, "learning_rate": 5e-6,
              "num_train_epochs": 1, "max_length": 1024, "max_prompt_length": 512}
    cfg_over = ["--model", args.model, "--dataset", str(data), "--output_dir", str(work),
                "--logging_steps", "1", "--overwrite", "--bf16", str(on_gpu).lower(),
                "--gradient_checkpointing", str(args.gradient_checkpointing).lower(),
                *[f"--{k}={v}" for k, v in common.items()]]
    cfg = load_config("train", None, cfg_over)
    tok = load_tokenizer(resolve(args.model))
    sources = parse_mixture(cfg.data.dataset)
    pairs, _ = load_pairs(sources, cfg.data, cfg.scoring, cfg.training.loss_type, None, tok)
    n_tokens = sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()

    if name.startswith("selfplay"):
        t = time.perf_counter()
        train(cfg.model, cfg.data, sources, cfg.scoring, cfg.training, cfg.lora, work,
              seed=cfg.job.seed, overwrite=True)
        total = time.perf_counter() - t
        log = [json.loads(x) for x in (work / "train_log.jsonl").read_text().splitlines()]
        loop = log[-1]["elapsed_s"]
    else:
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import DPOConfig, DPOTrainer

        from selfplay.data.formats import read_examples
        exs = read_examples(str(data)).examples
        ds = Dataset.from_list([{"prompt": e.prompt,
                                 "chosen": [{"role": "assistant", "content": e.reference}],
                                 "rejected": [e.extra["generated"][-1]]} for e in exs])
        times = {}

        class Clock(TrainerCallback):
            def on_train_begin(self, *a, **k):
                times["begin"] = time.perf_counter()

            def on_train_end(self, *a, **k):
                if on_gpu:
                    torch.cuda.synchronize()
                times["end"] = time.perf_counter()

        dargs = DPOConfig(output_dir=str(work), beta=0.1, loss_type=["sigmoid"],
                          optim="rmsprop", lr_scheduler_type="linear", warmup_steps=0.1,
                          max_length=1024, report_to=[], save_strategy="no", logging_steps=1,
                          use_cpu=not on_gpu, bf16=on_gpu, seed=42,
                          gradient_checkpointing=args.gradient_checkpointing,
                          gradient_checkpointing_kwargs={"use_reentrant": False},
                          precompute_ref_log_probs=name == "trl+precompute",
                          **{k: v for k, v in common.items() if k not in ("max_length",
                                                                            "max_prompt_length")})
        t = time.perf_counter()
        trainer = DPOTrainer(model=str(resolve(args.model).location), args=dargs,
                             train_dataset=ds, processing_class=tok, callbacks=[Clock()])
        trainer.train()
        total = time.perf_counter() - t
        loop = times["end"] - times["begin"]
    peak = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss
    return {"name": name, "tokens": n_tokens, "loop_s": loop, "total_s": total,
            "tokens_per_s": n_tokens / loop, "peak_mb": peak,
            "memory": "cuda max allocated" if on_gpu else "peak RSS above baseline"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--gradient_checkpointing", action="store_true",
                    help="both trainers recompute activations in backward")
    ap.add_argument("--only", choices=CONFIGS + ("prepare",), help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if args.only == "prepare":
        prepare_scored(args)
        return
    if args.only:                                   # a child: one configuration
        print("RESULT " + json.dumps(run_one(args.only, args)), flush=True)
        return
    work = Path(tempfile.mkdtemp(prefix="selfplay-bench-"))
    make_pairs(args.pairs, work / "pairs")
    results = []
    for name in ("prepare",) + CONFIGS:
        cmd = [sys.executable, __file__, "--only", name, "--model", args.model, "--pairs",
               str(args.pairs), "--batch", str(args.batch), "--data", str(work / "pairs"),
               "--work", str(work)] + (["--gradient_checkpointing"] if args.gradient_checkpointing
                                       else [])
        res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        if name == "prepare":
            if res.returncode:
                sys.exit(f"preparing the scored pairs failed:\n{res.stderr[-3000:]}")
            continue
        line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{name} failed:\n{res.stderr[-3000:]}")
        r = json.loads(line[7:])
        results.append(r)
        print(f"{name:<20} {r['loop_s']:7.1f} s loop {r['tokens_per_s']:8.1f} tok/s "
              f"{r['peak_mb']:8.0f} MB peak ({r['memory']})", flush=True)
    print(f"\n{args.pairs} pairs, batch {args.batch}, 1 epoch, RMSprop, beta 0.1"
          + (", gradient checkpointing" if args.gradient_checkpointing else ""))
    print(f"{'':<20} {'tok/s':>8} {'vs trl':>8} {'vs trl+pre':>11} {'peak MB':>8} "
          f"{'vs trl':>7} {'vs trl+pre':>11}")
    by = {r["name"]: r for r in results}
    for r in results:
        print(f"{r['name']:<20} {r['tokens_per_s']:8.1f} "
              f"{r['tokens_per_s'] / by['trl']['tokens_per_s']:7.2f}x "
              f"{r['tokens_per_s'] / by['trl+precompute']['tokens_per_s']:10.2f}x "
              f"{r['peak_mb']:8.0f} {r['peak_mb'] / by['trl']['peak_mb']:6.2f}x "
              f"{r['peak_mb'] / by['trl+precompute']['peak_mb']:10.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()
                                                         if k in ("model", "pairs", "batch",
                                                                  "gradient_checkpointing")},
                                               "results": results}, indent=2))


if __name__ == "__main__":
    main()
