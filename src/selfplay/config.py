"""One config schema for every command, grouped: a YAML recipe plus `--key value` overrides.

The keys stay flat (`--learning_rate`, `max_new_tokens: 64` in a recipe) and each belongs to
one group (model, data, generation, scoring, rank, convert, training, lora, evaluation, run,
job); `Config` holds one typed settings object per group, and each stage's entry point takes
the groups it reads. Every field carries its help text, the commands that read it, accepted
choices and the aliases the official SPIN scripts used (`--model`, `--input_dir`). Loading is
fail-fast: an unknown key names the nearest valid one, a bad value names the option and what
it accepts, and a key that does not apply to the command is refused before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from selfplay.errors import SelfplayError
from selfplay.tracking import parse_report_to

# Commands that read a field; `run` reads what its stages read.
INFER = frozenset({"generate", "score", "evaluate", "sft", "train", "run"})
DATA_CMDS = INFER
TRAIN_CMDS = frozenset({"sft", "train", "run"})      # the optimizer and schedule
PAIR_CMDS = frozenset({"train", "run"})               # the pair losses

# What --method sppo changes, for keys the recipe and command line leave unset: the paper's
# sampling (K = 5, temperature 0.7, top_p 0.9), loss, and data (each iteration its own);
# under `selfplay run`, also the sizing of the embedded default SPPO run: K samples cost K
# generations, so fewer prompts fit in its 30 minutes (docs/sppo-default-run.md).
METHOD_DEFAULTS = {"sppo": {"num_samples": 5, "temperature": 0.7, "top_p": 0.9,
                            "loss_type": "sppo", "data_policy": "current"}}
RUN_METHOD_DEFAULTS = {"sppo": {"output_dir": "runs/sppo", "max_prompts": 64,
                                "learning_rate": 5e-6}}
# Keys a resumed run may change without --force: they do not change what the run computes.
RESUMABLE_KEYS = {"force", "from_iteration", "resume", "overwrite", "device", "batch_size",
                  "output_dir",          # a run directory moved or copied resumes where it is
                  "logprob_chunk_size", "push_to_hub", "logging_steps", "save_steps",
                  "report_to", "wandb_project",
                  # Greedy answers are the same tokens in either engine (tested); each stage's
                  # output records which one ran.
                  "engine", "tensor_parallel_size", "vllm_kv_cache_gib", "vllm_compile"}


def opt(default: Any, help: str, commands, *, choices: tuple | None = None,
        aliases: tuple[str, ...] = (), default_factory=None,
        command_defaults: dict[str, Any] | None = None) -> Any:
    meta = {"help": help, "commands": frozenset(commands), "choices": choices,
            "aliases": aliases, "command_defaults": command_defaults or {}}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelSettings:
    """Which model, and how it runs for inference."""
    model_name_or_path: str = opt(
        "default", "Model to load: 'default' (the embedded SmolLM2-135M-Instruct), a hub id, "
        "a local checkpoint directory or a .gguf file.", INFER, aliases=("model",))
    device: str = opt("auto", "Device: auto (GPU when present), cpu or cuda.", INFER,
                      choices=("auto", "cpu", "cuda"))
    dtype: str = opt("auto", "Weights dtype: auto (bfloat16 on GPU, float32 on CPU), float32, "
                     "bfloat16 or float16.", INFER,
                     choices=("auto", "float32", "bfloat16", "float16"))
    bf16: bool = opt(False, "bfloat16 mixed precision: float32 weights, matrix products in "
                     "bfloat16 under autocast, in training and in our decoder, scoring and "
                     "evaluation (vLLM then runs in bfloat16). The paper: true, on GPUs; on a CPU "
                     "it pays where the CPU has bfloat16 instructions (avx512_bf16, AMX).", INFER)
    batch_size: int = opt(0, "Prompts per batch when generating, scoring and evaluating (0: 64 "
                          "on CPU, 128 on GPU).", {"generate", "score", "evaluate", "run"})
    engine: str = opt("auto", "Generation engine: auto (vLLM when installed, else HF; the "
                      "environment variable SELFPLAY_ENGINE=hf|vllm decides it instead), hf "
                      "(our batched decoder) or vllm.", {"generate", "evaluate", "run"},
                      choices=("auto", "hf", "vllm"))
    tensor_parallel_size: int = opt(1, "vLLM: GPUs one engine spreads the model over (for a "
                                    "model that does not fit one).",
                                    {"generate", "evaluate", "run"})
    vllm_kv_cache_gib: float = opt(0.0, "vLLM: KV cache size in GiB (0: 2 GiB on CPU; on GPU "
                                   "vLLM's share of free memory).", {"generate", "evaluate", "run"})
    vllm_compile: str = opt("auto", "vLLM: torch.compile the model. auto: on a GPU yes, on a CPU "
                            "no: there it adds about 80 s to each engine start and gains 8% "
                            "tokens/s (14% without tcmalloc), so it pays for passes of more than "
                            "~15 minutes (docs/benchmarks.md).", {"generate", "evaluate", "run"},
                            choices=("auto", "true", "false"))

    def inference_batch_size(self) -> int:
        """--batch_size, or 0's default: larger on a GPU (measured in bench/)."""
        if self.batch_size:
            return self.batch_size
        import torch
        on_gpu = self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available())
        return 128 if on_gpu else 64


