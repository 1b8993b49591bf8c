#!/usr/bin/env bash
# Single-GPU LoRA recipe: the planner picks the cheapest setting that fits the GPU (micro-batch, 8/4-bit or offloaded
# teacher, 4-bit student, as the last resort a shorter response), then train_opd.sh (or train_tip.sh when SELECTOR is
# set) trains a LoRA adapter, the adapter is merged into a full model, and both are evaluated on the benchmarks.
#
#   MODEL_PATH=/models/Qwen3-4B TEACHER_MODEL_PATH=/models/Qwen3-8B DATA_DIR=data bash run_scripts/train_lora.sh
#   RESUME=latest ... bash run_scripts/train_lora.sh      # continue (a finished run goes straight to merge/eval)
#   bash run_scripts/train_lora.sh --help
#
# Variables, default in brackets (plus every variable of train_opd.sh / train_tip.sh, which do the training):
#   MODEL_PATH        student model directory (required)
#   TEACHER_MODEL_PATH teacher model directory (required)
#   GPU_MEMORY_GB     [memory of GPU 0 from nvidia-smi, else 24] GiB the planner plans for
#   PLAN              [1] 0 = skip the planner and use the variables as given
#   LORA_R            [64] adapter rank
#   LORA_ALPHA        [128]
#   LORA_TARGETS      [all-linear] target modules (names separated by commas or spaces), honoured; with PLAN=1 the
#                     planner sizes q_proj k_proj v_proj o_proj gate_proj up_proj down_proj only (others: PLAN=0)
#   TRAIN_BATCH_SIZE  [1] prompts per step (with ROLLOUT_N completions each)
#   ROLLOUT_N         [16] completions per prompt (the papers' 16 rollouts)
#   MAX_PROMPT_LENGTH [1024]
#   MAX_RESPONSE_LENGTH [8192] the planner may shorten it only when nothing else fits (it says so)
#   PPO_MICRO_BATCH_SIZE_PER_GPU [4] the planner may lower it
#   SELECTOR          [unset = full-token OPD through train_opd.sh] a selector runs train_tip.sh (RATIO, SCOPE, ...)
#   OUTPUT_DIR        [$OUTPUT_ROOT/<student>-$RUN_ID-OPD-lora-r$LORA_R] where the adapter goes
#   OUTPUT_ROOT       [outputs]
#   RUN_ID            [local]
#   MERGE             [1] 1 = write the merged model to $OUTPUT_DIR/merged
#   EVAL              [1] 1 = evaluate adapter (and merged model) with eval_math.sh (its upstream defaults) on
#                     DATA_FILES, or on DATA_DIR when that is upstream's raw root (MATH-500/, AIME_2024/, ...)
#   DATA_FILES        [data/math500.jsonl data/aime24.jsonl data/aime25.jsonl] prepared benchmarks for eval_math.sh;
#                     a prepared training DATA_DIR is never passed to it
#   PYTHON_BIN        [$VENV/bin/python, else python3]
#   DRY_RUN           [0] 1 = plan and print the training configuration only
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
opsd_help "${BASH_SOURCE[0]}" "$@"
opsd_abspath MODEL_PATH TEACHER_MODEL_PATH DATA_DIR OUTPUT_DIR OUTPUT_ROOT VENV
opsd_abspath_list DATA_FILES
cd "$OPSD_ROOT"
opsd_python
: "${MODEL_PATH:?set MODEL_PATH to the local student model directory}"
: "${TEACHER_MODEL_PATH:?set TEACHER_MODEL_PATH to the local teacher model directory}"
[ -d "$MODEL_PATH" ] || opsd_die "MODEL_PATH=$MODEL_PATH is not a directory"
[ -d "$TEACHER_MODEL_PATH" ] || opsd_die "TEACHER_MODEL_PATH=$TEACHER_MODEL_PATH is not a directory"

