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

    MODEL_DIR/ (what `selfplay sft` and `selfplay train` write)
      .selfplay-output        the marker: this directory is ours (--overwrite may clear it)
      model.safetensors | adapter_model.safetensors, config and tokenizer files
      training_complete.json  train_log.jsonl  tensorboard/
      reference_logps.json    θ_t's log-probs, computed once, with their fingerprint
      checkpoints/step-NNNNNN/ resumable states, removed when training completes
      adapter/                 QLoRA: the adapter that was merged into the saved weights
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from selfplay.data.shards import CONVERT_REPORT, pairs_file


@dataclass(frozen=True)
class ModelPaths:
    root: Path

    @property
    def marker(self) -> Path:
        """Written first into a directory we train into: proof that it is ours to clear."""
        return self.root / ".selfplay-output"

    @property
    def complete(self) -> Path:
        return self.root / "training_complete.json"

    @property
    def log(self) -> Path:
        return self.root / "train_log.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def reference_cache(self) -> Path:
        return self.root / "reference_logps.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:06d}"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    def weights(self, adapter_only: bool) -> Path:
        """The weights file a finished training wrote: full (or merged) weights, or the
        adapter alone."""
        return self.root / ("adapter_model.safetensors" if adapter_only else "model.safetensors")


@dataclass(frozen=True)
class IterationPaths:
    root: Path

    @property
    def generated(self) -> Path:
        return self.root / "generated"

    @property
    def ranked(self) -> Path:
        return self.root / "ranked"

    @property
    def pairs(self) -> Path:
        return self.root / "pairs"

    @property
    def train_pairs(self) -> Path:
        return pairs_file(self.pairs, "train")

    @property
    def convert_report(self) -> Path:
        return self.pairs / CONVERT_REPORT

    @property
    def model(self) -> ModelPaths:
        return ModelPaths(self.root / "model")

    @property
    def eval(self) -> Path:
        return self.root / "eval.json"


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def base_eval(self) -> Path:
        return self.root / "base" / "eval.json"

    @property
    def sft(self) -> IterationPaths:
        """The SFT stage before iteration 0: its model and evaluation."""
        return IterationPaths(self.root / "sft")

    def iteration(self, t: int) -> IterationPaths:
        return IterationPaths(self.root / f"iter{t}")

    def iterations(self) -> list[int]:
        """The iterations that have a directory, in order."""
        return sorted(int(p.name[4:]) for p in self.root.glob("iter*") if p.name[4:].isdigit())
