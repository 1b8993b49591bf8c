#!/usr/bin/env bash
# Full-token on-policy distillation (the baseline), driven by the environment variables of upstream's
# scripts/opd/train_opd.sh (HJSang/OPSD_OnPolicyDistillation), with upstream's meaning.
#
#   MODEL_PATH=/models/Qwen3-1.7B TEACHER_MODEL_PATH=/models/Qwen3-8B DATA_DIR=data \
#     bash run_scripts/train_opd.sh [extra python -m opsd.train flags]
#   bash run_scripts/train_opd.sh --help
#
# Variables, default in brackets; "upstream: X" marks a default that differs from upstream's script (README,
# "Run-script variables", says why). Every upstream variable is honoured, or refused / noted on stderr. Paths you
# set are relative to the directory you run the script from; the defaults are relative to the repository. Yes/no
# variables take 1/true/yes/on or 0/false/no/off (any case). Upstream's agent-script variables (ENABLE_TOOLS=true,
# MAX_ASSISTANT_TURNS, MAX_TOOL_RESPONSE_LENGTH, TOOL_FORMAT, AGENT_NUM_WORKERS, DATABASE_DIR, TOOL_CONFIG_PATH,
# REWARD_FN_PATH, TRAIN_RATIO) are refused by name: multi-turn tool rollouts are not supported here.
# Models
#   MODEL_PATH                     student model directory (required)
#   TEACHER_MODEL_PATH             teacher model directory (required)
#   MODEL_NAME                     [basename of MODEL_PATH] names the run; "qwen" in it turns thinking off
# Data
#   DATA_DIR                       [data] a prepared directory (train.jsonl/.parquet/.json), or upstream's raw root
#                                  (DAPO-Math-17k-dedup/, MATH-500/, AIME_2024/, AIME_2025/), prepared on each run
#                                  into $DATA_DIR/opsd_processed through python -m opsd.data
#   TRAIN_FILE                     [from DATA_DIR] prompt file or directory; overrides DATA_DIR
#   DAPO_TRAIN_RATIO               [0.8] upstream's train share of DAPO-Math (shuffled with seed DATA_SEED)
#   DATA_SEED                      [42] seed of that split
#   PREP_INSTRUCTION               [upstream] prompt wording of the raw preparation (opsd.data --instruction)
#   VAL_FILES                      [the prepared val_math500/val_aime24/val_aime25 files found] [NAME=]FILE list
# Run directory
#   OUTPUT_ROOT                    [outputs] parent of the run directory
#   RUN_ID                         [local] part of the run name
#   EXP_NAME                       [upstream's name: MODEL-RUN_ID-OPD-LOSS[-rwbetaB]-teacher-T-THINK-lrLR-bsB-nN]
#   OUTPUT_DIR                     [$OUTPUT_ROOT/$EXP_NAME] the run directory itself
#   RESUME                         [unset] latest (newest complete checkpoint) or a checkpoint directory
#   OVERWRITE                      [0] 1 = delete the checkpoints of an earlier run in OUTPUT_DIR and start afresh
#                                  (with RESUME set: refused, the two contradict each other)
# Batch and optimization
#   TRAIN_BATCH_SIZE               [16, upstream: 256] prompts per optimizer step (each with ROLLOUT_N completions)
#   ROLLOUT_N                      [1] completions per prompt
#   PPO_MICRO_BATCH_SIZE_PER_GPU   [4] completions per forward/backward pass and GPU
#   PPO_MINI_BATCH_SIZE            [unset] accepted with a note: upstream's OPD update takes one optimizer step
#                                  per batch whatever it says, and so does this script
#   LEARNING_RATE                  [1e-6]
#   LR_SCHEDULER_TYPE              [constant] upstream: constant, no warm-up
#   WEIGHT_DECAY                   [0.1] upstream's AdamW weight decay
#   TOTAL_EPOCHS                   [1, upstream: 15]
#   MAX_STEPS                      [-1 = TOTAL_EPOCHS]
#   MAX_PROMPT_LENGTH              [1024, upstream: 2048] longer prompts are cut from the left (>= 1)
#   MAX_RESPONSE_LENGTH            [1024, upstream: 8192] (>= 1)
#   OPD_MAX_LENGTH                 [unset, upstream: 16384] upstream caps prompt+response in the loss's forward
#                                  passes only; accepted when MAX_PROMPT_LENGTH + MAX_RESPONSE_LENGTH fits under it
#                                  (then it changes nothing, as upstream), refused with the reason when it does not
#   SEED                           [42]
# Loss
#   OPD_LOSS_TYPE                  [reverse_kl] reverse_kl | forward_kl | jsd
#   OPD_JSD_BETA                   [0.5]
#   OPD_CHUNK_SIZE                 [512, upstream script: 256] rows per chunk of the divergence
#   PADDING_FREE                   [1] 1 = teacher and student passes pay for real tokens only (trimmed, length-
#                                  grouped micro-batches, unpadded sequences); 0 = the padded rectangle
#   OPD_LOSS_NORMALIZATION         [kept_tokens] kept_tokens | all_tokens | sequence (global over the step)
#   OPD_REWARD_BETA                [unset = off] reward weighting w = n softmax(r / beta)
#   OPD_REWARD_WEIGHTING           [global] global | upstream (upstream's per-micro-batch objective)
#   REWARD_FUNCTION                [math] math | math_dapo (upstream names math_reward / math_dapo accepted)
# Sampling of the training rollouts
#   TEMPERATURE                    [1.0] sampling of the rollouts only, as upstream (0 = greedy): the loss and its
#                                  statistics use the raw logits (--temperature_in_loss false; python -m opsd.train's
#                                  default, TRL's convention, divides the logits by it)
#   TOP_P                          [1.0]
#   TOP_K                          [-1 = off]
#   ENABLE_THINKING                [True] upstream: names the run and picks VAL_TEMPERATURE; for Qwen models the
#                                  chat template gets enable_thinking=False whatever it says, as upstream does
#   FORCE_ENABLE_THINKING          [0] 1 = pass enable_thinking=True to the chat template (turns thinking on)
# In-training validation (opsd.validation)
#   TEST_FREQ                      [0, upstream: 5] validate every N steps (0 or less: no periodic validation)
#   VAL_AT_END                     [1] validate at the last step whenever validation files exist, as upstream does
#                                  whatever TEST_FREQ says; 0 = not (no validation files: no validation, noted)
#   VAL_BEFORE_TRAIN               [False] validate once before the first step
#   VAL_N                          [16] samples per validation problem (mean@n, pass@j)
#   VAL_TEMPERATURE                [0.6 when ENABLE_THINKING is True, else 0.7] (upstream's rule)
#   VAL_TOP_P                      [0.8]
#   VAL_TOP_K                      [20]
#   VAL_MAX_NEW_TOKENS             [MAX_RESPONSE_LENGTH]
#   VAL_LIMIT                      [unset = all] first N problems of each validation file
#   VAL_BATCH_SIZE                 [64] sequences per generate call
#   STOP_ON_COLLAPSE               [0] 1 = stop training when the collapse rule fires at a validation (opsd.collapse:
#                                  teacher-text NLL up or end-of-turn rate down while the loss falls); 0 = warn only.
#                                  Thresholds: --collapse_nll_rise / --collapse_eot_drop / ... in EXTRA_ARGS
# Saving and logging
#   SAVE_FREQ                      [200, upstream: 20] checkpoint every N steps (SAVE_STEPS is the old name);
#                                  <= 0: no checkpoints (upstream then saves nothing; here the final model is saved)
#   TEACHER_OFFLOAD                [0, upstream: always] 1 = keep the teacher on the CPU between its passes
#                                  (--teacher_offload; one process or DDP); off because a GPU that holds both models
#                                  only loses transfer time; opsd.plan / train_lora.sh turn it on when it must
#   LOGGING_STEPS                  [1]
#   REPORT_TO                      [none] none | tensorboard | trackio | wandb (comma-separated)
#   PUSH_TO_HUB                    [0] 1 = push the final model (HUB_MODEL_ID names the repository)
#   HUB_MODEL_ID                   [unset]
# Rollout engine
#   USE_VLLM                       [0] 1 = vLLM rollouts (TRL), auto = when vLLM is installed and a GPU is present
#   VLLM_MODE                      [colocate] colocate | server
#   VLLM_SERVER_URL                [unset] server mode: base URL of `trl vllm-serve`
#   TP_SIZE                        [1] vLLM tensor-parallel size (needs USE_VLLM)
#   GPU_MEMORY_UTIL                [0.3, upstream: 0.7] vLLM colocate memory share (needs USE_VLLM)
# Processes and runtime
#   NPROC                          [every GPU nvidia-smi lists (noted), as upstream; 1 without a GPU] processes
#                                  per node; >1 launches through accelerate (GPU) or torch.distributed.run (CPU),
#                                  with the interpreter resolved below
#   PYTORCH_ALLOC_CONF             [expandable_segments:True on GPUs, as upstream] torch's CUDA allocator settings
#   OMP_NUM_THREADS                [CPU: idle cores (cores - load average) / NPROC, >= 1, noted] torch threads
#                                  per process
#   ACCELERATE_CONFIG              [unset] run_scripts/accelerate/*.yaml (zero3, fsdp2, ddp); with NPROC>1 also on
#                                  CPU processes (gloo), with mixed precision from DTYPE
#   MASTER_PORT                    [random in 29500-39999] rendezvous port of multi-process runs
#   DTYPE                          [bfloat16 on GPU, float32 otherwise]
#   PRESET                         [unset] load run_scripts/presets/$PRESET.env (python -m opsd.presets list)
#   PYTHON_BIN                     [$VENV/bin/python, else python3] interpreter
#   VENV                           [.venv]
#   OPD_ENTRY                      [opsd.train] python module to run (train_tip.sh sets tip_ext.train)
#   EXTRA_ARGS                     [unset] more python -m opsd.train flags; --learning_rate, --loss_type,
#                                  --reward_beta, --rollout_n, --per_device_train_batch_size, --temperature and
#                                  --gradient_accumulation_steps there (or after the script's name) also name the run
#   DRY_RUN                        [0] 1 = check everything checkable without loading a model (settings, model
#                                  directories, tokenizers, data; a raw DATA_DIR is prepared), print the resolved
#                                  configuration, exit
# Recipe (Rethinking OPD)
#   COLD_START                     [0] 1/true = run run_scripts/cold_start.sh first (teacher rollouts -> SFT) and start
#                                  OPD from its checkpoint; skipped when COLD_START_DIR already holds a finished one
#   COLD_START_DIR                 [$OUTPUT_DIR/cold_start] the cold-started checkpoint
#   COLD_START_FILE                [TRAIN_FILE] the prompts the teacher answers
#   COLD_START_*                   the other variables of run_scripts/cold_start.sh
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
opsd_help "${BASH_SOURCE[0]}" "$@"
# paths the user gives are relative to the directory the script was run from; defaults are repository-relative
opsd_abspath MODEL_PATH TEACHER_MODEL_PATH DATA_DIR TRAIN_FILE OUTPUT_ROOT OUTPUT_DIR COLD_START_DIR COLD_START_FILE \
  VENV
