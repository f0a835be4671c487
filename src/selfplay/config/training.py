"""The settings groups of training and of the loop: training, LoRA, run and job. Each group
checks its own values (`check`); checks across groups are Config's (schema.py)."""

from __future__ import annotations

from dataclasses import dataclass

from selfplay.config.options import PAIR_CMDS, TRAIN_CMDS, TRAINING_STAGES, need, opt
from selfplay.losses import KL_TYPES, LOSSES
from selfplay.tracking import parse_report_to

# What --method sppo and dpo change, for keys the recipe and command line leave unset: the
# SPPO paper's sampling (K = 5, temperature 0.7, top_p 0.9), the loss, and the data (each
# iteration its own, as RLHFlow's iterative DPO too); under `selfplay run`, also the sizing of
# the embedded default run: K samples cost K generations, so fewer prompts fit in its 30
# minutes (docs/sppo-default-run.md).
_SAMPLING = {"num_samples": 5, "temperature": 0.7, "top_p": 0.9, "data_policy": "current"}
METHOD_DEFAULTS = {"sppo": {**_SAMPLING, "loss_type": "sppo"},
                   "dpo": {**_SAMPLING, "loss_type": "sigmoid"}}
RUN_METHOD_DEFAULTS = {m: {"output_dir": f"runs/{m}", "max_prompts": 64, "learning_rate": 5e-6}
                       for m in ("sppo", "dpo")}
# The methods whose iterations sample K answers per prompt and rank them with a judge.
RANKED_METHODS = ("sppo", "dpo")
# Inside `selfplay run` the SFT stage and the control arm train with sft_learning_rate,
# AdamW and SFT's loss: these keys feed the self-play training alone.
_PAIR_TRAINING = ("train",)
# The control arm matches the self-play iteration's epochs and updates; the SFT stage has
# its own (sft_epochs).
_ITERATION_TRAINING = ("train", "control")


