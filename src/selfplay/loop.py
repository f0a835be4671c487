"""`selfplay run`: T self-play iterations, resumable, with a manifest and a report.

Iteration t (θ_t: the model given, for t = from_iteration; iteration t-1's model after):
  generate  θ_t answers the train prompts (SPPO: K samples each); SPIN also scores the
            references and answers with θ_t                                   iter{t}/generated
  rank      SPPO only: the judge's K×K preference matrix per prompt             iter{t}/ranked
  convert   shards → pairs: SPIN real/generated; SPPO chosen/rejected + win rates iter{t}/pairs
  train     θ_{t+1} from θ_t (or the SFT model), θ_t as reference              iter{t}/model
  evaluate  θ_{t+1} on the held-out split, win rate against θ_t                 iter{t}/eval.json
θ_{t+1} is then the opponent of iteration t+1. The starting model is evaluated once first
(base/eval.json).

The run directory's manifest.json holds the resolved recipe, library versions, seeds, and for
each stage its state and output checksums. A stage whose record says done and whose outputs
still match is skipped; anything else is (re)done by stage functions that are themselves
resumable (shards, training checkpoints). When a redone stage's outputs differ from what the
manifest recorded, every later stage is invalidated and redone: nothing stale survives.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata as md
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from selfplay.config import RESUMABLE_KEYS, Config
from selfplay.errors import SelfplayError
from selfplay.generation import write_json_atomic

MANIFEST = "manifest.json"


def _sha256(paths: list[Path]) -> dict[str, str]:
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
        out[str(p)] = h.hexdigest() if files or p.exists() else "missing"
    return out


def _fault(key: str) -> None:
    """Test hook: SELFPLAY_KILL_AFTER=<stage> kills the process after the stage's work and
    before the manifest records it, the worst moment for a crash."""
    if os.environ.get("SELFPLAY_KILL_AFTER") == key:
        os.kill(os.getpid(), signal.SIGKILL)


class Manifest:
    def __init__(self, run_dir: Path, cfg: Config):
        self.path = run_dir / MANIFEST
        recipe = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE_KEYS}
        if self.path.exists():
            self.data = json.loads(self.path.read_text())
            old = self.data["recipe"]
            diff = sorted(k for k in set(old) | set(recipe) if old.get(k) != recipe.get(k))
            if diff and not cfg.force:
                raise SelfplayError(
                    f"{run_dir} was started with another recipe ({', '.join(diff)} differ: "
                    + "; ".join(f"{k} {old.get(k)!r} -> {recipe.get(k)!r}" for k in diff[:4])
                    + "); use the same recipe to resume, another --output_dir, or --force.")
            self.data["recipe"] = recipe
        else:
            self.data = {"recipe": recipe, "stages": {}, "created": time.time()}
        self.data["versions"] = {p: _version(p) for p in (
            "selfplay", "torch", "transformers", "accelerate", "peft", "datasets")}
        self.data["seeds"] = {"seed": cfg.seed, "tasks_seed": cfg.tasks_seed}
        self.save()

    def save(self) -> None:
        write_json_atomic(self.path, self.data)

    def stage(self, key: str, outputs: list[Path], work, *, order: list[str]) -> bool:
        """Run `work` unless the stage is done with intact outputs; True if it ran."""
        rec = self.data["stages"].get(key)
        if rec and rec["state"] == "done" and _sha256(outputs) == rec["checksums"]:
            print(f"[{key}] done; skipped", file=sys.stderr)
            return False
        print(f"[{key}] {'redo' if rec else 'start'}", file=sys.stderr)
        self.data["stages"][key] = {"state": "running", "started": time.time()}
        self.save()
        t = time.perf_counter()
        work()
        _fault(key)
        sums = _sha256(outputs)
        if rec and rec.get("checksums") and rec["checksums"] != sums:
            self.invalidate_after(key, order)
        self.data["stages"][key] = {"state": "done", "checksums": sums,
                                    "seconds": round(time.perf_counter() - t, 1)}
        self.save()
        return True

    def invalidate_after(self, key: str, order: list[str]) -> None:
        for later in order[order.index(key) + 1:]:
            rec = self.data["stages"].pop(later, None)
            for p in (rec or {}).get("checksums", {}):
                path = Path(p)
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                elif path.exists():
                    path.unlink()


def _version(pkg: str) -> str:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "not installed"


def stage_names(cfg: Config) -> tuple[str, ...]:
    if cfg.method == "sppo":
        return ("generate", "rank", "convert", "train", "evaluate")
    return ("generate", "convert", "train", "evaluate")


def stage_order(cfg: Config) -> list[str]:
    keys = ["base/evaluate"]
    for t in range(cfg.from_iteration, cfg.num_iterations):
        keys += [f"iter{t}/{s}" for s in stage_names(cfg)]
    return keys


def judge_win_rate(cfg: Config, judge, new_rows: list[dict], old_rows: list[dict]) -> float:
    """The judge's mean P(θ_{t+1}'s answer ≻ θ_t's) on the held-out prompts."""
    from selfplay.data.formats import BUILTIN_TASKS, read_for
    split = "test" if cfg.dataset == BUILTIN_TASKS and cfg.split == "train" else cfg.split
    examples = read_for(cfg, split).examples
    ps = [judge.matrix(e.prompt, [a["response"], b["response"]], e.extra)[0][1]
          for e, a, b in zip(examples, new_rows, old_rows)]
    return sum(ps) / len(ps)