opsd_abspath_list VAL_FILES
case "${RESUME:-}" in ""|latest|true|True|TRUE|1|yes) ;; *) opsd_abspath RESUME ;; esac
if [ -n "${ACCELERATE_CONFIG:-}" ] && [ -e "$OPSD_CALLER_DIR/$ACCELERATE_CONFIG" ]; then opsd_abspath ACCELERATE_CONFIG; fi
cd "$OPSD_ROOT"
# PRESET=name loads run_scripts/presets/name.env; its values replace the same variables from the environment
# (MODEL_PATH, TEACHER_MODEL_PATH and DATA_DIR keep a value already set), so edit a copy to change a preset.
if [ -n "${PRESET:-}" ]; then
  [ -f "run_scripts/presets/$PRESET.env" ] || opsd_die "unknown PRESET $PRESET (python -m opsd.presets list)"
  set -a; . "run_scripts/presets/$PRESET.env"; set +a
fi
opsd_python
ENTRY=${OPD_ENTRY:-opsd.train}
DRY=$(opsd_bool DRY_RUN "${DRY_RUN:-0}")
COLD=$(opsd_bool COLD_START "${COLD_START:-0}")
OVERWRITE_B=$(opsd_bool OVERWRITE "${OVERWRITE:-0}")
opsd_refuse_agent_vars
case "${RESUME:-}" in ""|0|false|False|FALSE|no|none|None) RESUME="" ;; esac
[ -n "${RESUME:-}" ] && [ "$OVERWRITE_B" = true ] && opsd_die "RESUME=$RESUME and OVERWRITE=$OVERWRITE contradict each \
other (continue the run, or delete its checkpoints and start afresh): set only one"
# flags in EXTRA_ARGS / the command line win over the variables they correspond to (so the run name describes the
# run that is trained)
# shellcheck disable=SC2206
user_flags=(${EXTRA_ARGS:-} "$@")
for pair in learning_rate:LEARNING_RATE loss_type:OPD_LOSS_TYPE reward_beta:OPD_REWARD_BETA rollout_n:ROLLOUT_N \
            per_device_train_batch_size:PPO_MICRO_BATCH_SIZE_PER_GPU temperature:TEMPERATURE; do
  value=$(opsd_flag_value "${pair%%:*}" "${user_flags[@]}")
  [ -n "$value" ] && printf -v "${pair##*:}" '%s' "$value"
