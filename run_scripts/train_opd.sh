#!/usr/bin/env bash
# Full-token on-policy distillation (the baseline), driven by upstream's environment variables.
#
#   MODEL_PATH=/models/Qwen3-1.7B TEACHER_MODEL_PATH=/models/Qwen3-8B DATA_DIR=data/dapo \
#     bash run_scripts/train_opd.sh [extra python -m opsd.train flags]
#
# Variables (default): MODEL_PATH (required), TEACHER_MODEL_PATH (required), DATA_DIR (data) -> $DATA_DIR/train.jsonl
# unless TRAIN_FILE is set, OUTPUT_DIR (runs/opd-<time>), OPD_LOSS_TYPE (reverse_kl), OPD_JSD_BETA (0.5),
# OPD_CHUNK_SIZE (512), OPD_MAX_LENGTH (MAX_PROMPT_LENGTH+MAX_RESPONSE_LENGTH cap: truncates prompts so that
# prompt+response fits), OPD_REWARD_BETA (off), OPD_LOSS_NORMALIZATION (kept_tokens), LEARNING_RATE (1e-6),
# TRAIN_BATCH_SIZE (generation batch per optimizer step, 16), PPO_MICRO_BATCH_SIZE_PER_GPU (4), TOTAL_EPOCHS (1),
# MAX_STEPS (-1 = epochs), MAX_PROMPT_LENGTH (1024), MAX_RESPONSE_LENGTH (1024), ROLLOUT_N (1), ENABLE_THINKING
# (unset), TEMPERATURE (1.0), DTYPE (bfloat16 on GPU, float32 otherwise), SAVE_STEPS (200), SEED (42),
# NPROC (GPUs per node for accelerate launch; 1 = plain python), ACCELERATE_CONFIG (run_scripts/accelerate/*.yaml),
# DRY_RUN=1 prints the resolved configuration and exits.
set -euo pipefail
cd "$(dirname "$0")/.."
# PRESET=name loads run_scripts/presets/name.env (python -m opsd.presets list); its values replace the same
# variables from the environment, so change a preset by editing a copy of its file.
if [ -n "${PRESET:-}" ]; then
  [ -f "run_scripts/presets/$PRESET.env" ] || { echo "unknown PRESET $PRESET (python -m opsd.presets list)" >&2; exit 2; }
  set -a; . "run_scripts/presets/$PRESET.env"; set +a
fi
VENV=${VENV:-.venv}
PY=${PYTHON_BIN:-$([ -x "$VENV/bin/python" ] && echo "$VENV/bin/python" || echo python3)}
ENTRY=${OPD_ENTRY:-opsd.train}

: "${MODEL_PATH:?set MODEL_PATH to the local student model directory}"
: "${TEACHER_MODEL_PATH:?set TEACHER_MODEL_PATH to the local teacher model directory}"
DATA_DIR=${DATA_DIR:-data}
TRAIN_FILE=${TRAIN_FILE:-$DATA_DIR/train.jsonl}
OUTPUT_DIR=${OUTPUT_DIR:-runs/opd-$(date +%Y%m%d-%H%M%S)}
MAX_PROMPT_LENGTH=${MAX_PROMPT_LENGTH:-1024}
MAX_RESPONSE_LENGTH=${MAX_RESPONSE_LENGTH:-1024}
if [ -n "${OPD_MAX_LENGTH:-}" ] && [ $((MAX_PROMPT_LENGTH + MAX_RESPONSE_LENGTH)) -gt "$OPD_MAX_LENGTH" ]; then
  MAX_PROMPT_LENGTH=$((OPD_MAX_LENGTH - MAX_RESPONSE_LENGTH))
  [ "$MAX_PROMPT_LENGTH" -gt 0 ] || { echo "OPD_MAX_LENGTH must exceed MAX_RESPONSE_LENGTH" >&2; exit 2; }
fi
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-16}
MICRO=${PPO_MICRO_BATCH_SIZE_PER_GPU:-4}
NPROC=${NPROC:-1}
per_step=$((MICRO * NPROC))
if [ $((TRAIN_BATCH_SIZE % per_step)) -ne 0 ]; then
  echo "TRAIN_BATCH_SIZE ($TRAIN_BATCH_SIZE) must be a multiple of PPO_MICRO_BATCH_SIZE_PER_GPU x NPROC ($per_step)" >&2
  exit 2
fi
GRAD_ACC=$((TRAIN_BATCH_SIZE / per_step))
if [ -z "${DTYPE:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then DTYPE=bfloat16; else DTYPE=float32; fi
fi
args=(
  --model_name_or_path "$MODEL_PATH"
  --teacher_model_name_or_path "$TEACHER_MODEL_PATH"
  --train_file "$TRAIN_FILE"
  --output_dir "$OUTPUT_DIR"
  --loss_type "${OPD_LOSS_TYPE:-reverse_kl}"
  --jsd_beta "${OPD_JSD_BETA:-0.5}"
  --chunk_size "${OPD_CHUNK_SIZE:-512}"
  --loss_normalization "${OPD_LOSS_NORMALIZATION:-kept_tokens}"
  --learning_rate "${LEARNING_RATE:-1e-6}"
  --per_device_train_batch_size "$MICRO"
  --gradient_accumulation_steps "$GRAD_ACC"
  --num_train_epochs "${TOTAL_EPOCHS:-1}"
  --max_steps "${MAX_STEPS:--1}"
  --max_prompt_length "$MAX_PROMPT_LENGTH"
  --max_completion_length "$MAX_RESPONSE_LENGTH"
  --rollout_n "${ROLLOUT_N:-1}"
  --temperature "${TEMPERATURE:-1.0}"
  --dtype "$DTYPE"
  --bf16 "$([ "$DTYPE" = bfloat16 ] && echo true || echo false)"
  --save_steps "${SAVE_STEPS:-200}"
  --logging_steps "${LOGGING_STEPS:-1}"
  --seed "${SEED:-42}"
  --report_to "${REPORT_TO:-none}"
)
[ -n "${ENABLE_THINKING:-}" ] && args+=(--enable_thinking "$ENABLE_THINKING")
[ -n "${OPD_REWARD_BETA:-}" ] && args+=(--reward_beta "$OPD_REWARD_BETA" --reward_function "${REWARD_FUNCTION:-math}")
[ -n "${RESUME:-}" ] && args+=(--resume_from_checkpoint "$RESUME")
[ "${DRY_RUN:-0}" = 1 ] && args+=(--dry_run)
args+=(${EXTRA_ARGS:-} "$@")

if [ "$NPROC" -gt 1 ] && ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
  # CPU processes (gloo): torchrun; `accelerate launch --cpu --num_processes N` starts one process (accelerate 1.15)
  cmd=("$VENV/bin/torchrun" --nproc_per_node "$NPROC" -m "$ENTRY" --use_cpu true)
elif [ "$NPROC" -gt 1 ]; then
  cmd=("$VENV/bin/accelerate" launch --num_processes "$NPROC" ${ACCELERATE_CONFIG:+--config_file "$ACCELERATE_CONFIG"} -m "$ENTRY")
else
  cmd=("$PY" -m "$ENTRY")
fi
echo "[train] ${cmd[*]} ${args[*]}"
exec "${cmd[@]}" "${args[@]}"
