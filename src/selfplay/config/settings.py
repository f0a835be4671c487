"""The settings groups of inference and data: model, data, generation, scoring, ranking,
convert and evaluation. Each group checks its own values (`check`); checks across groups are
Config's (schema.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from selfplay.config.options import ALL_STAGES, INFER, need, opt

DATA_CMDS = INFER


@dataclass
class ModelSettings:
    """Which model, and how it runs for inference."""
    model_name_or_path: str = opt(
        "default", "Model to load: 'default' (the embedded SmolLM2-135M-Instruct), a hub id, "
        "a local checkpoint directory or a .gguf file.", INFER, aliases=("model",),
        feeds=ALL_STAGES)
    device: str = opt("auto", "Device: auto (GPU when present), cpu or cuda.", INFER,
                      choices=("auto", "cpu", "cuda"), resumable=True)
    dtype: str = opt("auto", "Weights dtype: auto (bfloat16 on GPU, float32 on CPU), float32, "
                     "bfloat16 or float16.", INFER,
                     choices=("auto", "float32", "bfloat16", "float16"), feeds=ALL_STAGES)
    bf16: bool = opt(False, "bfloat16 mixed precision: float32 weights, matrix products in "
                     "bfloat16 under autocast, in training and in our decoder, scoring and "
                     "evaluation (vLLM then runs in bfloat16). The paper: true, on GPUs; on a CPU "
                     "it pays where the CPU has bfloat16 instructions (avx512_bf16, AMX).", INFER,
                     feeds=ALL_STAGES)
    batch_size: int = opt(0, "Prompts per batch when generating, scoring and evaluating (0: 64 "
                          "on CPU, 128 on GPU).", {"generate", "score", "evaluate", "run"},
                          resumable=True)
    engine: str = opt("auto", "Generation engine: auto (vLLM when installed, else HF; the "
                      "environment variable SELFPLAY_ENGINE=hf|vllm decides it instead), hf "
                      "(our batched decoder) or vllm.", {"generate", "evaluate", "run"},
                      choices=("auto", "hf", "vllm"), resumable=True)
    tensor_parallel_size: int = opt(1, "vLLM: GPUs one engine spreads the model over (for a "
                                    "model that does not fit one).",
                                    {"generate", "evaluate", "run"}, resumable=True)
    vllm_kv_cache_gib: float = opt(0.0, "vLLM: KV cache size in GiB (0: 2 GiB on CPU; on GPU "
                                   "vLLM's share of free memory).", {"generate", "evaluate", "run"},
                                   resumable=True)
    vllm_compile: str = opt("auto", "vLLM: torch.compile the model. auto: on a GPU yes, on a CPU "
                            "no, where compiling lengthens every engine start and pays only for "
                            "long passes (docs/benchmarks.md measures both).",
                            {"generate", "evaluate", "run"}, choices=("auto", "true", "false"),
                            resumable=True)

    def inference_batch_size(self) -> int:
        """--batch_size, or 0's default: larger on a GPU (measured in bench/)."""
        if self.batch_size:
            return self.batch_size
        import torch
        on_gpu = self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available())
        return 128 if on_gpu else 64

    def check(self) -> None:
        need(self.batch_size >= 0, "--batch_size must be 0 (automatic) or a positive integer.")
        need(self.tensor_parallel_size >= 1, "--tensor_parallel_size must be at least 1.")
        need(self.vllm_kv_cache_gib >= 0,
             "--vllm_kv_cache_gib must be 0 (automatic) or positive.")


