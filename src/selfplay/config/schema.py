"""The one config schema: a settings object per group, flat keys unique across groups.

The keys stay flat (`--learning_rate`, `max_new_tokens: 64` in a recipe) and each belongs to
one group; `Config` holds one typed settings object per group, and each stage's entry point
takes the groups it reads. Every field carries its help text, the commands that read it, its
effects (options.py), accepted choices and the aliases the official SPIN scripts used
(`--model`, `--input_dir`).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from selfplay.config.options import need
from selfplay.config.settings import (ConvertSettings, DataSettings, EvaluationSettings,
                                      GenerationSettings, ModelSettings, RankSettings,
                                      ScoringSettings)
from selfplay.config.training import JobSettings, LoraSettings, RunSettings, TrainingSettings
from selfplay.errors import SelfplayError

# (attribute of Config, settings class, heading in `--help`), in the order help lists them.
GROUPS: tuple[tuple[str, type, str], ...] = (
    ("model", ModelSettings, "model"), ("data", DataSettings, "data"),
    ("generation", GenerationSettings, "generation"), ("scoring", ScoringSettings, "scoring"),
    ("rank", RankSettings, "ranking (SPPO)"), ("convert", ConvertSettings, "convert"),
    ("training", TrainingSettings, "training"), ("lora", LoraSettings, "LoRA / QLoRA"),
    ("evaluation", EvaluationSettings, "evaluation"), ("run", RunSettings, "the loop"),
    ("job", JobSettings, "output"))


@dataclass
class Config:
    """One settings object per group; keys are flat and unique across groups."""
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    scoring: ScoringSettings = field(default_factory=ScoringSettings)
    rank: RankSettings = field(default_factory=RankSettings)
    convert: ConvertSettings = field(default_factory=ConvertSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    run: RunSettings = field(default_factory=RunSettings)
    job: JobSettings = field(default_factory=JobSettings)

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> "Config":
        by_group: dict[str, dict[str, Any]] = {g: {} for g, _, _ in GROUPS}
        for k, v in values.items():
            by_group[GROUP_OF[k]][k] = v
        return cls(**{g: klass(**by_group[g]) for g, klass, _ in GROUPS})

    def flat(self) -> dict[str, Any]:
        """Every key and its value, as a recipe writes them."""
        return {k: v for g, _, _ in GROUPS for k, v in dataclasses.asdict(getattr(self, g)).items()}

    def replace(self, **flat: Any) -> "Config":
        """A copy with some flat keys changed."""
        return Config.from_flat({**self.flat(), **flat})

    def sft_training(self, epochs: float) -> TrainingSettings:
        """The training settings of an SFT stage inside `selfplay run`: AdamW at
        sft_learning_rate for `epochs`, the rest (batch, schedule, precision) as the run's."""
        return dataclasses.replace(self.training, learning_rate=self.run.sft_learning_rate,
                                   optim="adamw", num_train_epochs=epochs, max_steps=0,
                                   resume=True)

    def for_iteration(self, t: int) -> "Config":
        """This config with iteration t's overrides applied."""
        over = self.run.iterations[t] if t < len(self.run.iterations) else {}
        return self.replace(**over)

    def validate(self) -> None:
        """Every group's own checks, the checks across groups, and each iteration's."""
        r = self.run
        self.validate_one()
        need(r.num_iterations > 0, "--num_iterations must be positive.")
        need(not r.fresh_prompts or self.data.max_prompts > 0,
             "--fresh_prompts needs --max_prompts (the prompts each iteration reads).")
        need(0 <= r.from_iteration < r.num_iterations,
             f"--from_iteration {r.from_iteration} must lie in [0, --num_iterations "
             f"{r.num_iterations}).")
        need(len(r.iterations) <= r.num_iterations,
             f"`iterations` has {len(r.iterations)} entries but --num_iterations is "
             f"{r.num_iterations}.")
        for t in range(len(r.iterations)):
            try:
                self.for_iteration(t).validate_one()
            except SelfplayError as e:
                raise SelfplayError(f"iteration {t} of `iterations`: {e}") from None

    def validate_one(self) -> None:
        """The checks of one set of values (the run's, or one iteration's)."""
        for g, _, _ in GROUPS:
            check = getattr(getattr(self, g), "check", None)
            if check is not None:
                check()
        self._check_learning_rates()
        need(not (self.training.resume and self.job.overwrite),
             "--resume and --overwrite contradict each other.")
        need(self.run.method != "sppo" or (self.generation.num_samples >= 2
                                           and self.training.loss_type.startswith("sppo")),
             "--method sppo needs --num_samples of at least 2 (the paper: 5) and an SPPO "
             "--loss_type (sppo, sppo_single or sppo_hard).")
        need(not self.run.select_on or self.data.eval_split != self.run.select_on,
             f"--select_on {self.run.select_on} chooses on that split and reads the test split "
             f"once at the end; --eval_split {self.data.eval_split} would make them one split.")
        need(self.run.method != "dpo" or (self.generation.num_samples >= 2 and
                                          self.training.loss_type in ("sigmoid", "hinge")),
             "--method dpo (iterative DPO) needs --num_samples of at least 2 (best against "
             "worst of K) and a pair loss (--loss_type sigmoid, DPO's, or hinge).")


    def _check_learning_rates(self) -> None:
        """A learning rate far above any recipe's is almost surely a typo (1e5 for 1e-5):
        refused before it ruins a model, unless --allow_large_lr."""
        if self.training.allow_large_lr:
            return
        top = 1e-1 if self.lora.use_peft else 1e-2
        for name, lr in (("learning_rate", self.training.learning_rate),
                         ("sft_learning_rate", self.run.sft_learning_rate)):
            guess = f" (did you mean {1 / lr:g}?)" if lr > 1 else ""
            need(lr <= top, f"--{name} {lr:g} is above {top:g}, the most any "
                 f"{'LoRA' if self.lora.use_peft else 'full'} fine-tuning recipe uses{guess}; "
                 "pass --allow_large_lr to train at it anyway.")


# ---------------------------------------------------------------------------------------
# Introspection: every field by its flat name
# ---------------------------------------------------------------------------------------

FIELDS: dict[str, dataclasses.Field] = {}
GROUP_OF: dict[str, str] = {}
HINTS: dict[str, Any] = {}
for _g, _cls, _ in GROUPS:
    _hints = typing.get_type_hints(_cls)
    for _f in dataclasses.fields(_cls):
        FIELDS[_f.name], GROUP_OF[_f.name], HINTS[_f.name] = _f, _g, _hints[_f.name]
ALIASES: dict[str, list[str]] = {}
for _f in FIELDS.values():
    for _a in _f.metadata["aliases"]:
        ALIASES.setdefault(_a, []).append(_f.name)


def fields_for(command: str) -> list[dataclasses.Field]:
    return [f for f in FIELDS.values() if command in f.metadata["commands"]]