@dataclass
class DataSettings:
    """Where prompts and reference answers come from, and how rows are read."""
    dataset: str = opt(
        "builtin:tasks", "Prompts and reference answers: 'builtin:tasks' (the bundled task suite), "
        "a hub dataset id, a .jsonl/.json/.parquet file or a directory of them. For train: pairs, "
        "several as `a:1.0,b:0.5` (dataset:share used).", DATA_CMDS, aliases=("input_dir",),
        command_defaults={"train": "pairs"})
    split: str = opt("train", "Dataset split to read.", DATA_CMDS)
    dataset_layout: str = opt(
        "auto", "Row layout; auto detects it from the columns.", DATA_CMDS,
        choices=("auto", "messages", "spin", "prompt_completion", "alpaca", "preference"))
    reference_turn: str = opt(
        "first", "Which assistant turn of a chat is the reference answer: first (as in the SPIN "
        "paper) or last; earlier turns stay in the prompt.", DATA_CMDS, choices=("first", "last"))
    skip_bad_rows: bool = opt(False, "Skip malformed rows (they are counted and reported) instead "
                              "of stopping at the first one.", DATA_CMDS)
    max_prompts: int = opt(0, "Use only the first N prompts of the split (0: all).", DATA_CMDS,
                           command_defaults={"run": 128})
    skip_prompts: int = opt(0, "Skip the first N prompts of the split; with max_prompts, the "
                            "window [N, N + max_prompts): in `selfplay run`, set it to "
                            "sft_max_prompts for iterations on prompts the SFT stage did not "
                            "see.", DATA_CMDS)
    tasks_train_size: int = opt(2000, "Examples in the bundled suite's train split.",
                                DATA_CMDS | {"tasks"}, aliases=("n",))
    tasks_validation_size: int = opt(300, "Examples in the bundled suite's validation split "
                                     "(for choosing a recipe; never the test split).",
                                     DATA_CMDS | {"tasks"})
    tasks_test_size: int = opt(500, "Examples in the bundled suite's test split.",
                               DATA_CMDS | {"tasks"})
    tasks_seed: int = opt(0, "Seed of the bundled task suite (the same seed, the same tasks).",
                          DATA_CMDS | {"tasks"}, aliases=("seed",))
    export_format: str = opt("jsonl", "File format of `selfplay tasks export`.", {"tasks"},
                             choices=("jsonl", "parquet"))
    eval_split: str = opt("", "Split the run's evaluations read (default: the suite's test split "
                          "when training on train; 'validation' to choose a recipe without "
                          "touching test).", {"run"})

    def tasks_sizes(self) -> dict[str, int]:
        return {"train": self.tasks_train_size, "validation": self.tasks_validation_size,
                "test": self.tasks_test_size}


@dataclass
class GenerationSettings:
    """How θ_t answers: token budget, sampling, fractions of the split."""
    max_new_tokens: int = opt(256, "Most tokens generated per response (the paper: 256).",
                              {"generate", "evaluate", "run"})
    temperature: float = opt(0.0, "Sampling temperature; 0 is greedy decoding (the paper's HF "
                             "generation).", {"generate", "run"})
    top_p: float = opt(1.0, "Nucleus sampling mass (used when temperature > 0).",
                       {"generate", "run"})
    num_samples: int = opt(1, "Responses per prompt (SPIN: 1; SPPO: 5). More than one needs "
                           "temperature > 0.", {"generate", "run"})
    data_frac: int = opt(0, "Which fraction of the split to process (with frac_len).",
                         {"generate"})
    frac_len: int = opt(0, "Prompts per fraction; 0 takes the whole split as fraction 0.",
                        {"generate"})
    score: bool = opt(False, "Right after generating, score references and responses with the "
                      "same model (stored reference log-probs).", {"generate"})


