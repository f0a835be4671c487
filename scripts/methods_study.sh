#!/usr/bin/env bash
# Every self-play arm from one θ_0, on the embedded default (docs/methods.md: every figure
# there comes from here).
#
#   bash scripts/methods_study.sh all       # θ_0, every arm, then compare
#   bash scripts/methods_study.sh theta0    # one step; later steps reuse earlier outputs
#   bash scripts/methods_study.sh arm NAME  # one arm of ARMS below
#   bash scripts/methods_study.sh compare   # the table and plot of the arms finished so far
#   ITERATIONS=4 bash scripts/methods_study.sh arm NAME   # the second pass: 4 iterations, in
#                                           # $OUT/NAME-4 (nothing in an iteration reads the
#                                           # count: a copy of the 2-iteration run extended with
#                                           # --num_iterations 4 (FORCE=1) computes the same
#                                           # stages)
#
# θ_0 is the default run's SFT stage (SmolLM2-135M-Instruct, 1 epoch over the first 1,000
# train examples, AdamW, lr 2e-5, batch 8). Every arm starts from it, reads the same fresh
# prompts (train prompts 1000 + 128t onwards for iteration t), takes the same number of
# optimizer updates per iteration (--max_steps), evaluates every model on the suite's 300
# validation prompts and keeps the best (--select_on validation); the test split (500 prompts)
# is read once per arm, by θ_0 and the chosen model. Each arm is a resumable run directory:
# a killed study resumes where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/methods}
SP=${SELFPLAY:-selfplay}
ITERATIONS=${ITERATIONS:-2}
SUFFIX=$([ "$ITERATIONS" = 2 ] || echo "-$ITERATIONS")
THETA0=$OUT/theta0

# What every arm shares: θ_0, prompts, updates, selection.
COMMON=(--model "$THETA0" --sft_epochs 0 --dataset builtin:tasks --skip_prompts 1000
        --max_prompts 128 --fresh_prompts true --num_iterations "$ITERATIONS" --data_policy current
        --max_steps 16 --per_device_train_batch_size 8 --optim adamw --warmup_ratio 0.1
        --max_new_tokens 128 --reference_likelihood false --select_on validation --seed 42)
SAMPLED=(--num_samples 5 --temperature 0.7 --top_p 0.9 --judge rule)

# name, run options. The SPIN recipe is docs/sft-study.md's (chosen there on validation);
# SPPO's is the default SPPO run's; the others take their method's closest recipe untuned.
# Regularized SPIN is α-SPIN's reference mixture alone: fictitious play (--opponent_history)
# draws from earlier answers to the same prompts, which fresh prompts do not have. dpo-b0.1 is
# a second DPO recipe (DPO's usual β, SPPO's learning rate), to choose between the two on
# validation.
ARMS=(
  "spin      --method spin --beta 5 --learning_rate 2e-6 --drop_identical true"
  "sft       --method sft"
  "dpo       --method dpo --beta 5 --learning_rate 2e-6 ${SAMPLED[*]}"
  "sppo      --method sppo --loss_type sppo --beta 0.1 --learning_rate 5e-6 ${SAMPLED[*]}"
  "rspo      --method sppo --loss_type sppo --beta 0.1 --learning_rate 5e-6 --kl_coef 0.1 --kl_type both ${SAMPLED[*]}"
  "spin-reg  --method spin --beta 5 --learning_rate 2e-6 --drop_identical true --ref_mixture 0.5"
  "dpo-b0.1  --method dpo --beta 0.1 --learning_rate 5e-6 ${SAMPLED[*]}"
)

theta0() {
  $SP sft --max_prompts 1000 --per_device_train_batch_size 8 --output_dir "$THETA0"
}

arm() {  # arm NAME [run options]
  local name=$1; shift
  /usr/bin/time -f "$name$SUFFIX: %e s wall" $SP run "${COMMON[@]}" "$@" ${FORCE:+--force} \
    --output_dir "$OUT/$name$SUFFIX"
}

pick() {  # pick NAME: the arm of ARMS whose first word is NAME
  for v in "${ARMS[@]}"; do
    read -r -a a <<< "$v"
    if [[ ${a[0]} == "$1" ]]; then arm "${a[@]}"; return; fi
  done
  echo "unknown arm $1" >&2; exit 2
}

compare() {  # the arms finished so far, the control arm the reference of every difference
  local dirs=()
  for v in "${ARMS[@]}"; do
    read -r -a a <<< "$v"
    [ -f "$OUT/${a[0]}$SUFFIX/best/selection.json" ] && dirs+=("$OUT/${a[0]}$SUFFIX")
  done
  $SP compare "${dirs[@]}" --output_dir "$OUT/compare$SUFFIX"
}

case ${1:-all} in
  theta0) theta0 ;;
  arm) pick "$2" ;;
  compare) compare ;;
  all) [ -f "$THETA0/training_complete.json" ] || theta0
       for v in "${ARMS[@]}"; do read -r -a a <<< "$v"; arm "${a[@]}"; done
       compare ;;
  *) echo "unknown step $1: theta0, arm NAME, compare or all" >&2; exit 2 ;;
esac
