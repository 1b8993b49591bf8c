#!/usr/bin/env bash
# Sampling evaluation (mean@k / pass@k) of a local model or LoRA adapter on the math benchmarks. Reads upstream's
# scripts/eval/eval_math.sh variables too (HJSang/OPSD_OnPolicyDistillation), with upstream's meaning.
#
#   MODEL_PATH=runs/tip-soft_or-50 bash run_scripts/eval_math.sh [extra python -m opsd.evaluate flags]
#   PRESET=upstream MODEL_PATH=... DATA_DIR=<upstream raw root> bash run_scripts/eval_math.sh
#   bash run_scripts/eval_math.sh --help
#
# Variables, default in brackets (PRESET=upstream: upstream's eval defaults, shown as "upstream: X"):
#   MODEL_PATH           local model directory or LoRA adapter directory (required)
#   MODEL_NAME           [basename of MODEL_PATH] names the output directory with OUTPUT_ROOT
#   BASE_MODEL           [the adapter's base_model_name_or_path] base model of an adapter
#   DATA_FILES           ["data/math500.jsonl data/aime24.jsonl data/aime25.jsonl"] [NAME=]FILE list; X.jsonl
#                        falls back to directory X/; missing files are skipped with a note, none existing is an error
#   DATA_DIR             [unset] upstream's raw root (MATH-500/, AIME_2024/, AIME_2025/): prepared into
#                        $DATA_DIR/eval_processed/$INSTRUCTION_VARIANT and used instead of DATA_FILES
#   INSTRUCTION_VARIANT  [boxed] prompt wording of that preparation: boxed (upstream's wording) | dapo | none
#   REWARD_FUNCTION      [math] math (alias math_reward) | math_dapo (upstream's strict "Answer:" rule)
#   K                    [16] samples per problem (VAL_N is upstream's name)
#   TEMPERATURE          [1.0, upstream: 0.7] (VAL_TEMPERATURE)
#   TOP_P                [1.0, upstream: 0.8] (VAL_TOP_P)
#   TOP_K                [0 = off, upstream: 20] (VAL_TOP_K; -1 = off)
#   MAX_NEW_TOKENS       [4096, upstream: 16384] completion budget (MAX_RESPONSE_LENGTH). The papers allow 8192
#                        response tokens; 4096 halves the cost of a 16-sample sweep and truncates only long thinking
#                        traces (the truncated share is reported). Set 8192 to match the papers' setting.
#   MAX_PROMPT_LENGTH    [unset] keep the last N prompt tokens
#   SEED                 [0]
#   BATCH_SIZE           [64] sequences per generate call (HF backend)
#   BACKEND              [hf] hf | vllm (upstream: SGLang; USE_VLLM=1 is the same as BACKEND=vllm)
#   TP_SIZE              [1] vLLM tensor-parallel size (BACKEND=vllm only)
#   GPU_MEMORY_UTIL      [0.9, upstream: 0.7] vLLM memory share (BACKEND=vllm only)
#   OUTPUT_DIR           [$MODEL_PATH/eval; with RUN_ID or OUTPUT_ROOT set:
#                        $OUTPUT_ROOT/MODEL_NAME-eval-INSTRUCTION_VARIANT-REWARD_FUNCTION-RUN_ID, upstream's name]
#   OUTPUT_ROOT          [outputs/eval]
#   RUN_ID               [local]
#   ENABLE_THINKING      [unset = not passed; upstream: False] 1/true or 0/false for the chat template
#   LIMIT                [unset] first N problems per benchmark
#   DTYPE                [bfloat16 on CUDA, float32 on CPU]
#   PRESET               [unset] upstream = upstream's eval defaults above
#   PYTHON_BIN           [$VENV/bin/python, else python3]
#   VENV                 [.venv]
#   TRAIN_BATCH_SIZE, PPO_MINI_BATCH_SIZE, PPO_MICRO_BATCH_SIZE_PER_GPU, LOG_PROB_MICRO_BATCH_SIZE_PER_GPU,
#   ROLLOUT_N, MASTER_PORT: upstream's eval passes them to its 0-epoch trainer; here they have no effect (noted)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
opsd_help "${BASH_SOURCE[0]}" "$@"
cd "$OPSD_ROOT"
opsd_python