@dataclass
class ScoringSettings:
    """How a prompt + response is cut and read when log-probs are computed."""
    max_length: int = opt(1024, "Most tokens of prompt + response when scoring, training and "
                          "measuring reference likelihood.", INFER)
    max_prompt_length: int = opt(512, "Most prompt tokens kept (from the end) when prompt + "
                                 "response exceed max_length.", INFER)
    logprob_chunk_size: int = opt(1024, "Response positions whose logits are computed at once.",
                                  INFER)


@dataclass
class RankSettings:
    """SPPO's preference oracle."""
    judge: str = opt("rule", "Preference oracle: rule (task-suite checker), reward-model, pairrm "
                     "(llm-blender's PairRM), or module:function.", {"rank", "run"})
    reward_model: str = opt("", "With --judge reward-model: a sequence-classification model "
                            "(hub id or path).", {"rank", "run"})
    pairrm_estimator: str = opt("paper", "With --judge pairrm: paper (scores over all K, then "
                                "σ(s_i − s_j)) or pairwise (one comparison per ordered pair).",
                                {"rank", "run"}, choices=("paper", "pairwise"))
    pairrm_model: str = opt("llm-blender/PairRM-hf", "With --judge pairrm: the PairRM weights, a "
                            "hub id (read from the local Hugging Face cache first) or a "
                            "checkpoint directory (PairRM-hf's layout or llm-blender/PairRM's).",
                            {"rank", "run"})


@dataclass
class ConvertSettings:
    """Which shards become pairs."""
    shards_dir: str = opt("generated", "Directory of generation shards to merge (convert) or "
                          "judge (rank).", {"convert", "rank"}, aliases=("input_dir",))
    num_fracs: int = opt(0, "Number of train fractions expected (0: whatever is there); the test "
                         "split is whatever was generated.", {"convert"})
    allow_missing_shards: bool = opt(False, "Go on when a fraction or a process shard is missing.",
                                     {"convert"})
    drop_identical: bool = opt(False, "SPIN: leave out pairs whose generated answer equals the "
                               "reference (their loss has no gradient; they only dilute the "
                               "batch); counted in the convert report.", {"convert", "run"})


@dataclass
class TrainingSettings:
    """The optimizer, the loss and the schedule (the official recipe's keys)."""
    per_device_train_batch_size: int = opt(8, "Pairs (sft: examples) per process per step (the "
                                           "paper: 8 on each of 8 GPUs).", TRAIN_CMDS,
                                           command_defaults={"run": 4})
    gradient_accumulation_steps: int = opt(1, "Steps whose gradients add up to one update.",
                                           TRAIN_CMDS)
    num_train_epochs: float = opt(2.0, "Passes over the pairs (the paper: 2 per iteration) or, "
                                  "for sft, the examples.", TRAIN_CMDS,
                                  command_defaults={"run": 1.0, "sft": 1.0})
    max_steps: int = opt(0, "Stop after this many optimizer updates (0: by num_train_epochs).",
                         TRAIN_CMDS)
    learning_rate: float = opt(5e-6, "Peak learning rate (the paper: 5e-7 for zephyr-7b; the "
                               "defaults are sized for the embedded 135M model, see "
                               "docs/default-run.md; sft: 2e-5, as the alignment handbook's "
                               "zephyr SFT).", TRAIN_CMDS,
                               command_defaults={"run": 2e-6, "sft": 2e-5})
    lr_scheduler_type: str = opt("linear", "Schedule after warmup.", TRAIN_CMDS,
                                 choices=("linear", "cosine", "constant"))
    warmup_ratio: float = opt(0.1, "Share of the updates spent warming up linearly.", TRAIN_CMDS)
    optim: str = opt("rmsprop", "Optimizer: rmsprop (the SPIN paper) or adamw (sft's default).",
                     TRAIN_CMDS, choices=("rmsprop", "adamw"), command_defaults={"sft": "adamw"})
    weight_decay: float = opt(0.0, "Weight decay.", TRAIN_CMDS)
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0: none).", TRAIN_CMDS)
    beta: float = opt(0.1, "β of the loss: how far θ may move from the reference (the paper: "
                      "0.1, and 5.0 in the last iteration).", PAIR_CMDS)
    loss_type: str = opt("sigmoid", "sigmoid: SPIN's logistic loss (TRL's name); hinge: "
                         "max(0, 1 - β·margin); sppo (soft), sppo_single, sppo_hard: SPPO's, "
                         "on pairs with win probabilities.", PAIR_CMDS,
                         choices=("sigmoid", "hinge", "sppo", "sppo_single", "sppo_hard"))
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.",
                                       TRAIN_CMDS)
    group_by_length: bool = opt(True, "Batch pairs of similar length together (seeded), so "
                                "that less compute goes to padding.", TRAIN_CMDS)
    logging_steps: int = opt(10, "Log averaged metrics every N updates.", TRAIN_CMDS)
    report_to: str = opt("tensorboard", "Where training metrics go besides train_log.jsonl: "
                         "tensorboard, wandb, both (comma-separated) or none. With wandb, "
                         "`selfplay run` also sends each model's accuracy and its report.",
                         TRAIN_CMDS)
    wandb_project: str = opt("selfplay", "The W&B project (--report_to wandb); a run's "
                             "trainings and report share a W&B group named after its "
                             "output_dir.", TRAIN_CMDS)
    save_steps: int = opt(0, "Save a resumable checkpoint every N updates (0: only the final "
                          "model).", TRAIN_CMDS)
    resume: bool = opt(False, "Continue from the last checkpoint in output_dir.",
                       {"sft", "train"})
    reference_model: str = opt("", "The reference π_ref when it is not the starting model "
                               "(empty: the starting model, θ_t).", {"train"})


