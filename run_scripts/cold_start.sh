#!/usr/bin/env bash
# Off-policy cold start before OPD (python -m opsd.cold_start): the teacher answers the prompts, the student is
# fine-tuned on those answers with TRL's SFTTrainer, and the result is a plain checkpoint to start OPD from.
#
#   MODEL_PATH=/models/Qwen3-1.7B TEACHER_MODEL_PATH=/models/Qwen3-8B DATA_DIR=data/dapo \
#     bash run_scripts/cold_start.sh [extra python -m opsd.cold_start flags]
#   then: MODEL_PATH=$COLD_START_DIR TEACHER_MODEL_PATH=... bash run_scripts/train_opd.sh
#
# Variables, default in brackets (paths you set are relative to the directory you run the script from; on CPU,
# OMP_NUM_THREADS defaults to the idle cores (cores - load average, >= 1), said on stderr):
#   MODEL_PATH                 the student model directory (required)
#   TEACHER_MODEL_PATH         the teacher model directory (required)
#   DATA_DIR                   [data]
#   COLD_START_FILE            [TRAIN_FILE, else $DATA_DIR/train.jsonl] the prompts the teacher answers
#   COLD_START_DIR             [runs/cold-start-<time>] the checkpoint written
#   COLD_START_ROLLOUTS        [1] teacher responses per prompt
#   COLD_START_MAX_NEW_TOKENS  [MAX_RESPONSE_LENGTH, else 1024]
#   COLD_START_TEMPERATURE     [0.7]
#   COLD_START_LIMIT           [all] first N prompts
#   COLD_START_FILTER          [0] 1 = keep only responses with reward > 0.5 (needs answers)
#   COLD_START_LORA            [0] 1 = LoRA fine-tuning, merged at the end
#   COLD_START_LR              [1e-5]
#   COLD_START_EPOCHS          [1]
#   COLD_START_MAX_STEPS       [-1 = epochs]
#   COLD_START_BATCH_SIZE      [4]
#   COLD_START_GRAD_ACC        [1]
#   COLD_START_BACKEND         [hf] hf | vllm
#   ENABLE_THINKING            [unset]
#   DTYPE                      [auto]
#   SEED                       [42]
#   COLD_START_ARGS            [unset] more python -m opsd.cold_start flags (e.g. --keep_truncated)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
opsd_help "${BASH_SOURCE[0]}" "$@"
opsd_abspath MODEL_PATH TEACHER_MODEL_PATH DATA_DIR TRAIN_FILE COLD_START_FILE COLD_START_DIR VENV
cd "$OPSD_ROOT"
opsd_python
PY=$PYTHON

: "${MODEL_PATH:?set MODEL_PATH to the local student model directory}"
: "${TEACHER_MODEL_PATH:?set TEACHER_MODEL_PATH to the local teacher model directory}"
DATA_DIR=${DATA_DIR:-data}
COLD_START_FILE=${COLD_START_FILE:-${TRAIN_FILE:-$DATA_DIR/train.jsonl}}
COLD_START_DIR=${COLD_START_DIR:-runs/cold-start-$(date +%Y%m%d-%H%M%S)}
args=(
  --teacher "$TEACHER_MODEL_PATH"
  --student "$MODEL_PATH"
  --prompts "$COLD_START_FILE"
  --output_dir "$COLD_START_DIR"
  --rollouts "${COLD_START_ROLLOUTS:-1}"
  --max_new_tokens "${COLD_START_MAX_NEW_TOKENS:-${MAX_RESPONSE_LENGTH:-1024}}"
  --temperature "${COLD_START_TEMPERATURE:-0.7}"
  --backend "${COLD_START_BACKEND:-hf}"
  --learning_rate "${COLD_START_LR:-1e-5}"
  --num_train_epochs "${COLD_START_EPOCHS:-1}"
  --max_steps "${COLD_START_MAX_STEPS:--1}"
  --per_device_train_batch_size "${COLD_START_BATCH_SIZE:-4}"
  --gradient_accumulation_steps "${COLD_START_GRAD_ACC:-1}"
  --seed "${SEED:-42}"
)
[ -n "${COLD_START_LIMIT:-}" ] && args+=(--limit "$COLD_START_LIMIT")
[ "$(opsd_bool COLD_START_FILTER "${COLD_START_FILTER:-0}")" = true ] && args+=(--filter_reward --reward_function "${REWARD_FUNCTION:-math}")
[ "$(opsd_bool COLD_START_LORA "${COLD_START_LORA:-0}")" = true ] && args+=(--lora)
[ -n "${ENABLE_THINKING:-}" ] && args+=(--enable_thinking "$ENABLE_THINKING")
[ -n "${DTYPE:-}" ] && args+=(--dtype "$DTYPE")
# shellcheck disable=SC2206
[ -n "${COLD_START_ARGS:-}" ] && args+=(${COLD_START_ARGS})
args+=("$@")
echo "[cold_start] $PY -m opsd.cold_start ${args[*]}"
if [ "$(opsd_gpu_count)" -eq 0 ]; then opsd_cpu_threads 1; fi
"$PY" -m opsd.cold_start "${args[@]}"
