"""`selfplay run`: T self-play iterations, resumable, with a manifest and a report.

Iteration t (θ_t: the model given, for t = from_iteration; iteration t-1's model after):
  generate  θ_t answers the train prompts (SPPO: K samples each); SPIN also scores the
            references and answers with θ_t                                   iter{t}/generated
  rank      SPPO only: the judge's K×K preference matrix per prompt             iter{t}/ranked
  convert   shards → pairs: SPIN real/generated; SPPO chosen/rejected + win rates iter{t}/pairs
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
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from huggingface_hub import HfApi

from selfplay.config import Config, ConvertSettings, DataSettings
from selfplay.data.evaluations import EvalRow, Evaluation
from selfplay.data.run_paths import IterationPaths, RunPaths
from selfplay.data.splits import held_out_split, read_for
from selfplay.engines import engine_name
from selfplay.errors import SelfplayError
from selfplay.judges import Judge, make_judge
from selfplay.launch import Processes
from selfplay.manifest import Manifest
from selfplay.stages.convert import convert
from selfplay.stages.evaluate import evaluate_models
from selfplay.stages.generate import generate
from selfplay.stages.rank import rank
from selfplay.stages.report import load_models, write_report
from selfplay.stages.sft import sft as run_sft
from selfplay.stages.train import train
from selfplay.tracking import check_reporting, parse_report_to, report_run


def stage_names(method: str) -> tuple[str, ...]:
    if method == "sppo":
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
    return keys


@dataclass
class Run:
    """A run directory being worked on: its paths, manifest and processes."""
    cfg: Config
    paths: RunPaths
    manifest: Manifest
    procs: Processes
    judge: Judge | None         # SPPO's, on every process


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
    for t in range(cfg.run.from_iteration, cfg.run.num_iterations):
        it = iteration_inputs(r, t, theta, theta0)
        if it.c.run.method == "sft":
            continue_sft(r, it)
        else:
            generate_step(r, it)
            if it.c.run.method == "sppo":
                rank_step(r, it)
            convert_step(r, it)
            train_step(r, it)
        theta = Model(str(it.paths.model.root), it.paths.eval)
        evaluate_step(r, it.key("evaluate"), it.c, theta, it.theta, r.judge)
    return finish(r, theta)


def open_run(cfg: Config) -> Run:
    check_reporting(cfg.training.report_to)
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
    judge = make_judge(cfg.rank, device) if cfg.run.method == "sppo" else None
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
    them while it is loaded. SPPO trains on 2 of K responses, and only for prompts whose
    samples do not all tie: the trainer scores those few once with θ_t, its own starting
    model, before training."""
    c = it.c
    gen = replace(c.generation, data_frac=0, frac_len=0, score=c.run.method != "sppo")

    def work() -> None:
        generate(replace(c.model, model_name_or_path=it.theta.path), it.prompts, gen,
                 c.scoring, it.paths.generated, seed=c.job.seed)

    r.manifest.stage(it.key("generate"), [it.paths.generated], work, everyone=True)


def rank_step(r: Run, it: Iteration) -> None:
    """SPPO: the judge's K×K matrix for each prompt's samples, each process judging its
    share."""
    def work() -> None:
        rank(it.paths.generated, it.paths.ranked, r.judge)

    r.manifest.stage(it.key("rank"), [it.paths.ranked], work, everyone=True)


def convert_step(r: Run, it: Iteration) -> None:
    """The shards become pairs, or the iteration fails with the reason it has none."""
    shards = it.paths.ranked if it.c.run.method == "sppo" else it.paths.generated

    def work() -> None:
        convert_nonempty(shards, it.paths.pairs, it.t, it.c.convert.drop_identical)

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
              sources, c.scoring, replace(c.training, reference_model=it.theta.path, resume=True),
              c.lora, it.paths.model.root, seed=c.job.seed,
              overwrite=r.manifest.redoing(it.key("train")))

    r.manifest.stage(it.key("train"), [_weights(c, it.paths), it.paths.model.complete], work,
                     everyone=True)


def evaluate_step(r: Run, key: str, c: Config, model: Model, previous: Model | None,
                  judge: Judge | None = None) -> None:
    """A model on the whole held-out split (max_prompts sizes the train prompts), paired with
    the previous model's answers; with a judge (SPPO's), also its win rate against them."""
    held_out = replace(c.data, max_prompts=0, skip_prompts=0)

    def work() -> None:         # every process answers its share of the prompts
        prev_rows = Evaluation.read(previous.eval).rows if previous else None
        result = evaluate_models(replace(c.model, model_name_or_path=model.path), held_out,
                                 c.generation.max_new_tokens, c.scoring,
                                 replace(c.evaluation, baseline=""), baseline_rows=prev_rows)

        def judge_and_write() -> None:      # the main process's; its failure reaches all
            if judge is not None:
                result.judge_win_rate = judge_win_rate(held_out, judge, result.rows, prev_rows)
                result.judge = judge.name
            result.write(model.eval)

        r.procs.on_main(judge_and_write)

    r.manifest.stage(key, [model.eval], work, everyone=True)


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


def convert_nonempty(shards: Path, pairs_dir: Path, t: int, drop_identical: bool) -> None:
    """convert, failing with the reason when the iteration has nothing to train on."""
    report = convert(ConvertSettings(shards_dir=str(shards), drop_identical=drop_identical),
                     pairs_dir)
    train = report.splits.get("train")
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