@dataclass
class LoraSettings:
    """What is trained: all weights, a LoRA adapter, or an adapter on a 4-bit base (QLoRA)."""
    use_peft: bool = opt(False, "Train a LoRA adapter instead of all weights.", TRAIN_CMDS)
    lora_r: int = opt(16, "LoRA rank: the inner dimension of each adapter.", TRAIN_CMDS)
    lora_alpha: int = opt(32, "LoRA alpha (scale = alpha / r).", TRAIN_CMDS)
    lora_dropout: float = opt(0.05, "Dropout on the LoRA input.", TRAIN_CMDS)
    lora_target_modules: str = opt("all-linear", "Modules that get adapters: all-linear, or "
                                   "comma-separated names (q_proj,v_proj).", TRAIN_CMDS)
    load_in_4bit: bool = opt(False, "QLoRA: load the base weights in 4-bit NF4 with double "
                             "quantization (bitsandbytes); needs --use_peft.", TRAIN_CMDS)
    merge_adapter: bool = opt(True, "With LoRA, save the merged model (what the next iteration "
                              "generates from); false saves the adapter alone.", TRAIN_CMDS)


@dataclass
class EvaluationSettings:
    """What a model is compared against."""
    baseline: str = opt("", "A second model, or a saved eval.json of the same prompts, to "
                        "compare against: win rate and paired sign test.", {"evaluate"})
    eval_max_new_tokens: int = opt(
        0, "Most tokens per evaluated answer; 0 sizes it from the data: 1.5 times the "
        "longest reference answer, at least 32, at most --max_new_tokens.", {"evaluate", "run"})
    reference_likelihood: bool = opt(
        True, "Also measure the log-likelihood of the reference answers (one more forward pass "
        "over every prompt and reference, about a third of an evaluation's time on CPU).",
        {"evaluate", "run"})
    lm_eval_tasks: str = opt(
        "", "lm-evaluation-harness tasks run on every evaluated model, comma-separated, by "
        "lm-eval's names (gsm8k,ifeval,...): scores with standard errors in eval.json and the "
        "report (pip install 'selfplay[lm-eval]').", {"evaluate", "run"})
    lm_eval_include: str = opt("", "A directory of lm-eval task YAMLs to add (your own tasks, "
                               "e.g. over a local file).", {"evaluate", "run"})
    lm_eval_limit: float = opt(0.0, "Documents per lm-eval task: 0 all, below 1 a fraction, "
                               "else a count (for quick looks: a limited score is not the "
                               "task's score).", {"evaluate", "run"})
    lm_eval_num_fewshot: int = opt(-1, "Few-shot examples for every lm-eval task (-1: each "
                                   "task's own setting).", {"evaluate", "run"})