def run(cfg: Config) -> Path:
    """All iterations of cfg; returns the run directory."""
    from selfplay.evaluation import evaluate_models
    from selfplay.generation import generate_split
    from selfplay.judges import make_judge, rank_shards
    from selfplay.report import write_report
    from selfplay.training import train

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(out, cfg)
    order = stage_order(cfg)
    sft = cfg.model_name_or_path

    # Every evaluation reads the whole held-out split: max_prompts sizes the train prompts.
    base_eval = out / "base" / "eval.json"
    manifest.stage("base/evaluate", [base_eval], lambda: write_json_atomic(
        base_eval, evaluate_models(dataclasses.replace(cfg, max_prompts=0), sft)), order=order)
    theta = sft
    prev_eval = base_eval
    judge = make_judge(cfg.judge, cfg.reward_model, cfg.pairrm_estimator) \
        if cfg.method == "sppo" else None
    for t in range(cfg.from_iteration, cfg.num_iterations):
        c = cfg.for_iteration(t)
        it = out / f"iter{t}"
        gen_dir, pairs_dir, model_dir, eval_path = (it / "generated", it / "pairs", it / "model",
                                                    it / "eval.json")
        # SPIN trains on every generated row, so θ_t scores them while it is loaded. SPPO
        # trains on 2 of K responses, and only for prompts whose samples do not all tie: the
        # trainer scores those few once with θ_t, its own starting model, before training.
        gen_cfg = dataclasses.replace(c, model_name_or_path=theta, output_dir=str(gen_dir),
                                      split="train", data_frac=0, frac_len=0,
                                      score=c.method != "sppo", overwrite=False)
        manifest.stage(f"iter{t}/generate", [gen_dir], lambda: generate_split(gen_cfg),
                       order=order)
        shards = gen_dir
        if c.method == "sppo":
            shards = it / "ranked"
            manifest.stage(f"iter{t}/rank", [shards],
                           lambda: rank_shards(gen_dir, shards, judge), order=order)
        manifest.stage(f"iter{t}/convert", [pairs_dir / "train_prefs-00000-of-00001.parquet"],
                       lambda: _convert_nonempty(shards, pairs_dir, t), order=order)
        data = str(pairs_dir)
        if c.data_policy == "previous_and_current" and t > cfg.from_iteration:
            data = f"{out / f'iter{t - 1}' / 'pairs'}:1.0,{pairs_dir}:1.0"
        train_cfg = dataclasses.replace(
            c, model_name_or_path=theta if c.start_from == "previous" else sft,
            reference_model=theta, dataset=data, split="train", max_prompts=0,
            output_dir=str(model_dir), resume=True, overwrite=False)
        weights = model_dir / ("model.safetensors" if not c.use_peft or c.merge_adapter
                               else "adapter_model.safetensors")
        manifest.stage(f"iter{t}/train", [weights, model_dir / "training_complete.json"],
                       lambda: train(train_cfg), order=order)
        prev_rows = json.loads(prev_eval.read_text())["rows"]
        eval_cfg = dataclasses.replace(c, max_prompts=0)

        def evaluate_iteration():
            result = evaluate_models(eval_cfg, str(model_dir), baseline_rows=prev_rows)
            if judge is not None:
                result["judge_win_rate"] = judge_win_rate(eval_cfg, judge, result["rows"],
                                                          prev_rows)
                result["judge"] = judge.name
            write_json_atomic(eval_path, result)

        manifest.stage(f"iter{t}/evaluate", [eval_path], evaluate_iteration, order=order)
        theta, prev_eval = str(model_dir), eval_path
    table = write_report(out)
    print(table)
    if cfg.push_to_hub:
        push(Path(theta), cfg.push_to_hub)
    return out


def _convert_nonempty(shards: Path, pairs_dir: Path, t: int) -> None:
    """convert, failing with the reason when the iteration has nothing to train on."""
    from selfplay.data.pairs import convert
    train = convert(shards, pairs_dir)["splits"].get("train", {})
    if not train.get("pairs"):
        raise SelfplayError(
            f"iteration {t} has no training pairs: the judge tied all K samples of all "
            f"{train.get('prompts', 0)} prompts; use more prompts (--max_prompts), samples "
            "(--num_samples) or new tokens (--max_new_tokens).")


def push(model_dir: Path, repo_id: str) -> None:
    """Upload the final model, only because the user asked (--push_to_hub NAME)."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo_id, exist_ok=True, private=True)
        api.upload_folder(folder_path=str(model_dir), repo_id=repo_id,
                          ignore_patterns=["checkpoints/*", "tensorboard/*", "*.tmp"])
    except Exception as e:  # noqa: BLE001 - network and auth errors come in many types
        raise SelfplayError(f"could not push {model_dir} to {repo_id!r}: {e}") from None
    print(f"pushed {model_dir} to {repo_id}", file=sys.stderr)
