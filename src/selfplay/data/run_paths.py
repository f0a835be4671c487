"""Every path of a run directory and of a trained model directory, named once.

    RUN_DIR/
      manifest.json  report.md  plots/
      base/eval.json                       the starting model, evaluated once
      sft/model/  sft/eval.json            with sft_epochs: θ_0, fine-tuned from it
      iter{t}/generated/                   θ_t's shards (SPIN: scored)
      iter{t}/ranked/                      SPPO: the same shards with the judge's matrices
      iter{t}/pairs/train_prefs-….parquet  convert's pairs, and convert_report.json
      iter{t}/model/                       θ_{t+1}: a checkpoint (see ModelPaths)
      iter{t}/eval.json                    θ_{t+1} on the held-out prompts
      best/  best/selection.json           --select_on: the model chosen on validation (its
                                           files linked), and why it was chosen
      test/theta0_eval.json  test/best_eval.json   θ_0 and it, on the test split, read once

    MODEL_DIR/ (what `selfplay sft` and `selfplay train` write)
      .selfplay-output        the marker: this directory is ours (--overwrite may clear it)
      model.safetensors | adapter_model.safetensors, config and tokenizer files
      training_complete.json  train_log.jsonl  tensorboard/
      reference_logps.json    θ_t's log-probs, computed once, with their fingerprint
      base_logps.json         θ_0's, likewise, for the regularized losses
      checkpoints/step-NNNNNN/ resumable states, removed when training completes
      adapter/                 QLoRA: the adapter that was merged into the saved weights
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from selfplay.data.shards import CONVERT_REPORT, pairs_file


def _under(*parts: str, doc: str = "") -> property:
    """A path below the directory's root, named once here (the tree above draws them)."""
    return property(lambda self: self.root.joinpath(*parts), doc=doc)


@dataclass(frozen=True)
class Directory:
    """A directory whose paths are named once, as class attributes (`_under`)."""
    root: Path


class ModelPaths(Directory):
    marker = _under(".selfplay-output",
                    doc="Written first into a directory we train into: proof that it is ours "
                        "to clear.")
    complete = _under("training_complete.json")
    log = _under("train_log.jsonl")
    tensorboard = _under("tensorboard")
    reference_cache = _under("reference_logps.json")
    base_cache = _under("base_logps.json")
    checkpoints = _under("checkpoints")
    adapter = _under("adapter")

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:06d}"

    def saved_checkpoints(self) -> list[Path]:
        """The whole resumable checkpoints, oldest first (one being written has no state)."""
        d = self.checkpoints
        return sorted(p for p in d.glob("step-*") if (p / "trainer_state.json").exists()) \
            if d.exists() else []

    def weights(self, adapter_only: bool) -> Path:
        """The weights file a finished training wrote: full (or merged) weights, or the
        adapter alone."""
        return self.root / ("adapter_model.safetensors" if adapter_only else "model.safetensors")


class IterationPaths(Directory):
    generated = _under("generated")
    ranked = _under("ranked")
    pairs = _under("pairs")
    convert_report = _under("pairs", CONVERT_REPORT)
    eval = _under("eval.json")

    @property
    def train_pairs(self) -> Path:
        return pairs_file(self.pairs, "train")

    @property
    def model(self) -> ModelPaths:
        return ModelPaths(self.root / "model")


class RunPaths(Directory):
    manifest = _under("manifest.json")
    report = _under("report.md")
    plots = _under("plots")
    base_eval = _under("base", "eval.json")
    best = _under("best")
    selection = _under("best", "selection.json")
    test = _under("test")
    theta0_test_eval = _under("test", "theta0_eval.json")
    best_test_eval = _under("test", "best_eval.json")

    @property
    def sft(self) -> IterationPaths:
        """The SFT stage before iteration 0: its model and evaluation."""
        return IterationPaths(self.root / "sft")

    def iteration(self, t: int) -> IterationPaths:
        return IterationPaths(self.root / f"iter{t}")

    def iterations(self) -> list[int]:
        """The iterations that have a directory, in order."""
        return sorted(int(p.name[4:]) for p in self.root.glob("iter*") if p.name[4:].isdigit())