@dataclass
class RunSettings:
    """The loop of `selfplay run`."""
    method: str = opt("spin", "Self-play method: spin (pairs against the dataset's answers) or "
                      "sppo (K samples judged against each other). sppo changes the defaults of "
                      + ", ".join(f"{k} ({v})" for k, v in {**METHOD_DEFAULTS["sppo"],
                                                            **RUN_METHOD_DEFAULTS["sppo"]}.items())
                      + "; sft is the control arm: each iteration continues supervised fine-tuning "
                      "on the same prompts with as many updates as a SPIN iteration.", {"run"},
                      choices=("spin", "sppo", "sft"))
    num_iterations: int = opt(2, "Iterations t = 0 .. T-1; iteration t trains θ_{t+1} from θ_t.",
                              {"run"})
    sft_epochs: float = opt(0.0, "Epochs of supervised fine-tuning on the train split before "
                            "iteration 0, which makes θ_0 (the paper starts SPIN from a model "
                            "fine-tuned on its data); 0: none, θ_0 is the model given.", {"run"})
    sft_learning_rate: float = opt(2e-5, "Learning rate of that SFT stage (AdamW), and of the "
                                   "control arm's iterations (--method sft).", {"run"})
    sft_max_prompts: int = opt(0, "Examples of the train split the SFT stage uses (the first "
                               "N; 0: all).", {"run"})
    data_policy: str = opt(
        "previous_and_current", "Pairs iteration t trains on: current (its own), or "
        "previous_and_current (iteration t-1's and t's, the paper's choice from iteration 1 on).",
        {"run"}, choices=("current", "previous_and_current"))
    fresh_prompts: bool = opt(False, "Each iteration reads the next --max_prompts prompts "
                              "(iteration t: from skip_prompts + t·max_prompts) instead of the "
                              "same ones; the control arm reads what SPIN reads.", {"run"})
    start_from: str = opt("previous", "Weights iteration t starts from: previous (θ_t, the "
                          "paper) or sft (the original model; θ_t stays the reference).", {"run"},
                          choices=("previous", "sft"))
    from_iteration: int = opt(0, "Start at iteration k, with --model as θ_k (a checkpoint of "
                              "iteration k-1).", {"run"})
    force: bool = opt(False, "Resume a run directory even though the recipe changed.", {"run"})
    push_to_hub: str = opt("", "Push the final model to this hub repository (nothing is pushed "
                           "unless set).", {"run"})
    match_steps_of: str = opt("", "With --method sft: a SPIN run directory whose iterations set "
                              "this arm's updates per iteration (--drop_identical can leave SPIN "
                              "fewer pairs than prompts).", {"run"})
    iterations: list = opt(None, "Per-iteration overrides, a list of mappings (in a recipe, or "
                           "a YAML list on the command line), e.g. [{}, {}, {learning_rate: "
                           "1.0e-7}, {beta: 5.0}].", {"run"},
                           default_factory=list)