done

# ----- models --------------------------------------------------------------------------------------------------
: "${MODEL_PATH:?set MODEL_PATH to the local student model directory}"
: "${TEACHER_MODEL_PATH:?set TEACHER_MODEL_PATH to the local teacher model directory}"
[ -d "$MODEL_PATH" ] || opsd_die "MODEL_PATH=$MODEL_PATH is not a directory (a local student model is needed)"
[ -d "$TEACHER_MODEL_PATH" ] || opsd_die "TEACHER_MODEL_PATH=$TEACHER_MODEL_PATH is not a directory"
MODEL_NAME=${MODEL_NAME:-$(basename "$MODEL_PATH")}
ENABLE_THINKING=${ENABLE_THINKING:-True}
THINKING=$(opsd_bool ENABLE_THINKING "$ENABLE_THINKING")
FORCE_THINKING=$(opsd_bool FORCE_ENABLE_THINKING "${FORCE_ENABLE_THINKING:-0}")

# ----- data ----------------------------------------------------------------------------------------------------
DATA_DIR=${DATA_DIR:-data}
RAW_DAPO=$DATA_DIR/DAPO-Math-17k-dedup/distinct-prompts-with-rewards.parquet
PREPARED=$DATA_DIR/opsd_processed
has_train() { compgen -G "$1/train.jsonl" >/dev/null || compgen -G "$1/train.parquet" >/dev/null \
  || compgen -G "$1/train.json" >/dev/null; }