@dataclass
class DataSettings:
    """Where prompts and reference answers come from, and how rows are read."""
    dataset: str = opt(
        "builtin:tasks", "Prompts and reference answers: 'builtin:tasks' (the bundled task suite), "
        "a hub dataset id, a .jsonl/.json/.parquet file or a directory of them. For train: pairs, "
        "several as `a:1.0,b:0.5` (dataset:share used).", DATA_CMDS, aliases=("input_dir",),
        command_defaults={"train": "pairs"}, feeds=ALL_STAGES)
    split: str = opt("train", "Dataset split to read.", DATA_CMDS, feeds=ALL_STAGES)
    dataset_layout: str = opt(
        "auto", "Row layout; auto detects it from the columns.", DATA_CMDS,
        choices=("auto", "messages", "spin", "prompt_completion", "alpaca", "preference"),
        feeds=ALL_STAGES)
    reference_turn: str = opt(
        "first", "Which assistant turn of a chat is the reference answer: first (as in the SPIN "
        "paper) or last; earlier turns stay in the prompt.", DATA_CMDS, choices=("first", "last"),
        feeds=ALL_STAGES)
    skip_bad_rows: bool = opt(False, "Skip malformed rows (they are counted and reported) instead "
                              "of stopping at the first one.", DATA_CMDS, feeds=ALL_STAGES)
    # The iterations' prompts: evaluations read the whole held-out split, and the SFT stage
    # sizes its own with sft_max_prompts.
    max_prompts: int = opt(0, "Use only the first N prompts of the split (0: all).", DATA_CMDS,
                           command_defaults={"run": 128}, feeds=("generate", "control"))
    skip_prompts: int = opt(0, "Skip the first N prompts of the split; with max_prompts, the "
                            "window [N, N + max_prompts): in `selfplay run`, set it to "
                            "sft_max_prompts for iterations on prompts the SFT stage did not "
                            "see.", DATA_CMDS, feeds=("generate", "control"))
    tasks_train_size: int = opt(2000, "Examples in the bundled suite's train split.",
                                DATA_CMDS | {"tasks"}, aliases=("n",),
                                feeds=("sft", "generate", "control", "tasks"))
    tasks_validation_size: int = opt(300, "Examples in the bundled suite's validation split "
                                     "(for choosing a recipe; never the test split).",
                                     DATA_CMDS | {"tasks"}, feeds=("evaluate", "tasks"))
    tasks_test_size: int = opt(500, "Examples in the bundled suite's test split.",
                               DATA_CMDS | {"tasks"}, feeds=("evaluate", "tasks"))
    tasks_seed: int = opt(0, "Seed of the bundled task suite (the same seed, the same tasks).",
                          DATA_CMDS | {"tasks"}, aliases=("seed",), feeds=ALL_STAGES)
    holdout_size: int = opt(
        0, "Prompts of the training split held out for evaluation, those with the smallest id "
        "hashes, which training then never reads (0: none; -1: as many as needed, a tenth of "
        "the split, at most 500, and only where the dataset has no test split: what "
        "`selfplay run` does).", DATA_CMDS, command_defaults={"run": -1},
        feeds=("sft", "generate", "control", "evaluate"))
    export_format: str = opt("jsonl", "File format of `selfplay tasks export`.", {"tasks"},
                             choices=("jsonl", "parquet"), feeds=("tasks",))
    eval_split: str = opt("", "Split the run's evaluations read (default: the suite's test split "
                          "when training on train; 'validation' to choose a recipe without "
                          "touching test).", {"run"}, feeds=("evaluate",))

    def tasks_sizes(self) -> dict[str, int]:
        return {"train": self.tasks_train_size, "validation": self.tasks_validation_size,
                "test": self.tasks_test_size}

    def check(self) -> None:
        need(self.holdout_size >= -1, "--holdout_size must be -1 (as needed), 0 or a count.")
        need(self.max_prompts >= 0 and self.skip_prompts >= 0,
             "--max_prompts and --skip_prompts must be 0 or positive.")
        need(min(self.tasks_sizes().values()) > 0,
             "--tasks_train_size, --tasks_validation_size and --tasks_test_size must be "
             "positive.")


@dataclass
class GenerationSettings:
    """How θ_t answers: token budget, sampling, fractions of the split."""
    # The evaluation's answer budget is capped by it too.
    max_new_tokens: int = opt(256, "Most tokens generated per response (the paper: 256).",
                              {"generate", "evaluate", "run"}, feeds=("generate", "evaluate"))
    temperature: float = opt(0.0, "Sampling temperature; 0 is greedy decoding (the paper's HF "
                             "generation).", {"generate", "run"}, feeds=("generate",))
    top_p: float = opt(1.0, "Nucleus sampling mass (used when temperature > 0).",
                       {"generate", "run"}, feeds=("generate",))
    num_samples: int = opt(1, "Responses per prompt (SPIN: 1; SPPO: 5). More than one needs "
                           "temperature > 0.", {"generate", "run"}, feeds=("generate",))
    data_frac: int = opt(0, "Which fraction of the split to process (with frac_len).",
                         {"generate"}, feeds=("generate",))
    frac_len: int = opt(0, "Prompts per fraction; 0 takes the whole split as fraction 0.",
                        {"generate"}, feeds=("generate",))
    score: bool = opt(False, "Right after generating, score references and responses with the "
                      "same model (stored reference log-probs).", {"generate"},
                      feeds=("generate",))

    def check(self) -> None:
        need(self.frac_len >= 0, "--frac_len must be 0 (whole split) or a positive integer.")
        need(self.data_frac >= 0, "--data_frac must be a non-negative integer.")
        need(self.frac_len > 0 or self.data_frac == 0,
             f"--data_frac {self.data_frac} needs --frac_len > 0 (with frac_len 0 the whole "
             "split is fraction 0).")
        need(self.max_new_tokens > 0, "--max_new_tokens must be positive.")
        need(self.temperature >= 0, "--temperature must be 0 (greedy) or positive.")
        need(0 < self.top_p <= 1, "--top_p must lie in (0, 1].")
        need(self.num_samples >= 1, "--num_samples must be at least 1.")
        need(self.num_samples == 1 or self.temperature > 0,
             f"--num_samples {self.num_samples} with --temperature 0 would give identical "
             "greedy responses; set --temperature > 0 (the SPPO paper uses 0.7 with --top_p "
             "0.9).")