if [ -z "${GPU_MEMORY_GB:-}" ]; then
  if [ "$(opsd_gpu_count)" -gt 0 ]; then
    GPU_MEMORY_GB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits -i 0 | awk '{print $1 / 1024}')
  else
    GPU_MEMORY_GB=24
  fi
fi
export LORA_R=${LORA_R:-64} LORA_ALPHA=${LORA_ALPHA:-128} LORA_TARGETS=${LORA_TARGETS:-all-linear}
export TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-1} ROLLOUT_N=${ROLLOUT_N:-16}
export MAX_PROMPT_LENGTH=${MAX_PROMPT_LENGTH:-1024} MAX_RESPONSE_LENGTH=${MAX_RESPONSE_LENGTH:-8192}
export PPO_MICRO_BATCH_SIZE_PER_GPU=${PPO_MICRO_BATCH_SIZE_PER_GPU:-4}
export OUTPUT_DIR=${OUTPUT_DIR:-${OUTPUT_ROOT:-outputs}/$(basename "$MODEL_PATH")-${RUN_ID:-local}-OPD-lora-r$LORA_R}

LORA_TARGETS=$(echo "$LORA_TARGETS" | tr ',' ' ' | xargs)
[ -n "$LORA_TARGETS" ] || opsd_die "LORA_TARGETS is empty; name the target modules or use all-linear"
lora_flags="--use_peft true --lora_r $LORA_R --lora_alpha $LORA_ALPHA --lora_dropout 0.0 --lora_target_modules $LORA_TARGETS --gradient_checkpointing true"
if [ "$(opsd_bool PLAN "${PLAN:-1}")" = true ]; then
  # the planner's cheapest fitting change (opsd.plan.recommend), checked with and without a selector
  plan=$(GPU_MEMORY_GB=$GPU_MEMORY_GB "$PYTHON" - <<'PY'
import os, shlex
from opsd.plan import GiB, PlanInputs, estimate, recommend
from opsd.presets import _extra_args, fits_both
e = os.environ
targets = e["LORA_TARGETS"].split()
try:
    base = PlanInputs(student=e["MODEL_PATH"], teacher=e["TEACHER_MODEL_PATH"], gpu_memory_gb=float(e["GPU_MEMORY_GB"]),
                      num_gpus=1, prompt_length=int(e["MAX_PROMPT_LENGTH"]),
                      response_length=int(e["MAX_RESPONSE_LENGTH"]), micro_batch=int(e["PPO_MICRO_BATCH_SIZE_PER_GPU"]),
                      rollout_batch=int(e["TRAIN_BATCH_SIZE"]) * int(e["ROLLOUT_N"]), rollout_n=int(e["ROLLOUT_N"]),
                      lora=True, lora_rank=int(e["LORA_R"]), lora_targets="all-linear" if targets == ["all-linear"]
                      else tuple(targets), gradient_checkpointing=True, selector_ratio=1.0)
    from opsd.plan import resolve_lora_targets
    resolve_lora_targets(base.lora_targets)
except ValueError as err:
    print(f"echo {shlex.quote(f'[train_lora] error: planning LORA_TARGETS / batch variables: {err} (PLAN=0 trains unplanned)')} >&2; exit 2")
    raise SystemExit(0)
found = base if fits_both(base) else next(
    (p for p in recommend(base, allow_response_cut=False) or [] if fits_both(p)), None) or next(
    (p for p in recommend(base) or [] if fits_both(p)), None)
if found is None:
    print(f"echo 'plan: nothing fits {base.gpu_memory_gb:g} GiB (python -m opsd.plan --recommend explains)' >&2; exit 2")
else:
    flags = _extra_args(found).split()[2:]  # without the presets' cosine schedule
    flags[flags.index("--lora_alpha") + 1] = e["LORA_ALPHA"]
    at = flags.index("--lora_target_modules")
    flags[at + 1:at + 2] = targets  # the user's targets, as the plan sized them
    print(f"PPO_MICRO_BATCH_SIZE_PER_GPU={found.micro_batch}; MAX_RESPONSE_LENGTH={found.response_length}; "
          f"lora_flags={shlex.quote(' '.join(flags))}")
    print(f"echo '[train_lora] plan: {estimate(found).total / GiB:.1f} GiB of {base.gpu_memory_gb:g}; micro-batch "
          f"{found.micro_batch}, teacher {found.teacher_placement}, student {found.student_quant}, response "
          f"{found.response_length}' >&2")
PY
  ) || opsd_die "the planner failed (see above)"
  eval "$plan"