prepare() {  # prepare INPUT SPLIT [opsd.data flags]: one raw file into $PREPARED/SPLIT.jsonl
  local input=$1 split=$2; shift 2
  "$PYTHON" -m opsd.data --input "$input" --output_dir "$PREPARED" --instruction "${PREP_INSTRUCTION:-upstream}" \
    --split_name "$split" --seed "${DATA_SEED:-42}" "$@" >&2 || opsd_die "preparing $input failed (see above)"
}
if [ -n "${TRAIN_FILE:-}" ] || { has_train "$DATA_DIR" && [ ! -f "$RAW_DAPO" ]; }; then
  for v in DAPO_TRAIN_RATIO DATA_SEED PREP_INSTRUCTION; do
    [ -n "${!v:-}" ] && opsd_note "$v applies to the preparation of upstream's raw DATA_DIR; the data is prepared \
already: unused"
  done
fi
if [ -n "${TRAIN_FILE:-}" ]; then
  [ -e "$TRAIN_FILE" ] || opsd_die "TRAIN_FILE=$TRAIN_FILE does not exist"
  VAL_DIR=$(dirname "$TRAIN_FILE")
elif has_train "$DATA_DIR"; then
  TRAIN_FILE=$DATA_DIR
  VAL_DIR=$DATA_DIR