@dataclass
class JobSettings:
    """Where a command writes, whether it redoes finished work, and its seed."""
    output_dir: str = opt("generated", "Where the command writes its output.",
                          {"generate", "score", "convert", "evaluate", "rank", "sft", "train",
                           "run", "compare"},
                          command_defaults={"convert": "pairs", "score": "scored",
                                            "compare": "compare",
                                            "evaluate": "eval", "train": "checkpoints/spin",
                                            "sft": "checkpoints/sft", "run": "runs/spin",
                                            "rank": "ranked"})
    overwrite: bool = opt(False, "Redo finished work (shards, a trained model) instead of "
                          "skipping it.", {"generate", "score", "sft", "train", "rank"})
    seed: int = opt(42, "Random seed of sampling, and of data order and initialisation in "
                    "training.", {"generate", "sft", "train", "run"})


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

    def sft_training(self, epochs: float) -> "TrainingSettings":
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
        """Cross-option checks that a single value's type cannot express."""
        r = self.run
        self.validate_one()
        _need(r.num_iterations > 0, "--num_iterations must be positive.")
        _need(not r.fresh_prompts or self.data.max_prompts > 0,
              "--fresh_prompts needs --max_prompts (the prompts each iteration reads).")
        _need(0 <= r.from_iteration < r.num_iterations,
              f"--from_iteration {r.from_iteration} must lie in [0, --num_iterations "
              f"{r.num_iterations}).")
        _need(len(r.iterations) <= r.num_iterations,
              f"`iterations` has {len(r.iterations)} entries but --num_iterations is "
              f"{r.num_iterations}.")
        for t in range(len(r.iterations)):
            try:
                self.for_iteration(t).validate_one()
            except SelfplayError as e:
                raise SelfplayError(f"iteration {t} of `iterations`: {e}") from None

    def validate_one(self) -> None:
        """The checks of one set of values (the run's, or one iteration's)."""
        m, d, g, s, tr, lo = (self.model, self.data, self.generation, self.scoring,
                              self.training, self.lora)
        _need(m.batch_size >= 0, "--batch_size must be 0 (automatic) or a positive integer.")
        _need(m.tensor_parallel_size >= 1, "--tensor_parallel_size must be at least 1.")
        _need(m.vllm_kv_cache_gib >= 0, "--vllm_kv_cache_gib must be 0 (automatic) or positive.")
        _need(g.frac_len >= 0, "--frac_len must be 0 (whole split) or a positive integer.")
        _need(g.data_frac >= 0, "--data_frac must be a non-negative integer.")
        _need(g.frac_len > 0 or g.data_frac == 0,
              f"--data_frac {g.data_frac} needs --frac_len > 0 (with frac_len 0 the whole split "
              "is fraction 0).")
        _need(g.max_new_tokens > 0, "--max_new_tokens must be positive.")
        _need(g.temperature >= 0, "--temperature must be 0 (greedy) or positive.")
        _need(0 < g.top_p <= 1, "--top_p must lie in (0, 1].")
        _need(g.num_samples >= 1, "--num_samples must be at least 1.")
        _need(g.num_samples == 1 or g.temperature > 0,
              f"--num_samples {g.num_samples} with --temperature 0 would give identical greedy "
              "responses; set --temperature > 0 (the SPPO paper uses 0.7 with --top_p 0.9).")
        _need(d.max_prompts >= 0 and d.skip_prompts >= 0,
              "--max_prompts and --skip_prompts must be 0 or positive.")
        _need(s.max_length > 0 and s.max_prompt_length > 0,
              "--max_length and --max_prompt_length must be positive.")
        _need(s.max_prompt_length < s.max_length,
              f"--max_prompt_length ({s.max_prompt_length}) must be smaller than --max_length "
              f"({s.max_length}), or no response token would fit.")
        _need(s.logprob_chunk_size > 0, "--logprob_chunk_size must be positive.")
        _need(self.convert.num_fracs >= 0, "--num_fracs must be 0 (whatever is there) or positive.")
        _need(tr.per_device_train_batch_size > 0,
              "--per_device_train_batch_size must be positive.")
        _need(tr.gradient_accumulation_steps > 0,
              "--gradient_accumulation_steps must be positive.")
        _need(tr.num_train_epochs > 0 or tr.max_steps > 0,
              "--num_train_epochs must be positive (or set --max_steps).")
        _need(tr.learning_rate > 0, "--learning_rate must be positive.")
        _need(tr.max_steps >= 0, "--max_steps must be 0 (by --num_train_epochs) or positive.")
        _need(tr.max_grad_norm >= 0 and tr.weight_decay >= 0,
              "--max_grad_norm and --weight_decay must be 0 or positive.")
        _need(0 <= tr.warmup_ratio < 1, "--warmup_ratio must lie in [0, 1).")
        _need(tr.beta > 0, "--beta must be positive.")
        _need(self.run.sft_epochs >= 0 and self.run.sft_learning_rate > 0
              and self.run.sft_max_prompts >= 0,
              "--sft_epochs and --sft_max_prompts must be 0 or positive, --sft_learning_rate "
              "positive.")
        _need(tr.logging_steps > 0, "--logging_steps must be positive.")
        parse_report_to(tr.report_to)
        ev = self.evaluation
        _need(ev.lm_eval_limit >= 0, "--lm_eval_limit must be 0 (all), a fraction below 1 or a "
              "count.")
        _need(ev.lm_eval_num_fewshot >= -1, "--lm_eval_num_fewshot must be -1 (each task's own) "
              "or a count.")
        _need(not ev.lm_eval_include or Path(ev.lm_eval_include).is_dir(),
              f"--lm_eval_include {ev.lm_eval_include} is not a directory (of lm-eval task "
              "YAMLs).")
        _need(tr.save_steps >= 0, "--save_steps must be 0 (final model only) or positive.")
        _need(lo.lora_r > 0 and lo.lora_alpha > 0, "--lora_r and --lora_alpha must be positive.")
        _need(0 <= lo.lora_dropout < 1, "--lora_dropout must lie in [0, 1).")
        _need(not lo.load_in_4bit or lo.use_peft,
              "--load_in_4bit (QLoRA) trains an adapter on frozen 4-bit weights, so it needs "
              "--use_peft; 4-bit weights themselves cannot be trained.")
        _need(not (tr.resume and self.job.overwrite),
              "--resume and --overwrite contradict each other.")
        _need(not self.run.match_steps_of or self.run.method == "sft",
              "--match_steps_of sets the updates of the SFT control arm; it needs --method sft.")
        _need(self.run.method != "sppo" or (g.num_samples >= 2
                                            and tr.loss_type.startswith("sppo")),
              "--method sppo needs --num_samples of at least 2 (the paper: 5) and an SPPO "
              "--loss_type (sppo, sppo_single or sppo_hard).")
        _need(min(d.tasks_sizes().values()) > 0,
              "--tasks_train_size, --tasks_validation_size and --tasks_test_size must be "
              "positive.")


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise SelfplayError(msg)


