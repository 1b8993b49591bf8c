#!/usr/bin/env bash
# One prepared GPU check (python -m opsd.gpu_check): random-initialised Qwen3-1.7B student with Qwen3-4B and
# Qwen3-8B teachers built from opsd.plan's architecture table (no weights are read or downloaded); full-token and
# selective (top 10%) loss steps, full fine-tuning and LoRA, teacher in bf16 and in 4-bit (bitsandbytes; skipped
# when not installed). Prints step time, CUDA peak memory and the planner's estimate per variant; writes JSON.
#
#   bash run_scripts/gpu_check.sh                          # all variants (about 16 model builds; minutes on an H100)
#   bash run_scripts/gpu_check.sh --only lora --steps 2    # a subset
#   bash run_scripts/gpu_check.sh --dry-run                # planner estimates only, no GPU needed
#   bash run_scripts/gpu_check.sh --tiny                   # tiny configs on CPU (what the tests run)
#
# Extra arguments go to opsd.gpu_check (--student, --teachers, --prompt_length, --response_length, --micro_batch,
# --steps, --keep, --no_4bit, --only).
# Variables:
#   OUT                  output folder (default runs/gpu_check-<time>)
#   GPU_CHECK_TIMEOUT    seconds (default 540): the run is stopped and its partial JSON kept
#   VENV, PYTHON_BIN     interpreter, as in train_opd.sh
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
opsd_help "${BASH_SOURCE[0]}" "$@"
opsd_abspath OUT VENV
cd "$OPSD_ROOT"
opsd_python
PY=$PYTHON
OUT=${OUT:-runs/gpu_check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
opsd_gpu_info "$OUT/nvidia-smi.csv"
case " $* " in *" --dry-run "*|*" --dry_run "*) versions=0 ;; *) versions=1 ;; esac
[ "$versions" = 1 ] && "$PY" - > "$OUT/versions.txt" 2>&1 <<'PY' || true
import importlib
for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "triton"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as err:  # report, do not fail
        print(name, "missing:", type(err).__name__)
PY
echo "[gpu_check] writing to $OUT"
exec timeout --signal=INT "${GPU_CHECK_TIMEOUT:-540}" "$PY" -m opsd.gpu_check --out "$OUT/gpu_check.json" "$@"