elif [ -f "$RAW_DAPO" ]; then
  TRAIN_FILE=$PREPARED
  VAL_DIR=$PREPARED
  # prepared on every run, as upstream; a dry run prepares too, so that it can check the prepared files
  opsd_log "preparing upstream's raw data in $DATA_DIR into $PREPARED (DAPO ${DAPO_TRAIN_RATIO:-0.8} train split)"
  prepare "$RAW_DAPO" train --layout dapo --train_ratio "${DAPO_TRAIN_RATIO:-0.8}"
  mv "$PREPARED/validation.jsonl" "$PREPARED/val_dapo.jsonl"
  planned=""
  for pair in "MATH-500/test.jsonl:val_math500" "AIME_2024/aime_2024_problems.parquet:val_aime24" \
              "AIME_2025/train.jsonl:val_aime25"; do
    if [ -f "$DATA_DIR/${pair%%:*}" ]; then
      prepare "$DATA_DIR/${pair%%:*}" "${pair##*:}"
      name=${pair##*:}; planned="$planned ${name#val_}=$PREPARED/$name.jsonl"
    else
      opsd_note "$DATA_DIR/${pair%%:*} not found: no ${pair##*:} validation set (upstream stops here)"
    fi
  done
  VAL_FILES=${VAL_FILES:-${planned# }}
else
  opsd_die "DATA_DIR=$DATA_DIR holds neither a prepared train file (train.jsonl/.parquet/.json) nor upstream's raw
  layout ($RAW_DAPO); set DATA_DIR or TRAIN_FILE (run_scripts/prepare_data.sh prepares other files)"
fi
if [ -z "${VAL_FILES:-}" ]; then
  VAL_FILES=""
  for name in val_math500 val_aime24 val_aime25; do
    [ -f "$VAL_DIR/$name.jsonl" ] && VAL_FILES="$VAL_FILES ${name#val_}=$VAL_DIR/$name.jsonl"
  done
  VAL_FILES=${VAL_FILES# }
fi

# ----- batch ---------------------------------------------------------------------------------------------------
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-16}
ROLLOUT_N=${ROLLOUT_N:-1}
MICRO=${PPO_MICRO_BATCH_SIZE_PER_GPU:-4}
GPUS=$(opsd_gpu_count)
if [ -z "${NPROC:-}" ]; then
  NPROC=$(( GPUS > 0 ? GPUS : 1 ))
  [ "$GPUS" -gt 0 ] && opsd_note "NPROC=$NPROC: one process per GPU nvidia-smi lists (as upstream); set NPROC to use fewer"
fi
for v in TRAIN_BATCH_SIZE ROLLOUT_N PPO_MICRO_BATCH_SIZE_PER_GPU NPROC; do
  value=${!v:-}; [ "$v" = PPO_MICRO_BATCH_SIZE_PER_GPU ] && value=$MICRO
  opsd_int "$v" "$value"; [ "$value" -ge 1 ] || opsd_die "$v must be >= 1, got $value"
done
COMPLETIONS=$((TRAIN_BATCH_SIZE * ROLLOUT_N))
PER_PASS=$((MICRO * NPROC))
[ $((TRAIN_BATCH_SIZE % NPROC)) -eq 0 ] || opsd_die "TRAIN_BATCH_SIZE ($TRAIN_BATCH_SIZE prompts) must be a multiple \
of NPROC ($NPROC) so that each process gets whole prompts with their ROLLOUT_N completions"
[ $((COMPLETIONS % PER_PASS)) -eq 0 ] || opsd_die "TRAIN_BATCH_SIZE x ROLLOUT_N ($TRAIN_BATCH_SIZE x $ROLLOUT_N = \
$COMPLETIONS completions) must be a multiple of PPO_MICRO_BATCH_SIZE_PER_GPU x NPROC ($MICRO x $NPROC); change \
ROLLOUT_N, TRAIN_BATCH_SIZE or PPO_MICRO_BATCH_SIZE_PER_GPU"
GRAD_ACC=$((COMPLETIONS / PER_PASS))
ga=$(opsd_flag_value gradient_accumulation_steps "${user_flags[@]}")
if [ -n "$ga" ]; then  # an explicit accumulation in EXTRA_ARGS changes the prompts per step: name the run by it
  opsd_int "--gradient_accumulation_steps in EXTRA_ARGS" "$ga"
  TRAIN_BATCH_SIZE=$((MICRO * NPROC * ga / ROLLOUT_N))
fi
if [ -n "${PPO_MINI_BATCH_SIZE:-}" ]; then
  opsd_note "PPO_MINI_BATCH_SIZE=$PPO_MINI_BATCH_SIZE has no effect: upstream's OPD update (opd_worker.update_opd) \
takes one optimizer step per TRAIN_BATCH_SIZE batch whatever it says, and so does this script"
fi
MAX_PROMPT_LENGTH=${MAX_PROMPT_LENGTH:-1024}
MAX_RESPONSE_LENGTH=${MAX_RESPONSE_LENGTH:-1024}
for v in MAX_PROMPT_LENGTH MAX_RESPONSE_LENGTH; do
  opsd_int "$v" "${!v}"; [ "${!v}" -ge 1 ] || opsd_die "$v must be >= 1 token, got ${!v}"
done
if [ -n "${OPD_MAX_LENGTH:-}" ]; then
  # upstream: a cap of prompt+response in the loss's forward passes only (prompts cut from the left there, generation
  # untouched); when the lengths fit it changes nothing, which is all this project reproduces
  opsd_int OPD_MAX_LENGTH "$OPD_MAX_LENGTH"
  [ $((MAX_PROMPT_LENGTH + MAX_RESPONSE_LENGTH)) -le "$OPD_MAX_LENGTH" ] || opsd_die "OPD_MAX_LENGTH=$OPD_MAX_LENGTH \
is below MAX_PROMPT_LENGTH + MAX_RESPONSE_LENGTH ($MAX_PROMPT_LENGTH + $MAX_RESPONSE_LENGTH): upstream then cuts the \
prompts from the left for the loss only (the student generated from the whole prompt), which this project does not \
do (its loss sees the context the rollout saw); unset OPD_MAX_LENGTH, or lower MAX_PROMPT_LENGTH/MAX_RESPONSE_LENGTH \
to fit"
fi
LEARNING_RATE=${LEARNING_RATE:-1e-6}
OPD_LOSS_TYPE=${OPD_LOSS_TYPE:-reverse_kl}

# ----- run directory (upstream's experiment name) --------------------------------------------------------------
RUN_ID=${RUN_ID:-local}
if [ "$THINKING" = true ]; then THINK_TAG=thinking; else THINK_TAG=nothink; fi
TEACHER_NAME=$(basename "$(dirname "$TEACHER_MODEL_PATH")")  # upstream names the teacher by the parent directory
EXP_NAME=${EXP_NAME:-$(echo "$MODEL_NAME" | tr '/' '_')-$RUN_ID-OPD-$OPD_LOSS_TYPE${OPD_REWARD_BETA:+-rwbeta$OPD_REWARD_BETA}${EXP_TAG:-}-teacher-$TEACHER_NAME-$THINK_TAG-lr$LEARNING_RATE-bs$TRAIN_BATCH_SIZE-n$ROLLOUT_N}
OUTPUT_ROOT=${OUTPUT_ROOT:-outputs}
OUTPUT_DIR=${OUTPUT_DIR:-$OUTPUT_ROOT/$EXP_NAME}

# ----- COLD_START=1: off-policy cold start (run_scripts/cold_start.sh), then OPD from its checkpoint ---------------
if [ "$COLD" = true ]; then
  COLD_START_DIR=${COLD_START_DIR:-$OUTPUT_DIR/cold_start}
  if [ "$DRY" = true ]; then
    opsd_note "COLD_START=1: the cold start would write $COLD_START_DIR and OPD would start from it"
  elif [ -f "$COLD_START_DIR/cold_start_summary.json" ]; then
    opsd_note "COLD_START=1: $COLD_START_DIR holds a finished cold start; OPD starts from it"
  else
    MODEL_PATH="$MODEL_PATH" TEACHER_MODEL_PATH="$TEACHER_MODEL_PATH" COLD_START_FILE="${COLD_START_FILE:-$TRAIN_FILE}" \
      COLD_START_DIR="$COLD_START_DIR" MAX_RESPONSE_LENGTH="$MAX_RESPONSE_LENGTH" PYTHON_BIN="$PYTHON" \
      bash run_scripts/cold_start.sh
  fi
  [ "$DRY" = true ] || MODEL_PATH=$COLD_START_DIR
fi

# ----- chat template: upstream turns thinking off for Qwen models -------------------------------------------------
template_args=()
if [ "$FORCE_THINKING" = true ]; then
  template_args=(--enable_thinking true)
elif [[ "$MODEL_NAME" == *[Qq]wen* ]]; then
  template_args=(--enable_thinking false)
  [ "$THINKING" = true ] && opsd_note "MODEL_NAME $MODEL_NAME is a Qwen model: enable_thinking=False for the chat \
template although ENABLE_THINKING=$ENABLE_THINKING (as upstream); FORCE_ENABLE_THINKING=1 turns it on"
fi

# ----- validation ----------------------------------------------------------------------------------------------
TEST_FREQ=${TEST_FREQ:-0}
opsd_int TEST_FREQ "$TEST_FREQ"
VAL_BEFORE=$(opsd_bool VAL_BEFORE_TRAIN "${VAL_BEFORE_TRAIN:-False}")
VAL_TEMPERATURE_SET=${VAL_TEMPERATURE:-}
if [ "$THINKING" = true ]; then VAL_TEMPERATURE=${VAL_TEMPERATURE:-0.6}; else VAL_TEMPERATURE=${VAL_TEMPERATURE:-0.7}; fi
[ "$TEST_FREQ" -ge 0 ] || TEST_FREQ=0  # upstream: any TEST_FREQ <= 0 still validates at the last step
VAL_AT_END=$(opsd_bool VAL_AT_END "${VAL_AT_END:-1}")
[ -n "$VAL_FILES" ] || VAL_AT_END=false
STOP_COLLAPSE=$(opsd_bool STOP_ON_COLLAPSE "${STOP_ON_COLLAPSE:-0}")
val_args=()
if [ "$TEST_FREQ" -gt 0 ] || [ "$VAL_BEFORE" = true ] || [ "$VAL_AT_END" = true ]; then
  [ -n "$VAL_FILES" ] || opsd_die "TEST_FREQ=$TEST_FREQ / VAL_BEFORE_TRAIN=${VAL_BEFORE_TRAIN:-False} need validation files: \
set VAL_FILES, or use upstream's raw DATA_DIR (MATH-500/, AIME_2024/, AIME_2025/)"
  read -r -a val_list <<< "$VAL_FILES"
  for spec in "${val_list[@]}"; do
    file=$spec; [[ "$spec" == *=* && ! -e "$spec" ]] && file=${spec#*=}
    [ -e "$file" ] || opsd_die "VAL_FILES entry $spec: $file does not exist"
  done
  val_args=(--val_files "${val_list[@]}" --test_freq "$TEST_FREQ" --val_before_train "$VAL_BEFORE"
            --val_n "${VAL_N:-16}" --val_temperature "$VAL_TEMPERATURE" --val_top_p "${VAL_TOP_P:-0.8}"
            --val_top_k "${VAL_TOP_K:-20}" --val_max_new_tokens "${VAL_MAX_NEW_TOKENS:-$MAX_RESPONSE_LENGTH}"
            --val_batch_size "${VAL_BATCH_SIZE:-64}" --val_seed "${SEED:-42}" --val_at_end "$VAL_AT_END"
            --stop_on_collapse "$STOP_COLLAPSE")
  [ -n "${VAL_LIMIT:-}" ] && val_args+=(--val_limit "$VAL_LIMIT")
else
  [ -n "$VAL_FILES" ] || opsd_note "no validation files (VAL_FILES, or val_math500/val_aime24/val_aime25 next to \
the train file): no validation, where upstream validates at the last step"
  for v in VAL_N VAL_TEMPERATURE_SET VAL_TOP_P VAL_TOP_K VAL_LIMIT VAL_MAX_NEW_TOKENS VAL_BATCH_SIZE STOP_ON_COLLAPSE; do
    [ -n "${!v:-}" ] && opsd_note "${v%_SET} is set but validation is off (TEST_FREQ=$TEST_FREQ, VAL_BEFORE_TRAIN \
$VAL_BEFORE, validation at the last step $VAL_AT_END): unused"
  done
fi

# ----- rollout engine ------------------------------------------------------------------------------------------
USE_VLLM=${USE_VLLM:-0}
if [ "$USE_VLLM" = auto ]; then
  if [ "$GPUS" -gt 0 ] && opsd_has_module vllm; then USE_VLLM=1; else USE_VLLM=0; fi
  opsd_log "USE_VLLM=auto -> $USE_VLLM"
fi
VLLM=$(opsd_bool USE_VLLM "$USE_VLLM")
TP_SIZE=${TP_SIZE:-1}
opsd_int TP_SIZE "$TP_SIZE"
vllm_args=()
if [ "$VLLM" = true ]; then
  opsd_has_module vllm || opsd_die "USE_VLLM=$USE_VLLM but $PYTHON cannot import vllm; pip install -r \
requirements-gpu.txt, or USE_VLLM=0 for transformers generation"
  VLLM_MODE=${VLLM_MODE:-colocate}
  case "$VLLM_MODE" in colocate|server) ;; *) opsd_die "VLLM_MODE must be colocate or server, got $VLLM_MODE" ;; esac
  vllm_args=(--use_vllm true --vllm_mode "$VLLM_MODE" --vllm_tensor_parallel_size "$TP_SIZE"
             --vllm_gpu_memory_utilization "${GPU_MEMORY_UTIL:-0.3}")
  [ -n "${VLLM_SERVER_URL:-}" ] && vllm_args+=(--vllm_server_base_url "$VLLM_SERVER_URL")
else
  [ "$TP_SIZE" -eq 1 ] || opsd_die "TP_SIZE=$TP_SIZE is vLLM's tensor parallelism: set USE_VLLM=1 (transformers \
generation runs one copy of the student per process)"
  [ -n "${GPU_MEMORY_UTIL:-}" ] && opsd_note "GPU_MEMORY_UTIL=$GPU_MEMORY_UTIL sizes vLLM's cache; without \
USE_VLLM=1 the rollouts use transformers generate and it has no effect"
  [ -n "${VLLM_MODE:-}" ] && opsd_note "VLLM_MODE=$VLLM_MODE has no effect without USE_VLLM=1"
fi

# ----- the rest ------------------------------------------------------------------------------------------------
if [ -z "${DTYPE:-}" ]; then
  if [ "$GPUS" -gt 0 ]; then DTYPE=bfloat16; else DTYPE=float32; fi
fi
REWARD_FUNCTION=${REWARD_FUNCTION:-math}
[ "$REWARD_FUNCTION" = math_reward ] && REWARD_FUNCTION=math
TOP_K=${TOP_K:--1}
opsd_int TOP_K "$TOP_K"
[ "$TOP_K" -lt 0 ] && TOP_K=0  # upstream's -1 = off is TRL's 0
SAVE=${SAVE_FREQ:-${SAVE_STEPS:-200}}
opsd_int SAVE_FREQ "$SAVE"
save_args=(--save_steps "$SAVE")
# upstream: SAVE_FREQ <= 0 saves no checkpoint (not even at the end); here no checkpoint, the final model is saved
[ "$SAVE" -gt 0 ] || save_args=(--save_strategy no)
OFFLOAD=$(opsd_bool TEACHER_OFFLOAD "${TEACHER_OFFLOAD:-0}")
MASTER_PORT=${MASTER_PORT:-$((29500 + RANDOM % 10500))}
export MASTER_PORT
if [ "$GPUS" -gt 0 ]; then
  export PYTORCH_ALLOC_CONF=${PYTORCH_ALLOC_CONF:-expandable_segments:True}  # as upstream sets it
else
  opsd_cpu_threads "$NPROC"
fi
args=(
  --model_name_or_path "$MODEL_PATH"
  --teacher_model_name_or_path "$TEACHER_MODEL_PATH"
  --train_file "$TRAIN_FILE"
  --output_dir "$OUTPUT_DIR"
  --loss_type "$OPD_LOSS_TYPE"
  --jsd_beta "${OPD_JSD_BETA:-0.5}"
  --chunk_size "${OPD_CHUNK_SIZE:-512}"
  --padding_free "$(opsd_bool PADDING_FREE "${PADDING_FREE:-1}")"
  --loss_normalization "${OPD_LOSS_NORMALIZATION:-kept_tokens}"
  --reward_weighting "${OPD_REWARD_WEIGHTING:-global}"
  --reward_function "$REWARD_FUNCTION"
  --learning_rate "$LEARNING_RATE"
  --lr_scheduler_type "${LR_SCHEDULER_TYPE:-constant}"
  --weight_decay "${WEIGHT_DECAY:-0.1}"
  --per_device_train_batch_size "$MICRO"
  --gradient_accumulation_steps "$GRAD_ACC"
  --num_train_epochs "${TOTAL_EPOCHS:-1}"
  --max_steps "${MAX_STEPS:--1}"
  --max_prompt_length "$MAX_PROMPT_LENGTH"
  --max_completion_length "$MAX_RESPONSE_LENGTH"
  --rollout_n "$ROLLOUT_N"
  --temperature "${TEMPERATURE:-1.0}"
  --temperature_in_loss false
  --top_p "${TOP_P:-1.0}"
  --top_k "$TOP_K"
  --dtype "$DTYPE"
  --bf16 "$([ "$DTYPE" = bfloat16 ] && echo true || echo false)"
  "${save_args[@]}"
  --teacher_offload "$OFFLOAD"
  --logging_steps "${LOGGING_STEPS:-1}"
  --seed "${SEED:-42}"
  --report_to "${REPORT_TO:-none}"
  --overwrite "$OVERWRITE_B"
)
args+=("${template_args[@]}" "${val_args[@]}" "${vllm_args[@]}")
[ -n "${OPD_REWARD_BETA:-}" ] && args+=(--reward_beta "$OPD_REWARD_BETA")
[ -n "${RESUME:-}" ] && args+=(--resume_from_checkpoint "$RESUME")
if [ "$(opsd_bool PUSH_TO_HUB "${PUSH_TO_HUB:-0}")" = true ]; then
  args+=(--push_to_hub true)
  [ -n "${HUB_MODEL_ID:-}" ] && args+=(--hub_model_id "$HUB_MODEL_ID")
fi
[ "$DRY" = true ] && args+=(--dry_run)
# shellcheck disable=SC2206  # EXTRA_ARGS is a flag list split on spaces
args+=(${EXTRA_ARGS:-} "$@")

opsd_log "run: $OUTPUT_DIR; $TRAIN_BATCH_SIZE prompts x $ROLLOUT_N completions per step ($NPROC process(es) x \
$MICRO per pass x $GRAD_ACC accumulation); validation: $([ ${#val_args[@]} -gt 0 ] && echo "every $TEST_FREQ steps on \
$VAL_FILES" || echo off); rollouts: $([ "$VLLM" = true ] && echo "vLLM $VLLM_MODE, TP $TP_SIZE" || echo \
"transformers generate")"
if [ "$NPROC" -gt 1 ] && [ "$GPUS" -eq 0 ] && [ -n "${ACCELERATE_CONFIG:-}" ]; then
  opsd_accelerate_cpu_cmd "$NPROC" "$MASTER_PORT" "$ENTRY"  # ZeRO-3 / FSDP / DDP config on CPU processes (lib.sh)
elif [ "$NPROC" -gt 1 ] && [ "$GPUS" -eq 0 ]; then
  # CPU processes (gloo): torch.distributed.run of the resolved interpreter (accelerate launch --cpu starts one)
  cmd=("$PYTHON" -m torch.distributed.run --nproc_per_node "$NPROC" --master_port "$MASTER_PORT" -m "$ENTRY"
       --use_cpu true)
elif [ "$NPROC" -gt 1 ]; then
  cmd=("$PYTHON" -m accelerate.commands.launch --num_processes "$NPROC" --main_process_port "$MASTER_PORT"
       ${ACCELERATE_CONFIG:+--config_file "$ACCELERATE_CONFIG"} -m "$ENTRY")
else
  cmd=("$PYTHON" -m "$ENTRY")
fi
echo "[train] ${cmd[*]} ${args[*]}"
exec "${cmd[@]}" "${args[@]}"
