#!/usr/bin/env bash
# Everything this project checks on a GPU, in one call of a machine with no network:
#   bash bench/gpu_check.sh OUT_DIR [SECONDS [ARCHIVE]]
# 1. tests/test_gpu.py: training on the GPU against the CPU; the shipped FSDP and ZeRO-3
#    configs under `accelerate launch` against plain training; FSDP kill-and-resume; the loop
#    with --bf16;
# 2. bench/bench_generation.py (the official way against our HF engine), bench_pairrm.py,
#    bench_training.py (against TRL), each writing its JSON to OUT_DIR;
# 3. the fast test suite on the GPU machine, with what time is left.
# ONLY="gpu_tests training" runs only the steps named.
# What the machine lacks travels beside the repository: wheels in .whl/ (trl, datasets and
# theirs, pydantic and hjson for DeepSpeed), DeepSpeed's source archive in .gpu/, and the
# default model's config, tokenizer and chat template in .gpu/default/. Its weights are too
# large to travel: a randomly initialised model of the same architecture stands in, so the
# figures here are speed and agreement between ways, never accuracy, and a random model
# never ends its answers early (every answer runs to max_new_tokens).
set -u
cd "$(dirname "$0")/.."
OUT=${1:?output directory}
BUDGET=${2:-540}
ARCHIVE=${3:-}     # OUT_DIR packed into one file after every step (a device call returns few files)
mkdir -p "$OUT"
pack() { [ -z "$ARCHIVE" ] || tar czf "$ARCHIVE" -C "$OUT" .; }
T0=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - T0))); }
step() {  # step NAME CAP command...: at most CAP seconds and never past the budget
  local name=$1 cap=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  local t=$(left); ((t > cap)) && t=$cap
  if ((t < 15)); then echo "== $name: skipped, $(left) s left" | tee -a "$OUT/summary.txt"; return; fi
  local s=$(date +%s)
  timeout -k 5 "$t" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc $rc in $(($(date +%s) - s)) s (cap $t s)" | tee -a "$OUT/summary.txt"
  tail -n 4 "$OUT/$name.log" | tee -a "$OUT/summary.txt"
  pack
}

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export SELFPLAY_CACHE=/tmp/selfplay-cache SELFPLAY_ENGINE=hf
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
  .whl/*.whl > "$OUT/install.log" 2>&1
export PYTHONPATH=$PWD/src:/tmp/site
# DeepSpeed builds no kernels at install (its ops compile on first use): seconds.
(DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation \
  --target /tmp/site .gpu/deepspeed-*.tar.gz > "$OUT/deepspeed_install.log" 2>&1) &
DS=$!
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  nproc; python3 -c "import sys, torch, transformers, accelerate, peft, trl, datasets
print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'transformers', transformers.__version__, 'accelerate', accelerate.__version__,
      'peft', peft.__version__, 'trl', trl.__version__, 'datasets', datasets.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" | tee -a "$OUT/summary.txt"
pack

# The default model's architecture with random weights, where `--model default` finds it.
python3 - <<'EOF' >> "$OUT/env.txt" 2>&1
import os, shutil, torch
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
d = Path(os.environ["SELFPLAY_CACHE"]) / "models" / "SmolLM2-135M-Instruct"
shutil.copytree(".gpu/default", d, dirs_exist_ok=True)
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(d)).save_pretrained(d)
print("random default model in", d)
EOF
wait $DS; python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)" \
  >> "$OUT/summary.txt" 2>&1

step gpu_tests 240 python3 -m pytest -q -rA -p no:cacheprovider tests/test_gpu.py
step generation 100 python3 bench/bench_generation.py --prompts 256 --max_new_tokens 128 \
  --no_vllm --json "$OUT/generation_gpu.json"
step pairrm 50 python3 bench/bench_pairrm.py --prompts 16 --k 5 --repeats 3 \
  --json "$OUT/pairrm_gpu.json"
step training 130 python3 bench/bench_training.py --pairs "${PAIRS:-64}" --batch 8 \
  --json "$OUT/training_gpu.json"
step suite 600 python3 -m pytest -q -rf -p no:cacheprovider -n 8 \
  -m "not slow and not real_model and not vllm and not gpu" tests
echo "total $(($(date +%s) - T0)) s" | tee -a "$OUT/summary.txt"
pack