@dataclass
class ScoringSettings:
    """How a prompt + response is cut and read when log-probs are computed."""
    max_length: int = opt(1024, "Most tokens of prompt + response when scoring, training and "
                          "measuring reference likelihood.", INFER, feeds=ALL_STAGES)
    max_prompt_length: int = opt(512, "Most prompt tokens kept (from the end) when prompt + "
                                 "response exceed max_length.", INFER, feeds=ALL_STAGES)
    logprob_chunk_size: int = opt(1024, "Response positions whose logits are computed at once.",
                                  INFER, resumable=True)

    def check(self) -> None:
        need(self.max_length > 0 and self.max_prompt_length > 0,
             "--max_length and --max_prompt_length must be positive.")
        need(self.max_prompt_length < self.max_length,
             f"--max_prompt_length ({self.max_prompt_length}) must be smaller than --max_length "
             f"({self.max_length}), or no response token would fit.")
        need(self.logprob_chunk_size > 0, "--logprob_chunk_size must be positive.")


# The judge ranks SPPO's samples and measures each iteration's win rate in its evaluation.
_JUDGED = ("rank", "evaluate")


@dataclass
class RankSettings:
    """SPPO's preference oracle."""
    judge: str = opt("rule", "Preference oracle: rule (task-suite checker), reward-model, pairrm "
                     "(llm-blender's PairRM), or module:function.", {"rank", "run"}, feeds=_JUDGED)
    reward_model: str = opt("", "With --judge reward-model: a sequence-classification model "
                            "(hub id or path).", {"rank", "run"}, feeds=_JUDGED)
    pairrm_estimator: str = opt("paper", "With --judge pairrm: paper (scores over all K, then "
                                "σ(s_i − s_j)) or pairwise (one comparison per ordered pair).",
                                {"rank", "run"}, choices=("paper", "pairwise"), feeds=_JUDGED)
    pairrm_model: str = opt("llm-blender/PairRM-hf", "With --judge pairrm: the PairRM weights, a "
                            "hub id (read from the local Hugging Face cache first) or a "
                            "checkpoint directory (PairRM-hf's files or llm-blender/PairRM's).",
                            {"rank", "run"}, feeds=_JUDGED)


@dataclass
class ConvertSettings:
    """Which shards become pairs."""
    shards_dir: str = opt("generated", "Directory of generation shards to merge (convert) or "
                          "judge (rank).", {"convert", "rank"}, aliases=("input_dir",),
                          feeds=("convert", "rank"))
    num_fracs: int = opt(0, "Number of train fractions expected (0: whatever is there); the test "
                         "split is whatever was generated.", {"convert"}, feeds=("convert",))
    allow_missing_shards: bool = opt(False, "Go on when a fraction or a process shard is missing.",
                                     {"convert"}, feeds=("convert",))
    drop_identical: bool = opt(False, "SPIN: leave out pairs whose generated answer equals the "
                               "reference (their loss has no gradient; they only dilute the "
                               "batch); counted in the convert report.", {"convert", "run"},
                               feeds=("convert",))

    def check(self) -> None:
        need(self.num_fracs >= 0, "--num_fracs must be 0 (whatever is there) or positive.")


@dataclass
class EvaluationSettings:
    """What a model is compared against."""
    baseline: str = opt("", "A second model, or a saved eval.json of the same prompts, to "
                        "compare against: win rate and paired sign test.", {"evaluate"},
                        feeds=("evaluate",))
    eval_max_new_tokens: int = opt(
        0, "Most tokens per evaluated answer; 0 sizes it from the data: 1.5 times the "
        "longest reference answer, at least 32, at most --max_new_tokens.", {"evaluate", "run"},
        feeds=("evaluate",))
    reference_likelihood: bool = opt(
        True, "Also measure the log-likelihood of the reference answers (one more forward pass "
        "over every prompt and reference).", {"evaluate", "run"}, feeds=("evaluate",))
    lm_eval_tasks: str = opt(
        "", "lm-evaluation-harness tasks run on every evaluated model, comma-separated, by "
        "lm-eval's names (gsm8k,ifeval,...): scores with standard errors in eval.json and the "
        "report (pip install 'selfplay[lm-eval]').", {"evaluate", "run"}, feeds=("evaluate",))
    lm_eval_include: str = opt("", "A directory of lm-eval task YAMLs to add (your own tasks, "
                               "e.g. over a local file).", {"evaluate", "run"},
                               feeds=("evaluate",))
    lm_eval_limit: float = opt(0.0, "Documents per lm-eval task: 0 all, below 1 a fraction, "
                               "else a count (for quick looks: a limited score is not the "
                               "task's score).", {"evaluate", "run"}, feeds=("evaluate",))
    lm_eval_num_fewshot: int = opt(-1, "Few-shot examples for every lm-eval task (-1: each "
                                   "task's own setting).", {"evaluate", "run"},
                                   feeds=("evaluate",))

    def check(self) -> None:
        need(self.lm_eval_limit >= 0, "--lm_eval_limit must be 0 (all), a fraction below 1 or "
             "a count.")
        need(self.lm_eval_num_fewshot >= -1, "--lm_eval_num_fewshot must be -1 (each task's "
             "own) or a count.")
        need(not self.lm_eval_include or Path(self.lm_eval_include).is_dir(),
             f"--lm_eval_include {self.lm_eval_include} is not a directory (of lm-eval task "
             "YAMLs).")