def parse_mixture(spec: str) -> list[tuple[str, float]]:
    """`a` or `a:1.0,b:0.5` from the command line: datasets and the share of each used (the
    paper trains iteration t on iteration t-1's and t's pairs)."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        path, _, frac = part.rpartition(":")
        try:
            f = float(frac)
        except ValueError:
            path, f = part, 1.0
        if not 0 < f <= 1:
            raise SelfplayError(f"--dataset {part!r}: the mixing fraction must lie in (0, 1].")
        out.append((path, f))
    return out


# ---------------------------------------------------------------------------------------
# Schema introspection
# ---------------------------------------------------------------------------------------

FIELDS: dict[str, dataclasses.Field] = {}
GROUP_OF: dict[str, str] = {}
_HINTS: dict[str, Any] = {}
for _g, _cls, _ in GROUPS:
    _hints = typing.get_type_hints(_cls)
    for _f in dataclasses.fields(_cls):
        FIELDS[_f.name], GROUP_OF[_f.name], _HINTS[_f.name] = _f, _g, _hints[_f.name]
ALIASES: dict[str, list[str]] = {}
for _f in FIELDS.values():
    for _a in _f.metadata["aliases"]:
        ALIASES.setdefault(_a, []).append(_f.name)


def fields_for(command: str) -> list[dataclasses.Field]:
    return [f for f in FIELDS.values() if command in f.metadata["commands"]]


def _canonical(key: str, command: str | None = None) -> str:
    """The field a key names; an alias shared by two fields resolves by the command."""
    key = key.strip().lstrip("-").replace("-", "_")
    targets = ALIASES.get(key)
    if not targets or (key in FIELDS and (command is None
                                          or command in FIELDS[key].metadata["commands"])):
        return key
    return next((t for t in targets if command in FIELDS[t].metadata["commands"]), targets[0])


def _type_name(tp: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            list: "a list of mappings"}.get(tp, str(tp))


def coerce(name: str, value: Any, source: str = "") -> Any:
    """Turn a YAML or command-line value into the field's type, or say what the option takes."""
    f = FIELDS[name]
    tp = _HINTS[name]
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    where = f" in {source}" if source else ""
    takes = f"one of: {', '.join(map(str, f.metadata['choices']))}" if f.metadata["choices"] \
        else _type_name(tp)
    bad = SelfplayError(f"option --{name}{where} got {value!r}, but it takes {takes}.")
    if tp is bool:
        if isinstance(value, bool):
            out = value
        elif isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            out = True
        elif isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            out = False
        else:
            raise bad
    elif tp is int:
        if isinstance(value, bool):
            raise bad
        try:
            out = int(value) if not isinstance(value, float) or value.is_integer() else None
        except (TypeError, ValueError):
            out = None
        if out is None:
            raise bad
    elif tp is float:
        if isinstance(value, bool):
            raise bad
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise bad from None
        if not math.isfinite(out):
            raise SelfplayError(f"option --{name}{where} got {value!r}, but it takes a finite "
                                "number.")
    elif tp is str:
        if isinstance(value, (dict, list)):
            raise bad
        out = str(value)
    elif tp is list:                 # `iterations`: per-iteration overrides, each key checked
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise bad from None
        if not isinstance(value, list) or not all(isinstance(v, dict) or v is None
                                                   for v in value):
            raise bad
        out = []
        for t, over in enumerate(value):
            entry = {}
            for k, v in (over or {}).items():
                key = _canonical(str(k))
                if key not in FIELDS or key == name:
                    raise _unknown(key, list(FIELDS), f"{source or 'the recipe'} "
                                   f"`{name}` entry {t}", None)
                entry[key] = coerce(key, v, f"{source or 'the recipe'} `{name}` entry {t}")
            out.append(entry)
    else:  # pragma: no cover - the schema holds only the types above
        out = value
    choices = f.metadata["choices"]
    if choices and out not in choices:
        raise bad
    return out


def _unknown(key: str, valid: list[str], source: str, command: str | None) -> SelfplayError:
    where = f" in {source}" if source else ""
    everything = list(FIELDS) + list(ALIASES)
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.6) or \
        difflib.get_close_matches(key, everything, n=1, cutoff=0.6)
    if key in FIELDS and command:
        return SelfplayError(f"option --{key}{where} does not apply to `selfplay {command}`; "
                             f"`selfplay {command} --help` lists the options it takes.")
    hint = f"; did you mean --{near[0]}?" if near else \
        f"; `selfplay {command or ''} --help` lists the valid options."
    return SelfplayError(f"unknown option --{key}{where}{hint}")