: "${MODEL_PATH:?set MODEL_PATH to the local model (or LoRA adapter) directory to evaluate}"
[ -e "$MODEL_PATH" ] || opsd_die "MODEL_PATH=$MODEL_PATH does not exist"
if [ "${PRESET:-}" = upstream ]; then
  TEMPERATURE=${TEMPERATURE:-${VAL_TEMPERATURE:-0.7}}; TOP_P=${TOP_P:-${VAL_TOP_P:-0.8}}
  TOP_K=${TOP_K:-${VAL_TOP_K:-20}}; MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-${MAX_RESPONSE_LENGTH:-16384}}
  ENABLE_THINKING=${ENABLE_THINKING:-False}
elif [ -n "${PRESET:-}" ]; then
  opsd_die "eval_math.sh knows only PRESET=upstream (training presets are for train_*.sh), got PRESET=$PRESET"
fi
K=${K:-${VAL_N:-16}}
TEMPERATURE=${TEMPERATURE:-${VAL_TEMPERATURE:-1.0}}
TOP_P=${TOP_P:-${VAL_TOP_P:-1.0}}
TOP_K=${TOP_K:-${VAL_TOP_K:-0}}
opsd_int TOP_K "$TOP_K"; [ "$TOP_K" -lt 0 ] && TOP_K=0
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-${MAX_RESPONSE_LENGTH:-4096}}
REWARD_FUNCTION=${REWARD_FUNCTION:-math}
case "$REWARD_FUNCTION" in
  math|math_reward) REWARD_FUNCTION=math ;;
  math_dapo) ;;
  *) opsd_die "REWARD_FUNCTION must be math (math_reward) or math_dapo, got '$REWARD_FUNCTION'" ;;
esac
INSTRUCTION_VARIANT_SET=${INSTRUCTION_VARIANT:-}
INSTRUCTION_VARIANT=${INSTRUCTION_VARIANT:-boxed}
case "$INSTRUCTION_VARIANT" in
  boxed) wording=upstream ;; dapo|none) wording=$INSTRUCTION_VARIANT ;;
  *) opsd_die "INSTRUCTION_VARIANT must be boxed, dapo or none, got '$INSTRUCTION_VARIANT'" ;;
esac
for v in TRAIN_BATCH_SIZE PPO_MINI_BATCH_SIZE PPO_MICRO_BATCH_SIZE_PER_GPU LOG_PROB_MICRO_BATCH_SIZE_PER_GPU \
         ROLLOUT_N MASTER_PORT; do
  [ -n "${!v:-}" ] && opsd_note "$v has no effect on evaluation here (upstream feeds it to a 0-epoch trainer)"
done
BACKEND=${BACKEND:-hf}
if [ "$(opsd_bool USE_VLLM "${USE_VLLM:-0}")" = true ]; then BACKEND=vllm; fi
if [ "$BACKEND" != vllm ]; then
  [ "${TP_SIZE:-1}" = 1 ] || opsd_die "TP_SIZE=$TP_SIZE needs BACKEND=vllm (or USE_VLLM=1)"
  [ -n "${GPU_MEMORY_UTIL:-}" ] && opsd_note "GPU_MEMORY_UTIL applies to BACKEND=vllm only; unused"
fi

