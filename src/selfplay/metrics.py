"""A training's metrics and the check that it is not diverging (trainer.loop keeps one
MetricsLog): each update's metrics averaged over micro-batches and processes, their mean over
every logging_steps updates to train_log.jsonl and the trackers."""

from __future__ import annotations

import json
import time

import torch

from selfplay.config import TrainingSettings
from selfplay.data.run_paths import ModelPaths
from selfplay.errors import SelfplayError
from selfplay.tracking import Trackers

DIVERGENCE_WINDOW = 10       # updates, at the least, whose mean loss the check compares


class MetricsLog:
    """A training's metrics: each update's, averaged over its micro-batches and processes;
    their mean over every logging_steps updates to train_log.jsonl (main process) and the
    trackers (TensorBoard, W&B)."""

    def __init__(self, r, training: TrainingSettings, out: ModelPaths):
        self.r, self.training, self.out = r, training, out
        self.main = r.accelerator.is_main_process
        self.window: dict[str, list[float]] = {}
        self.losses: list[float] = []           # every update's, for the divergence check
        self.t0, self.tokens = time.perf_counter(), 0
        lines = out.log.read_text().splitlines() if out.log.exists() else []
        kept = [ln for ln in lines if json.loads(ln)["step"] <= r.step]
        done = 0             # a resumed training's earlier losses, each window's mean per update
        for rec in map(json.loads, kept):
            self.losses += [rec["loss"]] * (rec["step"] - done)
            done = rec["step"]
        r.accelerator.wait_for_everyone()       # all have read it before the main one cuts it
        if self.main:   # a resumed run rewrites what came after its checkpoint, never twice
            out.log.write_text("".join(ln + "\n" for ln in kept))
            self.trackers = Trackers(training.report_to, out.tensorboard, str(out.root),
                                     r.recipe, training.wandb_project, r.step)

    def update(self, step: int, micro: dict[str, list[torch.Tensor]]) -> float:
        """Add update `step`'s metrics; write the window when it is due; return the loss."""
        acc_ = self.r.accelerator
        for k, vs in micro.items():    # mean over micro-batches, then over processes
            self.window.setdefault(k, []).append(
                acc_.reduce(torch.stack(vs).mean(), reduction="mean").item())
        loss = self.window["loss"][-1]
        self.losses.append(loss)
        self._stop_if_diverging(step)
        if step % self.training.logging_steps == 0 or step == self.r.total:
            elapsed = time.perf_counter() - self.t0
            rec = {"step": step, "epoch": round(step / self.r.per_epoch, 4),
                   "learning_rate": self.r.scheduler.get_last_lr()[0],
                   **{k: sum(v) / len(v) for k, v in self.window.items()},
                   "tokens_per_s": self.tokens * acc_.num_processes / elapsed,
                   "elapsed_s": elapsed}
            self.window = {}
            if self.main:
                with self.out.log.open("a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                self.trackers.log({k: v for k, v in rec.items() if k != "step"}, step)
        return loss

    def _stop_if_diverging(self, step: int) -> None:
        """Stop when a window of updates averages more than 3 times the loss of the first
        (a window: logging_steps updates, at least 10), as the non-finite check stops: a
        learning rate or β far too large takes a model apart this way without any
        non-finite number, and a run that then saves it as complete ruins the next
        iteration. Every process sees the same averaged losses, so all stop together."""
        w = max(self.training.logging_steps, DIVERGENCE_WINDOW)
        n = len(self.losses)
        if n < 2 * w or n % w:
            return
        first, last = sum(self.losses[:w]) / w, sum(self.losses[-w:]) / w
        if first > 0 and last > 3 * first:
            done = self.out.saved_checkpoints()
            raise SelfplayError(
                f"update {step}: the loss of the last {w} updates ({last:.4g}) is more than 3 "
                f"times that of the first {w} ({first:.4g}): training diverges and was stopped; "
                "nothing was saved as complete; the latest checkpoint is "
                f"{done[-1] if done else 'none (see --save_steps)'} (its loss is in "
                "train_log.jsonl); lower --learning_rate or --beta.")

    def close(self) -> None:
        if self.main:
            self.trackers.close()
