"""`selfplay run`: T self-play iterations, resumable, with a manifest and a report.

Iteration t (θ_t: the model given, for t = from_iteration; iteration t-1's model after):
  generate  θ_t answers the train prompts (SPPO: K samples each); SPIN also scores the
            references and answers with θ_t                                   iter{t}/generated
  rank      SPPO, DPO: the judge's K×K preference matrix per prompt            iter{t}/ranked
  convert   shards → pairs: SPIN real/generated; SPPO, DPO chosen/rejected + win rates
                                                                                iter{t}/pairs
  train     θ_{t+1} from θ_t (or the SFT model), θ_t as reference              iter{t}/model
  evaluate  θ_{t+1} on the held-out split, win rate against θ_t                 iter{t}/eval.json
θ_{t+1} is then the opponent of iteration t+1. The starting model is evaluated once first
(base/eval.json). With sft_epochs, an SFT stage first makes θ_0 from it (sft/model,
sft/eval.json), as the paper starts from an SFT model. With --method sft (the control arm),
each iteration is one stage of continued SFT on the same prompts, with as many updates as
the SPIN iteration, then evaluate.

Every stage goes through the run's manifest (manifest.py): done stages are skipped, changed
ones redone, a changed recipe refused unless --force.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from huggingface_hub import HfApi

from selfplay.config import RANKED_METHODS, Config, ConvertSettings, DataSettings
from selfplay.data.evaluations import EvalRow, Evaluation
from selfplay.data.run_paths import IterationPaths, RunPaths
from selfplay.data.splits import has_split, held_out_split, read_for
from selfplay.engines import engine_name
from selfplay.errors import SelfplayError
from selfplay.judges import Judge, make_judge
from selfplay.launch import Processes
from selfplay.io import write_json_atomic
from selfplay.manifest import Manifest, remove
from selfplay.selection import Candidate, Selection, select
from selfplay.stages.convert import convert
from selfplay.stages.evaluate import evaluate_models
from selfplay.stages.generate import generate
from selfplay.stages.rank import rank
from selfplay.stages.report import load_models, write_report
from selfplay.stages.sft import sft as run_sft
from selfplay.stages.train import train
from selfplay.tracking import check_reporting, parse_report_to, report_run


def stage_names(method: str) -> tuple[str, ...]:
    if method in RANKED_METHODS:
        return ("generate", "rank", "convert", "train", "evaluate")
    if method == "sft":
        return ("sft", "evaluate")
    return ("generate", "convert", "train", "evaluate")


def has_sft_stage(cfg: Config) -> bool:
    return cfg.run.sft_epochs > 0 and cfg.run.from_iteration == 0


def stage_order(cfg: Config) -> list[str]:
    keys = ["base/evaluate"] + (["sft/train", "sft/evaluate"] if has_sft_stage(cfg) else [])
    for t in range(cfg.run.from_iteration, cfg.run.num_iterations):
        keys += [f"iter{t}/{s}" for s in stage_names(cfg.run.method)]
    # choosing reads every evaluation before it, and the test split: an evaluation's kind
    return keys + (["best/evaluate"] if cfg.run.select_on else [])


@dataclass
class Run:
    """A run directory being worked on: its paths, manifest and processes."""
    cfg: Config
    paths: RunPaths
    manifest: Manifest
    procs: Processes
    judge: Judge | None         # SPPO's and DPO's, on every process


@dataclass
class Model:
    """A model of the run and its evaluation (the next model's paired tests read it)."""
    path: str
    eval: Path


@dataclass
class Iteration:
    """What iteration t reads."""
    t: int
    c: Config                   # the run's config with iteration t's overrides
    paths: IterationPaths
    theta: Model                # θ_t: it generates, and it is the reference
    theta0: str                 # where --start_from sft starts
    prompts: DataSettings       # the train prompts it reads
    twice: bool                 # previous + current pairs: each prompt seen twice

    def key(self, stage: str) -> str:
        return f"iter{self.t}/{stage}"


def run(cfg: Config) -> Path:
    """All iterations of cfg; returns the run directory."""
    r = open_run(cfg)
    start = Model(cfg.model.model_name_or_path, r.paths.base_eval)
    evaluate_step(r, "base/evaluate", cfg, start, None)
    theta = make_theta0(r, start) if has_sft_stage(cfg) else start
    theta0 = theta.path                 # where --start_from sft starts every iteration
    models = [("SFT" if has_sft_stage(cfg) else "start", theta)]
    for t in range(cfg.run.from_iteration, cfg.run.num_iterations):
        it = iteration_inputs(r, t, theta, theta0)
        if it.c.run.method == "sft":
            continue_sft(r, it)
        else:
            generate_step(r, it)
            if it.c.run.method in RANKED_METHODS:
                rank_step(r, it)
            convert_step(r, it)
            train_step(r, it)
        theta = Model(str(it.paths.model.root), it.paths.eval)
        evaluate_step(r, it.key("evaluate"), it.c, theta, it.theta, r.judge)
        models.append((f"iteration {t}", theta))
        if cfg.run.select_on and choose(models, cfg.run.patience).stop:
            r.procs.say(f"iteration {t}: {cfg.run.patience} iteration(s) in a row without a "
                        "gain on validation; stopping (--patience).")
            break
    if cfg.run.select_on:
        theta = best_step(r, models)
    return finish(r, theta)      # pushes θ_T, or with --select_on the model chosen


def open_run(cfg: Config) -> Run:
    check_reporting(cfg.training.report_to)
    sel, source = cfg.run.select_on, Path(cfg.data.dataset).expanduser()
    if sel and (source.is_file() or source.is_dir() and not has_split(str(source), sel)):
        raise SelfplayError(f"--select_on {sel} evaluates every model on the {sel} split, and "
                            f"{cfg.data.dataset} has none (a file or files named after it).")
    paths = RunPaths(Path(cfg.job.output_dir))
    paths.root.mkdir(parents=True, exist_ok=True)
    procs = Processes(cfg.model)
    manifest = Manifest(paths, cfg, procs, stage_order(cfg),
                        engine_name(cfg.model.engine))      # fails fast when unusable
    if "wandb" in parse_report_to(cfg.training.report_to):
        # the run's trainings and its report side by side in W&B
        os.environ.setdefault("WANDB_RUN_GROUP", paths.root.resolve().name)
    # every process judges its share of the ranking, on its own device (one process: the
    # judge's own default, as `selfplay rank` has it)
    device = str(procs.state.device) if procs.state.num_processes > 1 else None
    judge = make_judge(cfg.rank, device) if cfg.run.method in RANKED_METHODS else None
    return Run(cfg, paths, manifest, procs, judge)


def make_theta0(r: Run, start: Model) -> Model:
    """θ_0 by supervised fine-tuning of the starting model, the paper's starting point."""
    cfg, s = r.cfg, r.paths.sft

    def work() -> None:
        run_sft(replace(cfg.model, model_name_or_path=start.path),
                replace(cfg.data, max_prompts=cfg.run.sft_max_prompts, skip_prompts=0),
                cfg.scoring, cfg.sft_training(cfg.run.sft_epochs), cfg.lora, s.model.root,
                seed=cfg.job.seed, overwrite=r.manifest.redoing("sft/train"))

    r.manifest.stage("sft/train", [_weights(cfg, s), s.model.complete], work, everyone=True)
    theta0 = Model(str(s.model.root), s.eval)
    evaluate_step(r, "sft/evaluate", cfg, theta0, start)
    return theta0


def iteration_inputs(r: Run, t: int, theta: Model, theta0: str) -> Iteration:
    c = r.cfg.for_iteration(t)
    prompts = c.data           # the recipe's split: UltraChat-200k's is train_sft
    if c.run.fresh_prompts:
        prompts = replace(prompts, skip_prompts=c.data.skip_prompts + t * c.data.max_prompts)
    # Iteration t of SPIN trains on previous + current pairs of the same prompts: twice as
    # many items as one pass, which the control arm matches by seeing each twice.
    twice = c.run.data_policy == "previous_and_current" and t > r.cfg.run.from_iteration
    return Iteration(t, c, r.paths.iteration(t), theta, theta0, prompts, twice)


def continue_sft(r: Run, it: Iteration) -> None:
    """The control arm's iteration: more SFT from θ_t, as many updates as SPIN's."""
    c = it.c
    training = c.sft_training(c.training.num_train_epochs)
    if c.training.max_steps:        # as many updates as the self-play arms it is compared to
        training = replace(training, max_steps=c.training.max_steps)
    if c.run.match_steps_of:
        training = replace(training, max_steps=spin_steps(Path(c.run.match_steps_of), it.t))

    def work() -> None:
        run_sft(replace(c.model, model_name_or_path=it.theta.path), it.prompts, c.scoring,
                training, c.lora, it.paths.model.root, seed=c.job.seed,
                repeat=2 if it.twice else 1, overwrite=r.manifest.redoing(it.key("sft")))

    r.manifest.stage(it.key("sft"), [_weights(c, it.paths), it.paths.model.complete], work,
                     everyone=True)


def generate_step(r: Run, it: Iteration) -> None:
    """θ_t answers the iteration's prompts. SPIN trains on every generated row, so θ_t scores
    them while it is loaded. SPPO and DPO train on 2 of K responses, and only for prompts
    whose samples do not all tie: the trainer scores those few once with θ_t, its own
    starting model, before training."""
    c = it.c
    gen = replace(c.generation, data_frac=0, frac_len=0,
                  score=c.run.method not in RANKED_METHODS)

    def work() -> None:
        generate(replace(c.model, model_name_or_path=it.theta.path), it.prompts, gen,
                 c.scoring, it.paths.generated, seed=c.job.seed)

    r.manifest.stage(it.key("generate"), [it.paths.generated], work, everyone=True)


def rank_step(r: Run, it: Iteration) -> None:
    """SPPO, DPO: the judge's K×K matrix for each prompt's samples, each process judging its
    share."""
    def work() -> None:
        rank(it.paths.generated, it.paths.ranked, r.judge)

    r.manifest.stage(it.key("rank"), [it.paths.ranked], work, everyone=True)


def convert_step(r: Run, it: Iteration) -> None:
    """The shards become pairs, or the iteration fails with the reason it has none."""
    shards = it.paths.ranked if it.c.run.method in RANKED_METHODS else it.paths.generated

    h = it.c.run.opponent_history
    earlier = [d for k in range(max(0, it.t - h + 1), it.t)
               if (d := r.paths.iteration(k).generated).is_dir()]

    def work() -> None:
        convert_nonempty(shards, it.paths.pairs, it.t, it.c.convert.drop_identical, earlier,
                         f"{it.c.job.seed}|iter{it.t}")

    r.manifest.stage(it.key("convert"), [it.paths.train_pairs], work)


def train_step(r: Run, it: Iteration) -> None:
    """θ_{t+1} from θ_t (or the SFT model) on the pairs, θ_t as the reference."""
    c = it.c
    sources = [(str(it.paths.pairs), 1.0)]
    if it.twice:
        sources.insert(0, (str(r.paths.iteration(it.t - 1).pairs), 1.0))
    start = it.theta.path if c.run.start_from == "previous" else it.theta0

    def work() -> None:
        train(replace(c.model, model_name_or_path=start),
              replace(it.prompts, split="train", max_prompts=0, skip_prompts=0),  # train_prefs
              sources, c.scoring, replace(c.training, reference_model=it.theta.path,
                                          base_model=it.theta0, resume=True),
              c.lora, it.paths.model.root, seed=c.job.seed,
              overwrite=r.manifest.redoing(it.key("train")))

    r.manifest.stage(it.key("train"), [_weights(c, it.paths), it.paths.model.complete], work,
                     everyone=True)


def evaluate_step(r: Run, key: str, c: Config, model: Model, previous: Model | None,
                  judge: Judge | None = None) -> None:
    """A model on the whole held-out split (max_prompts sizes the train prompts; with
    --select_on, the validation split), paired with the previous model's answers; with a
    judge (SPPO's, DPO's), also its win rate against them."""
    held_out = replace(c.data, max_prompts=0, skip_prompts=0,
                       eval_split=c.run.select_on or c.data.eval_split)

    def work() -> None:
        evaluate_into(r, c, model.path, held_out, model.eval,
                      Evaluation.read(previous.eval).rows if previous else None, judge)

    r.manifest.stage(key, [model.eval], work, everyone=True)


def evaluate_into(r: Run, c: Config, model: str, data: DataSettings, dest: Path,
                  prev_rows: list[EvalRow] | None, judge: Judge | None = None) -> Evaluation:
    """Every process answers its share of the prompts; the main one judges and writes."""
    result = evaluate_models(replace(c.model, model_name_or_path=model), data,
                             c.generation.max_new_tokens, c.scoring,
                             replace(c.evaluation, baseline=""), baseline_rows=prev_rows)

    def judge_and_write() -> None:      # the main process's; its failure reaches all
        if judge is not None:
            result.judge_win_rate = judge_win_rate(data, judge, result.rows, prev_rows)
            result.judge = judge.name
        result.write(dest)

    r.procs.on_main(judge_and_write)
    return result


def choose(models: list[tuple[str, Model]], patience: int) -> Selection:
    """The best of the run's models so far on validation (selection.py)."""
    return select([Candidate(name, m.path, Evaluation.read(m.eval)) for name, m in models],
                  patience)


def best_step(r: Run, models: list[tuple[str, Model]]) -> Model:
    """--select_on: the best model on validation, linked into best/, and the test split read
    once, by θ_0 and by it (paired on the same prompts); returns the model chosen."""
    c, p = r.cfg, r.paths
    test = replace(c.data, max_prompts=0, skip_prompts=0)      # the split the run would read
    sel = choose(models, c.run.patience)

    def work() -> None:
        r.procs.on_main(lambda: link_model(Path(sel.chosen.path), p.best))
        theta0 = evaluate_into(r, c, models[0][1].path, test, p.theta0_test_eval, None)
        best = theta0 if sel.best == 0 else evaluate_into(
            r, c, sel.chosen.path, test, p.best_test_eval, theta0.rows)
        sel.test = {"split": theta0.split, "theta0": theta0.accuracy,
                    "theta0_ci95": theta0.accuracy_ci95, "best": best.accuracy,
                    "best_ci95": best.accuracy_ci95,
                    "change": asdict(best.paired) if best.paired else None}
        r.procs.on_main(lambda: write_json_atomic(p.selection, sel.to_json()))
        r.procs.say(f"best on validation: {sel.reason()}")

    # a run extended (or cut) to other iterations chooses again, among the models it now has
    r.manifest.stage("best/evaluate", [p.best, p.test], work, everyone=True,
                     reads=[name for name, _ in models])
    return Model(sel.chosen.path, p.best_test_eval)


def link_model(src: Path, dest: Path) -> None:
    """dest/ as a copy of the model directory src/ that costs no space: its files hard-linked
    (copied where the file system cannot link). θ_0 given as a hub id has no directory: then
    dest/ holds only the selection, which names it."""
    remove([dest])
    dest.mkdir(parents=True)
    if not src.is_dir():
        return
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".tmp":
            try:
                os.link(f, dest / f.name)
            except OSError:
                shutil.copy2(f, dest / f.name)


def finish(r: Run, last: Model) -> Path:
    """The report (and W&B's copy of it), and the final model pushed if asked."""
    if not r.procs.main:
        return r.paths.root
    table = write_report(r.paths.root)
    print(table)
    if "wandb" in parse_report_to(r.cfg.training.report_to):
        report_run(r.paths.root, r.cfg.training.wandb_project, [
            (m.name, {"accuracy": m.eval.accuracy,
                      "accuracy_low": (m.eval.accuracy_ci95 or [None])[0],
                      "accuracy_high": (m.eval.accuracy_ci95 or [None, None])[1],
                      "win_rate": m.eval.win_rate}) for m in load_models(r.paths)],
            json.loads(r.paths.manifest.read_text())["recipe"])
    if r.cfg.run.push_to_hub:
        push(Path(last.path), r.cfg.run.push_to_hub)
    return r.paths.root


def judge_win_rate(data: DataSettings, judge: Judge, new_rows: list[EvalRow],
                   old_rows: list[EvalRow]) -> float:
    """The judge's mean P(θ_{t+1}'s answer ≻ θ_t's) on the held-out prompts."""
    examples = read_for(data, held_out_split(data), held_out=True).examples
    ps = [judge.matrix(e.prompt, [a.response, b.response], e.extra)[0][1]
          for e, a, b in zip(examples, new_rows, old_rows)]
    return sum(ps) / len(ps)


def spin_steps(spin_run: Path, t: int) -> int:
    """The optimizer updates iteration t of a finished SPIN run took."""
    done = RunPaths(spin_run).iteration(t).model.complete
    try:
        return int(json.loads(done.read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        raise SelfplayError(f"--match_steps_of {spin_run}: iteration {t} has not finished "
                            f"training ({done} is missing or unreadable).") from None


def _weights(c: Config, it: IterationPaths) -> Path:
    return it.model.weights(adapter_only=c.lora.use_peft and not c.lora.merge_adapter)


def convert_nonempty(shards: Path, pairs_dir: Path, t: int, drop_identical: bool,
                     opponents: list[Path] = (), draw_key: str = "") -> None:
    """convert, failing with the reason when the iteration has nothing to train on."""
    report = convert(ConvertSettings(shards_dir=str(shards), drop_identical=drop_identical),
                     pairs_dir, opponents, draw_key)
    train = report.splits.get("train")
    if train and train.all_tie_prompts_left_out:
        print(f"iteration {t}: {train.all_tie_prompts_left_out} of {train.prompts} prompts give "
              "no pair: the judge tied all their samples (with the rule judge: all right or all "
              "wrong).", file=sys.stderr)
    if train and train.empty_responses:
        print(f"iteration {t}: {train.empty_responses} of {train.pairs} pairs have an empty "
              "generated answer (kept: it is what θ_t answered).", file=sys.stderr)
    if train is None or not train.pairs:
        why = (f"all {train.identical_pairs_dropped} generated answers equal their references"
               if train and train.identical_pairs_dropped else
               f"the judge tied all K samples of all {train.prompts if train else 0} prompts")
        raise SelfplayError(
            f"iteration {t} has no training pairs: {why}; use more prompts (--max_prompts), "
            "samples (--num_samples) or new tokens (--max_new_tokens).")


def push(model_dir: Path, repo_id: str) -> None:
    """Upload the final model, only because the user asked (--push_to_hub NAME)."""
    try:
        api = HfApi()
        api.create_repo(repo_id, exist_ok=True, private=True)
        api.upload_folder(folder_path=str(model_dir), repo_id=repo_id,
                          ignore_patterns=["checkpoints/*", "tensorboard/*", "*.tmp"])
    except Exception as e:  # noqa: BLE001 - network and auth errors come in many types
        raise SelfplayError(f"could not push {model_dir} to {repo_id!r}: {e}") from None
    print(f"pushed {model_dir} to {repo_id}", file=sys.stderr)