if [ -n "${DATA_DIR:-}" ]; then
  prepared=$DATA_DIR/eval_processed/$INSTRUCTION_VARIANT
  data=()
  for pair in "MATH-500/test.jsonl:math500" "AIME_2024/aime_2024_problems.parquet:aime24" \
              "AIME_2025/train.jsonl:aime25"; do
    raw=$DATA_DIR/${pair%%:*}; name=${pair##*:}
    if [ -f "$raw" ]; then
      "$PYTHON" -m opsd.data --input "$raw" --output_dir "$prepared" --instruction "$wording" --split_name "$name" \
        --quiet || opsd_die "preparing $raw failed (see above)"
      data+=("$name=$prepared/$name.jsonl")
    else
      opsd_note "$raw not found: benchmark $name skipped"
    fi
  done
else
  [ -n "${INSTRUCTION_VARIANT_SET:-}" ] && opsd_note "INSTRUCTION_VARIANT applies to the preparation of a raw \
DATA_DIR; DATA_FILES are prepared already: unused"
  DATA_FILES=${DATA_FILES:-data/math500.jsonl data/aime24.jsonl data/aime25.jsonl}
  data=()
  for spec in $DATA_FILES; do
    file=$spec
    if [[ "$spec" == *=* && ! -e "$spec" ]]; then file=${spec#*=}; fi
    if [ -e "$file" ]; then
      data+=("$spec")
    elif [[ "$file" == *.jsonl && -d "${file%.jsonl}" ]]; then
      data+=("${spec%.jsonl}")  # prepare_data.sh layout: data/math500/test.jsonl
    else
      opsd_note "benchmark file $file not found, skipped"
    fi
  done
fi
[ ${#data[@]} -gt 0 ] || opsd_die "none of DATA_FILES exists (DATA_FILES='${DATA_FILES:-}', DATA_DIR='${DATA_DIR:-}'); \
prepare them with run_scripts/prepare_data.sh or point DATA_DIR at upstream's raw data root"

if [ -z "${OUTPUT_DIR:-}" ]; then
  if [ -n "${RUN_ID:-}" ] || [ -n "${OUTPUT_ROOT:-}" ]; then
    MODEL_NAME=${MODEL_NAME:-$(basename "$MODEL_PATH")}
    exp=$(echo "$MODEL_NAME" | tr '/' '_')-eval-$INSTRUCTION_VARIANT-$REWARD_FUNCTION-${RUN_ID:-local}
    OUTPUT_DIR=${OUTPUT_ROOT:-outputs/eval}/$exp
  else
    OUTPUT_DIR=$MODEL_PATH/eval
  fi
fi
args=(
  --model "$MODEL_PATH"
  --data "${data[@]}"
  --k "$K"
  --temperature "$TEMPERATURE"
  --top_p "$TOP_P"
  --top_k "$TOP_K"
  --seed "${SEED:-0}"
  --max_new_tokens "$MAX_NEW_TOKENS"
  --batch_size "${BATCH_SIZE:-64}"
  --backend "$BACKEND"
  --reward "$REWARD_FUNCTION"
  --output_dir "$OUTPUT_DIR"
)
if [ "$BACKEND" = vllm ]; then
  args+=(--tensor_parallel_size "${TP_SIZE:-1}" --gpu_memory_utilization "${GPU_MEMORY_UTIL:-0.9}")
fi
[ -n "${BASE_MODEL:-}" ] && args+=(--base_model "$BASE_MODEL")
[ -n "${LIMIT:-}" ] && args+=(--limit "$LIMIT")
[ -n "${DTYPE:-}" ] && args+=(--dtype "$DTYPE")
[ -n "${MAX_PROMPT_LENGTH:-}" ] && args+=(--max_prompt_length "$MAX_PROMPT_LENGTH")
if [ -n "${ENABLE_THINKING:-}" ]; then
  if [ "$(opsd_bool ENABLE_THINKING "$ENABLE_THINKING")" = true ]; then
    args+=(--enable_thinking)
  else
    args+=(--no-enable_thinking)
  fi
fi

cmd=("$PYTHON" -m opsd.evaluate "${args[@]}" "$@")
echo "+ ${cmd[*]}"
exec "${cmd[@]}"