@dataclass
class TrainingSettings:
    """The optimizer, the loss and the schedule (the official recipe's keys)."""
    per_device_train_batch_size: int = opt(8, "Pairs (sft: examples) per process per step (the "
                                           "paper: 8 on each of 8 GPUs).", TRAIN_CMDS,
                                           command_defaults={"run": 4}, feeds=TRAINING_STAGES)
    gradient_accumulation_steps: int = opt(1, "Steps whose gradients add up to one update.",
                                           TRAIN_CMDS, feeds=TRAINING_STAGES)
    num_train_epochs: float = opt(2.0, "Passes over the pairs (the paper: 2 per iteration) or, "
                                  "for sft, the examples.", TRAIN_CMDS,
                                  command_defaults={"run": 1.0, "sft": 1.0},
                                  feeds=_ITERATION_TRAINING)
    max_steps: int = opt(0, "Stop after this many optimizer updates (0: by num_train_epochs).",
                         TRAIN_CMDS, feeds=_ITERATION_TRAINING)
    learning_rate: float = opt(5e-6, "Peak learning rate (the paper: 5e-7 for zephyr-7b; the "
                               "defaults are sized for the embedded 135M model, see "
                               "docs/default-run.md; sft: 2e-5, as the alignment handbook's "
                               "zephyr SFT).", TRAIN_CMDS,
                               command_defaults={"run": 2e-6, "sft": 2e-5}, feeds=_PAIR_TRAINING)
    lr_scheduler_type: str = opt("linear", "Schedule after warmup.", TRAIN_CMDS,
                                 choices=("linear", "cosine", "constant"), feeds=TRAINING_STAGES)
    warmup_ratio: float = opt(0.1, "Share of the updates spent warming up linearly.", TRAIN_CMDS,
                              feeds=TRAINING_STAGES)
    optim: str = opt("rmsprop", "Optimizer: rmsprop (the SPIN paper) or adamw (sft's default).",
                     TRAIN_CMDS, choices=("rmsprop", "adamw"), command_defaults={"sft": "adamw"},
                     feeds=_PAIR_TRAINING)
    weight_decay: float = opt(0.0, "Weight decay.", TRAIN_CMDS, feeds=TRAINING_STAGES)
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0: none).", TRAIN_CMDS,
                               feeds=TRAINING_STAGES)
    beta: float = opt(0.1, "β of the loss: how far θ may move from the reference (the paper: "
                      "0.1, and 5.0 in the last iteration).", PAIR_CMDS, feeds=_PAIR_TRAINING)
    loss_type: str = opt("sigmoid", "sigmoid: SPIN's logistic loss (TRL's name); hinge: "
                         "max(0, 1 - β·margin); sppo (soft), sppo_single, sppo_hard: SPPO's, "
                         "on pairs with win probabilities.", PAIR_CMDS,
                         choices=tuple(LOSSES), feeds=_PAIR_TRAINING)
    ref_mixture: float = opt(0.0, "Regularized SPIN (α-SPIN): the reference as the geometric "
                             "mixture (1 − α)·log θ_t + α·log θ_0 (0: θ_t, SPIN; 1: θ_0); needs "
                             "a pair loss (sigmoid, hinge).", PAIR_CMDS, feeds=_PAIR_TRAINING)
    kl_coef: float = opt(0.0, "Weight of a KL term toward θ_0 (regularized SPIN and SPPO, as "
                         "RSPO estimates it on θ_t's samples; 0: none).", PAIR_CMDS,
                         feeds=_PAIR_TRAINING)
    kl_type: str = opt("both", "With --kl_coef: forward (KL(θ_0‖θ), importance-weighted), "
                       "reverse (KL(θ‖θ_0), the squared log-ratio) or both, summed.", PAIR_CMDS,
                       choices=KL_TYPES, feeds=_PAIR_TRAINING)
    base_model: str = opt("", "θ_0, the model --ref_mixture and --kl_coef regularize toward "
                          "(`selfplay run` sets it to its θ_0).", {"train"}, feeds=_PAIR_TRAINING)
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.",
                                       TRAIN_CMDS, resumable=True)
    fsdp: bool = opt(False, "Shard the weights, gradients and optimizer state over the launched "
                     "processes (FSDP2: each decoder layer, then the whole model), on CPU (gloo) "
                     "and GPU (NCCL) alike; an accelerate FSDP config (recipes/accelerate/"
                     "fsdp.yaml) asks for the same. Full fine-tuning and LoRA.", TRAIN_CMDS,
                     feeds=TRAINING_STAGES)
    fsdp_reshard_after_forward: bool = opt(
        True, "With --fsdp: free each layer's gathered weights after its forward and gather "
        "them again in backward (less memory, more communication; false: ZeRO-2's trade).",
        TRAIN_CMDS, resumable=True)
    fsdp_cpu_offload: bool = opt(False, "With --fsdp: keep the sharded weights, gradients and "
                                 "optimizer state in CPU memory between uses (GPU memory for "
                                 "larger models, at the cost of copies).", TRAIN_CMDS,
                                 resumable=True)
    fsdp_bf16_params: bool = opt(
        False, "With --fsdp on GPUs: gather and compute with bfloat16 weights, reducing "
        "gradients in float32 (FSDP2's mixed-precision policy); the reference log-probs are "
        "then computed by the same policy before training.", TRAIN_CMDS, feeds=TRAINING_STAGES)
    group_by_length: bool = opt(True, "Batch pairs of similar length together (seeded), so "
                                "that less compute goes to padding.", TRAIN_CMDS,
                                feeds=TRAINING_STAGES)
    logging_steps: int = opt(10, "Log averaged metrics every N updates.", TRAIN_CMDS,
                             resumable=True)
    report_to: str = opt("tensorboard", "Where training metrics go besides train_log.jsonl: "
                         "tensorboard, wandb, both (comma-separated) or none. With wandb, "
                         "`selfplay run` also sends each model's accuracy and its report.",
                         TRAIN_CMDS, resumable=True)
    wandb_project: str = opt("selfplay", "The W&B project (--report_to wandb); a run's "
                             "trainings and report share a W&B group named after its "
                             "output_dir.", TRAIN_CMDS, resumable=True)
    save_steps: int = opt(0, "Save a resumable checkpoint every N updates (0: only the final "
                          "model).", TRAIN_CMDS, resumable=True)
    resume: bool = opt(False, "Continue from the last checkpoint in output_dir.",
                       {"sft", "train"}, resumable=True)
    allow_large_lr: bool = opt(False, "Train at a learning rate above 1e-2 (full fine-tuning) "
                               "or 1e-1 (LoRA), which is almost always a typo (1e5 for 1e-5).",
                               TRAIN_CMDS, resumable=True)
    reference_model: str = opt("", "The reference π_ref when it is not the starting model "
                               "(empty: the starting model, θ_t).", {"train"},
                               feeds=_PAIR_TRAINING)

    def check(self) -> None:
        need(self.per_device_train_batch_size > 0,
             "--per_device_train_batch_size must be positive.")
        need(self.gradient_accumulation_steps > 0,
             "--gradient_accumulation_steps must be positive.")
        need(self.num_train_epochs > 0 or self.max_steps > 0,
             "--num_train_epochs must be positive (or set --max_steps).")
        need(self.learning_rate > 0, "--learning_rate must be positive.")
        need(self.max_steps >= 0, "--max_steps must be 0 (by --num_train_epochs) or positive.")
        need(self.max_grad_norm >= 0 and self.weight_decay >= 0,
             "--max_grad_norm and --weight_decay must be 0 or positive.")
        need(0 <= self.warmup_ratio < 1, "--warmup_ratio must lie in [0, 1).")
        need(self.beta > 0, "--beta must be positive.")
        need(0 <= self.ref_mixture <= 1, "--ref_mixture must lie in [0, 1].")
        need(self.kl_coef >= 0, "--kl_coef must be 0 (none) or positive.")
        need(self.ref_mixture == 0 or self.loss_type in ("sigmoid", "hinge"),
             f"--ref_mixture needs a loss of answer differences (sigmoid, hinge), where the "
             f"mixture's normalizer cancels; --loss_type {self.loss_type} regresses each "
             "answer's log-ratio on its own.")
        need(self.logging_steps > 0, "--logging_steps must be positive.")
        parse_report_to(self.report_to)
        need(self.save_steps >= 0, "--save_steps must be 0 (final model only) or positive.")