def parse_overrides(args: list[str], command: str | None = None) -> list[tuple[str, str]]:
    """`--key value`, `--key=value` and bare `--flag` (true), in order."""
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        tok = args[i]
        if not tok.startswith("--") or tok == "--":
            raise SelfplayError(f"unexpected argument {tok!r}: options are written --key value "
                                "or --key=value.")
        if "=" in tok:
            k, v = tok[2:].split("=", 1)
            i += 1
        else:
            k = tok[2:]
            nxt = args[i + 1] if i + 1 < len(args) else None
            name = _canonical(k, command)
            is_bool = name in FIELDS and _HINTS[name] is bool
            if nxt is None or (nxt.startswith("--") and not _looks_negative_number(nxt)):
                if not is_bool and name in FIELDS:
                    raise SelfplayError(f"option --{name} needs a value.")
                v = "true"
                i += 1
            elif is_bool and nxt.lower() not in ("true", "false", "1", "0", "yes", "no", "on",
                                                 "off"):
                v = "true"
                i += 1
            else:
                v = nxt
                i += 2
        out.append((k, v))
    return out


def _looks_negative_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def load_config(command: str, recipe: str | Path | None = None,
                overrides: list[str] | None = None) -> Config:
    """Defaults, then the recipe's keys, then the command line; validated before returning."""
    valid = [f.name for f in fields_for(command)]
    valid_set = set(valid)
    values: dict[str, Any] = {f.name: f.metadata["command_defaults"][command]
                              for f in FIELDS.values() if command in f.metadata["command_defaults"]}
    explicit_keys: set[str] = set()     # set by the recipe or the command line
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise SelfplayError(f"recipe {path} does not exist.")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise SelfplayError(f"recipe {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise SelfplayError(f"recipe {path} must be a mapping of option: value.")
        for key, value in data.items():
            name = _canonical(str(key), command)
            if name not in FIELDS:
                raise _unknown(name, valid, str(path), None)
            # A recipe may hold keys of other commands (one recipe for a whole run).
            values[name] = coerce(name, value, str(path))
            explicit_keys.add(name)
    given: dict[str, str] = {}
    for key, value in parse_overrides(overrides or [], command):
        name = _canonical(key, command)
        if name not in valid_set:
            raise _unknown(name, valid, "", command)
        if name in given:
            raise SelfplayError(f"option --{name} is given twice ({given[name]!r} and {value!r}) "
                                "on the command line; give it once.")
        given[name] = value
        values[name] = coerce(name, value)
        explicit_keys.add(name)
    method = values.get("method", "")
    for k, v in {**METHOD_DEFAULTS.get(method, {}),
                 **(RUN_METHOD_DEFAULTS.get(method, {}) if command == "run" else {})}.items():
        if k not in explicit_keys:
            values[k] = v
    cfg = Config.from_flat(values)
    cfg.validate()
    return cfg


# The group a command is about comes first in its help: what its user reaches for most.
OWN_GROUP = {"run": "run", "train": "training", "sft": "training", "generate": "generation",
             "score": "scoring", "rank": "rank", "convert": "convert",
             "evaluate": "evaluation"}


def format_help(command: str) -> str:
    """The options `command` reads, under their groups' headings, its own group first."""
    lines = []
    first = OWN_GROUP.get(command)
    for group, klass, heading in sorted(GROUPS, key=lambda g: g[0] != first):
        fields = [f for f in dataclasses.fields(klass) if command in f.metadata["commands"]]
        if not fields:
            continue
        lines += ["", f"{heading}:"]
        for f in fields:
            names = ", ".join([f"--{f.name}"] + [f"--{a}" for a in f.metadata["aliases"]
                                                  if _canonical(a, command) == f.name])
            default = f.metadata["command_defaults"].get(
                command, f.default if f.default is not dataclasses.MISSING else f.default_factory())
            lines.append(f"  {names}  ({_type_name(_HINTS[f.name])}, default: {default!r})")
            text = f.metadata["help"]
            if f.metadata["choices"]:
                text += f" Choices: {', '.join(map(str, f.metadata['choices']))}."
            lines.extend("      " + ln for ln in textwrap.wrap(text, 86) or [""])
    return "\n".join(lines[1:])