fi
export EXTRA_ARGS="$lora_flags ${EXTRA_ARGS:-}"
script=run_scripts/train_opd.sh
[ -n "${SELECTOR:-}" ] && [ "$SELECTOR" != none ] && script=run_scripts/train_tip.sh
bash "$script" "$@"
[ "$(opsd_bool DRY_RUN "${DRY_RUN:-0}")" = true ] && exit 0
[ -f "$OUTPUT_DIR/adapter_config.json" ] || opsd_die "no adapter in $OUTPUT_DIR after training"

if [ "$(opsd_bool MERGE "${MERGE:-1}")" = true ]; then
  opsd_log "merging the adapter of $OUTPUT_DIR into $MODEL_PATH -> $OUTPUT_DIR/merged"
  "$PYTHON" - "$MODEL_PATH" "$OUTPUT_DIR" <<'PY'
import os, sys
from peft import PeftModel
from opsd.core.models import load_causal_lm, load_tokenizer
base, adapter = sys.argv[1], sys.argv[2]
model = PeftModel.from_pretrained(load_causal_lm(base, dtype="auto"), adapter).merge_and_unload()
out = os.path.join(adapter, "merged")
model.save_pretrained(out)
load_tokenizer(adapter).save_pretrained(out)
PY
fi
if [ "$(opsd_bool EVAL "${EVAL:-1}")" = true ]; then
  have=0
  # eval_math.sh reads DATA_DIR as upstream's raw benchmark root: pass it only when it is one (a prepared training
  # directory is not); otherwise the prepared DATA_FILES
  # training-only variables; the training's MAX_PROMPT_LENGTH / MAX_RESPONSE_LENGTH stay (the run's lengths)
  quiet=(env -u TRAIN_BATCH_SIZE -u ROLLOUT_N -u PPO_MICRO_BATCH_SIZE_PER_GPU -u TEMPERATURE -u TOP_P -u TOP_K -u PRESET)
  raw=0
  for f in MATH-500/test.jsonl AIME_2024/aime_2024_problems.parquet AIME_2025/train.jsonl; do
    [ -n "${DATA_DIR:-}" ] && [ -f "$DATA_DIR/$f" ] && raw=1
  done
  if [ "$raw" = 1 ] && [ -z "${DATA_FILES:-}" ]; then
    have=1
  else
    quiet+=(-u DATA_DIR)
    for spec in ${DATA_FILES:-data/math500.jsonl data/aime24.jsonl data/aime25.jsonl}; do
      file=${spec#*=}; { [ -e "$file" ] || [ -d "${file%.jsonl}" ]; } && have=1
    done
  fi
  if [ "$have" = 1 ]; then
    base=$MODEL_PATH run=$OUTPUT_DIR
    "${quiet[@]}" MODEL_PATH="$run" BASE_MODEL="$base" OUTPUT_DIR="$run/eval" bash run_scripts/eval_math.sh
    if [ -d "$run/merged" ]; then
      "${quiet[@]}" MODEL_PATH="$run/merged" OUTPUT_DIR="$run/merged/eval" bash run_scripts/eval_math.sh
    fi
  else
    opsd_note "no benchmark file (DATA_FILES) found: evaluation skipped"
  fi
fi
opsd_log "done: adapter $OUTPUT_DIR${MERGE:+, merged model $OUTPUT_DIR/merged}"