@dataclass
class LoraSettings:
    """What is trained: all weights, a LoRA adapter, or an adapter on a 4-bit base (QLoRA)."""
    use_peft: bool = opt(False, "Train a LoRA adapter instead of all weights.", TRAIN_CMDS,
                         feeds=TRAINING_STAGES)
    lora_r: int = opt(16, "LoRA rank: the inner dimension of each adapter.", TRAIN_CMDS,
                      feeds=TRAINING_STAGES)
    lora_alpha: int = opt(32, "LoRA alpha (scale = alpha / r).", TRAIN_CMDS,
                          feeds=TRAINING_STAGES)
    lora_dropout: float = opt(0.05, "Dropout on the LoRA input.", TRAIN_CMDS,
                              feeds=TRAINING_STAGES)
    lora_target_modules: str = opt("all-linear", "Modules that get adapters: all-linear, or "
                                   "comma-separated names (q_proj,v_proj).", TRAIN_CMDS,
                                   feeds=TRAINING_STAGES)
    load_in_4bit: bool = opt(False, "QLoRA: load the base weights in 4-bit NF4 with double "
                             "quantization (bitsandbytes); needs --use_peft.", TRAIN_CMDS,
                             feeds=TRAINING_STAGES)
    merge_adapter: bool = opt(True, "With LoRA, save the merged model (what the next iteration "
                              "generates from); false saves the adapter alone.", TRAIN_CMDS,
                              feeds=TRAINING_STAGES)

    def check(self) -> None:
        need(self.lora_r > 0 and self.lora_alpha > 0, "--lora_r and --lora_alpha must be positive.")
        need(0 <= self.lora_dropout < 1, "--lora_dropout must lie in [0, 1).")
        need(not self.load_in_4bit or self.use_peft,
             "--load_in_4bit (QLoRA) trains an adapter on frozen 4-bit weights, so it needs "
             "--use_peft; 4-bit weights themselves cannot be trained.")


