#!/usr/bin/env bash
# The SPIN-after-SFT study of docs/sft-study.md: every figure on that page comes from here.
#
#   bash scripts/spin_study.sh all        # every step below, in order (about 5 h on 2 cores)
#   bash scripts/spin_study.sh sft        # one step; later steps reuse earlier outputs
#
# Recipes are compared on the suite's validation split (300 prompts held out of train, never
# test); one iteration each, from the same SFT start, on the same 256 prompts the SFT stage
# did not see, paired against the SFT start on the same validation prompts (sign test). The
# chosen recipe (recipes/spin-smollm2-run.yaml) then runs once on test, with its control arm.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/study}
RUN=${RUN:-runs/spin-sft}
CONTROL=${CONTROL:-runs/sft-control}
SP=${SELFPLAY:-selfplay}
SFT=$OUT/sft
PROMPTS=(--skip_prompts 1000 --max_prompts 256)

sft() {
  $SP sft --max_prompts 1000 --per_device_train_batch_size 8 --output_dir "$SFT"
  $SP evaluate --model "$SFT" --split validation --output_dir "$OUT/sft-val"
}

pairs() {  # pairs NAME [generate options]: θ_0's answers to the 256 prompts, as SPIN pairs
  local name=$1; shift
  $SP generate --model "$SFT" "${PROMPTS[@]}" "$@" --output_dir "$OUT/gen-$name"
  $SP convert --input_dir "$OUT/gen-$name" --drop_identical --output_dir "$OUT/pairs-$name"
}

variant() {  # variant NAME PAIRS [train options]: one SPIN iteration, judged on validation
  local name=$1 data=$2; shift 2
  $SP train --model "$SFT" --dataset "$OUT/pairs-$data" --optim adamw "$@" \
    --output_dir "$OUT/$name"
  $SP evaluate --model "$OUT/$name" --split validation --baseline "$SFT-val/eval.json" \
    --output_dir "$OUT/$name-val"
}

sft_epochs() {  # a θ_0 made by 2 SFT epochs instead of 1, then the chosen recipe's iteration
  SFT=$OUT/sft-e2
  $SP sft --max_prompts 1000 --per_device_train_batch_size 8 --num_train_epochs 2 \
    --output_dir "$SFT"
  $SP evaluate --model "$SFT" --split validation --baseline "$OUT/sft-val/eval.json" \
    --output_dir "$SFT-val"
  pairs greedy-e2
  variant e2-b5-lr2e-6 greedy-e2 --beta 5 --learning_rate 2e-6 --num_train_epochs 2
}

plateau() {  # the paper's setup: θ_0 from 2 SFT epochs over every prompt the iterations then
             # use (1,768), SPIN on those seen prompts and its control arm, on validation
  local p=$OUT/plateau
  $SP run recipes/spin-smollm2-run.yaml --sft_epochs 2 --sft_max_prompts 1768 \
    --eval_split validation --output_dir "$p-spin"
  $SP run recipes/spin-smollm2-run.yaml --method sft --model "$p-spin/sft/model" \
    --sft_epochs 0 --match_steps_of "$p-spin" --eval_split validation --output_dir "$p-control"
  $SP compare "$p-spin" "$p-control" --output_dir "$p-compare"
}

valrun() {  # valrun NAME [run options]: 3 SPIN iterations from θ_0, judged on validation
  local name=$1; shift
  $SP run recipes/spin-smollm2-run.yaml --model "$SFT" --sft_epochs 0 --eval_split validation \
    --output_dir "$OUT/val-$name" "$@"
}

main_run() {  # the default run (the README's main job), then the SFT control arm from its θ_0
  $SP run recipes/spin-smollm2-run.yaml --output_dir "$RUN"
  $SP run recipes/spin-smollm2-run.yaml --method sft --model "$RUN/sft/model" --sft_epochs 0 \
    --match_steps_of "$RUN" --output_dir "$CONTROL"
  $SP compare "$RUN" "$CONTROL" --output_dir "$OUT/compare"
}

# name, pairs, train options: every recipe the study page reports
VARIANTS=(
  "b5-lr2e-6   greedy --beta 5 --learning_rate 2e-6 --num_train_epochs 2"
  "b5-lr1e-5   greedy --beta 5 --learning_rate 1e-5 --num_train_epochs 2"
  "b1-lr2e-6   greedy --beta 1 --learning_rate 2e-6 --num_train_epochs 2"
  "hinge-b5-lr2e-6 greedy --loss_type hinge --beta 5 --learning_rate 2e-6 --num_train_epochs 2"
)

# name, run options: 3-iteration runs from θ_0 that the study page reports, on validation
RUNS=(
  "fresh256-e2 --fresh_prompts true"
  "fresh512-e1 --fresh_prompts true --max_prompts 512 --num_train_epochs 1 --tasks_train_size 2600"
  "fresh256-t1 --fresh_prompts true --temperature 1.0"
  "fresh256-pc --fresh_prompts true --data_policy previous_and_current"
  'fresh256-lrfall --fresh_prompts true --iterations [{},{"learning_rate":1.0e-6},{"learning_rate":5.0e-7}]'
  'fresh256-lrconst --fresh_prompts true --lr_scheduler_type constant --iterations [{},{"learning_rate":1.0e-6},{"learning_rate":5.0e-7}]'
)

pick() {  # pick FN NAME ENTRY...: FN with the words of the entry whose first word is NAME
  local fn=$1 name=$2; shift 2
  for v in "$@"; do
    read -r -a a <<< "$v"
    if [[ ${a[0]} == "$name" ]]; then "$fn" "${a[@]}"; return; fi
  done
  echo "unknown $fn $name" >&2; exit 2
}

step=${1:-all}
case $step in
  sft) sft ;;
  pairs) pairs greedy ;;
  variant) pick variant "$2" "${VARIANTS[@]}" ;;      # variant NAME: one of VARIANTS
  variants) for v in "${VARIANTS[@]}"; do read -r -a a <<< "$v"; variant "${a[@]}"; done ;;
  sft-epochs) sft_epochs ;;
  plateau) plateau ;;
  run) pick valrun "$2" "${RUNS[@]}" ;;                # run NAME: one of RUNS
  runs) for v in "${RUNS[@]}"; do read -r -a a <<< "$v"; valrun "${a[@]}"; done ;;
  main) main_run ;;
  all) "$0" sft; "$0" pairs; "$0" variants; "$0" sft-epochs; "$0" runs; "$0" plateau
       "$0" main ;;
  *) echo "unknown step $step: sft, pairs, variant NAME, variants, sft-epochs, run NAME, runs," \
       "plateau, main or all" >&2
     exit 2 ;;
esac