@dataclass
class RunSettings:
    """The loop of `selfplay run`."""
    # The iterations; their evaluations follow their new models (and the judge's win rate
    # follows rank).
    method: str = opt("spin", "Self-play method: spin (pairs against the dataset's answers), "
                      "sppo (K samples judged against each other, each answer's log-ratio "
                      "regressed toward its win rate) or dpo (iterative DPO: the judge's best of "
                      "the K samples against its worst, the DPO loss against θ_t). sppo changes "
                      "the defaults of " + ", ".join(
                          f"{k} ({v})" for k, v in {**METHOD_DEFAULTS["sppo"],
                                                    **RUN_METHOD_DEFAULTS["sppo"]}.items())
                      + "; dpo the same, with loss_type (sigmoid); sft is the control arm: each "
                      "iteration continues supervised fine-tuning on the same prompts with as "
                      "many updates as a SPIN iteration.", {"run"},
                      choices=("spin", *RANKED_METHODS, "sft"),
                      feeds=("generate", "rank", "convert", "train", "control"))
    num_iterations: int = opt(2, "Iterations t = 0 .. T-1; iteration t trains θ_{t+1} from θ_t.",
                              {"run"}, feeds=("loop",))
    sft_epochs: float = opt(0.0, "Epochs of supervised fine-tuning on the train split before "
                            "iteration 0, which makes θ_0 (the paper starts SPIN from a model "
                            "fine-tuned on its data); 0: none, θ_0 is the model given.", {"run"},
                            feeds=("sft",))
    sft_learning_rate: float = opt(2e-5, "Learning rate of that SFT stage (AdamW), and of the "
                                   "control arm's iterations (--method sft).", {"run"},
                                   feeds=("sft", "control"))
    sft_max_prompts: int = opt(0, "Examples of the train split the SFT stage uses (the first "
                               "N; 0: all).", {"run"}, feeds=("sft",))
    data_policy: str = opt(
        "previous_and_current", "Pairs iteration t trains on: current (its own), or "
        "previous_and_current (iteration t-1's and t's, the paper's choice from iteration 1 on).",
        {"run"}, choices=("current", "previous_and_current"), feeds=("train", "control"))
    fresh_prompts: bool = opt(False, "Each iteration reads the next --max_prompts prompts "
                              "(iteration t: from skip_prompts + t·max_prompts) instead of the "
                              "same ones; the control arm reads what SPIN reads.", {"run"},
                              feeds=("generate", "control"))
    start_from: str = opt("previous", "Weights iteration t starts from: previous (θ_t, the "
                          "paper) or sft (the original model; θ_t stays the reference).", {"run"},
                          choices=("previous", "sft"), feeds=("train",))
    from_iteration: int = opt(0, "Start at iteration k, with --model as θ_k (a checkpoint of "
                              "iteration k-1).", {"run"}, resumable=True)
    force: bool = opt(False, "Resume a run directory even though the recipe changed.", {"run"},
                      resumable=True)
    push_to_hub: str = opt("", "Push the final model (with --select_on, the model chosen) to "
                           "this hub repository (nothing is pushed unless set).", {"run"},
                           resumable=True)
    opponent_history: int = opt(1, "Regularized SPIN (fictitious play): each pair's generated "
                                "answer is drawn, per prompt and seeded, from the last h "
                                "iterates' generations instead of θ_t's alone (1: SPIN).",
                                {"run"}, feeds=("convert",))
    select_on: str = opt("", "validation: evaluate every model on the validation split, keep "
                         "the best (best/), and read the test split once, for it and θ_0.",
                         {"run"}, choices=("", "validation"), feeds=("evaluate", "loop"))
    patience: int = opt(0, "With --select_on: stop after this many iterations in a row bring "
                        "no gain on validation over the best so far (0: run them all).",
                        {"run"}, feeds=("loop", "best"))
    match_steps_of: str = opt("", "With --method sft: a SPIN run directory whose iterations set "
                              "this arm's updates per iteration (--drop_identical can leave SPIN "
                              "fewer pairs than prompts).", {"run"}, feeds=("control",))
    # Each entry's keys feed their own iteration's stages (effects.affected_stages).
    iterations: list = opt(None, "Per-iteration overrides, a list of mappings (in a recipe, or "
                           "a YAML list on the command line), e.g. [{}, {}, {learning_rate: "
                           "1.0e-7}, {beta: 5.0}].", {"run"},
                           default_factory=list, feeds=("loop",))

    def check(self) -> None:
        need(self.sft_epochs >= 0 and self.sft_learning_rate > 0 and self.sft_max_prompts >= 0,
             "--sft_epochs and --sft_max_prompts must be 0 or positive, --sft_learning_rate "
             "positive.")
        need(self.opponent_history >= 1, "--opponent_history must be at least 1 (θ_t alone).")
        need(self.opponent_history == 1 or self.method == "spin",
             "--opponent_history draws SPIN's generated answers from past iterates; it needs "
             "--method spin.")
        need(self.opponent_history == 1 or not self.fresh_prompts,
             "--opponent_history draws from earlier iterates' answers to the same prompts, "
             "and with --fresh_prompts every iteration reads new ones: choose one of the two.")
        need(self.patience >= 0, "--patience must be 0 (run every iteration) or positive.")
        need(not self.patience or self.select_on, "--patience stops on validation; it needs "
             "--select_on validation.")
        need(not self.match_steps_of or self.method == "sft",
             "--match_steps_of sets the updates of the SFT control arm; it needs --method sft.")


@dataclass
class JobSettings:
    """Where a command writes, whether it redoes finished work, and its seed."""
    # A run directory moved or copied resumes where it is.
    output_dir: str = opt("generated", "Where the command writes its output.",
                          {"generate", "score", "convert", "evaluate", "rank", "sft", "train",
                           "run", "compare"},
                          command_defaults={"convert": "pairs", "score": "scored",
                                            "compare": "compare",
                                            "evaluate": "eval", "train": "checkpoints/spin",
                                            "sft": "checkpoints/sft", "run": "runs/spin",
                                            "rank": "ranked"}, resumable=True)
    overwrite: bool = opt(False, "Redo finished work (shards, a trained model) instead of "
                          "skipping it; evaluate, tasks: replace what is there.",
                          {"generate", "score", "sft", "train", "rank", "evaluate", "tasks"},
                          resumable=True)
    seed: int = opt(42, "Random seed of sampling, and of data order and initialisation in "
                    "training.", {"generate", "sft", "train", "run"},
                    feeds=("sft", "generate", "train", "control"))
