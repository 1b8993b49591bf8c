#!/usr/bin/env bash
# Sampling evaluation (mean@k / pass@k) of a local model or LoRA adapter on the math benchmarks. Reads upstream's
# scripts/eval/eval_math.sh variables too (HJSang/OPSD_OnPolicyDistillation), with upstream's meaning.
#
#   MODEL_PATH=runs/tip-soft_or-50 bash run_scripts/eval_math.sh [extra python -m opsd.evaluate flags]
#   PRESET=upstream MODEL_PATH=... DATA_DIR=<upstream raw root> bash run_scripts/eval_math.sh
#   bash run_scripts/eval_math.sh --help
#
# Variables, default in brackets. The defaults are upstream's eval_math.sh: an upstream eval line evaluates as it did
# upstream (sampling 0.7 / 0.8 / 20, 16 samples, 16384 response tokens, prompts over 2048 tokens filtered out,
# enable_thinking=False for the chat template). PRESET=paper is the papers' protocol (T 1.0, top-p 1.0, no top-k,
# mean@16, 8192 response tokens). Paths you set are relative to the directory you run the script from.
#   MODEL_PATH           local model directory or LoRA adapter directory (required)
#   MODEL_NAME           [basename of MODEL_PATH] names the output directory with OUTPUT_ROOT
#   BASE_MODEL           [the adapter's base_model_name_or_path] base model of an adapter
#   DATA_DIR             [unset] upstream's raw root (MATH-500/, AIME_2024/, AIME_2025/): prepared into
#                        $DATA_DIR/eval_processed/$INSTRUCTION_VARIANT and evaluated. A DATA_DIR holding none of
#                        them (a prepared training directory) is an error, or skipped with a note when DATA_FILES is set
#   DATA_FILES           ["data/math500.jsonl data/aime24.jsonl data/aime25.jsonl"] prepared [NAME=]FILE list, used
#                        without a raw DATA_DIR; X.jsonl falls back to directory X/; missing files are skipped with a
#                        note, none existing is an error
#   INSTRUCTION_VARIANT  [boxed] prompt wording of the raw preparation: boxed (upstream's wording) | dapo | none
#   REWARD_FUNCTION      [math_reward] math_reward (alias math) | math_dapo (upstream's strict "Answer:" rule)
#   VAL_N                [16] samples per problem (K is this project's name for it)
#   VAL_TEMPERATURE      [0.7] sampling temperature (0 = greedy)
#   VAL_TOP_P            [0.8]
#   VAL_TOP_K            [20] (-1 or 0 = off)
#   TEMPERATURE, TOP_P, TOP_K  the training rollout's sampling upstream (its eval ignores them): noted, unused
#   MAX_RESPONSE_LENGTH  [16384] completion budget (MAX_NEW_TOKENS is this project's name for it)
#   MAX_PROMPT_LENGTH    [2048] prompts longer than this are filtered out, as upstream (>= 1)
#   FILTER_OVERLONG_PROMPTS [1] 0 = keep the last MAX_PROMPT_LENGTH tokens of longer prompts instead
#   ENABLE_THINKING      [False, as upstream] 1/true passes enable_thinking=True to the chat template
#   SEED                 [0]
#   BATCH_SIZE           [64] sequences per generate call (HF backend)
#   BACKEND              [hf] hf | vllm (upstream: SGLang; USE_VLLM=1 is the same as BACKEND=vllm)
#   TP_SIZE              [1] vLLM tensor-parallel size (BACKEND=vllm only)
#   GPU_MEMORY_UTIL      [0.9, upstream: 0.7] vLLM memory share (BACKEND=vllm only)
#   OUTPUT_DIR           [$MODEL_PATH/eval; with RUN_ID or OUTPUT_ROOT set:
#                        $OUTPUT_ROOT/MODEL_NAME-eval-INSTRUCTION_VARIANT-REWARD_FUNCTION-RUN_ID, upstream's name]
#   OUTPUT_ROOT          [outputs/eval]
#   RUN_ID               [local]
#   LIMIT                [unset] first N problems per benchmark
#   DTYPE                [bfloat16 on CUDA, float32 on CPU]
#   PRESET               [unset = upstream's eval] paper = the papers' protocol above; upstream = the defaults
#   PYTHON_BIN           [$VENV/bin/python, else python3]
#   VENV                 [.venv]
#   OMP_NUM_THREADS      [CPU: idle cores (cores - load average), >= 1, noted] torch threads
#   TRAIN_BATCH_SIZE, PPO_MINI_BATCH_SIZE, PPO_MICRO_BATCH_SIZE_PER_GPU, LOG_PROB_MICRO_BATCH_SIZE_PER_GPU,
#   ROLLOUT_N, MASTER_PORT: upstream's eval passes them to its 0-epoch trainer; here they have no effect (noted)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
opsd_help "${BASH_SOURCE[0]}" "$@"
opsd_abspath MODEL_PATH BASE_MODEL DATA_DIR OUTPUT_DIR OUTPUT_ROOT VENV
opsd_abspath_list DATA_FILES
cd "$OPSD_ROOT"
opsd_python

: "${MODEL_PATH:?set MODEL_PATH to the local model (or LoRA adapter) directory to evaluate}"
[ -e "$MODEL_PATH" ] || opsd_die "MODEL_PATH=$MODEL_PATH does not exist"
case "${PRESET:-upstream}" in
  upstream) ;;
  paper)  # the papers' protocol: mean@16 at temperature 1.0, no nucleus/top-k truncation, 8192 response tokens
    VAL_TEMPERATURE=${VAL_TEMPERATURE:-1.0}; VAL_TOP_P=${VAL_TOP_P:-1.0}; VAL_TOP_K=${VAL_TOP_K:-0}
    MAX_RESPONSE_LENGTH=${MAX_RESPONSE_LENGTH:-${MAX_NEW_TOKENS:-8192}} ;;
  *) opsd_die "PRESET must be upstream (upstream's eval, the default) or paper (the papers' protocol) for \
eval_math.sh, got PRESET=$PRESET (training presets are for train_*.sh)" ;;
esac
for v in TEMPERATURE TOP_P TOP_K; do
  [ -n "${!v:-}" ] && opsd_note "$v is the training rollouts' sampling upstream and its eval ignores it; \
evaluation samples with VAL_$v (here ${v}=${!v} is unused)"
done
K=${VAL_N:-${K:-16}}
TEMPERATURE=${VAL_TEMPERATURE:-0.7}
TOP_P=${VAL_TOP_P:-0.8}
TOP_K=${VAL_TOP_K:-20}
opsd_int VAL_TOP_K "$TOP_K"; [ "$TOP_K" -lt 0 ] && TOP_K=0
opsd_int VAL_N "$K"; [ "$K" -ge 1 ] || opsd_die "VAL_N (K) must be >= 1, got $K"
MAX_NEW_TOKENS=${MAX_RESPONSE_LENGTH:-${MAX_NEW_TOKENS:-16384}}
opsd_int MAX_RESPONSE_LENGTH "$MAX_NEW_TOKENS"
[ "$MAX_NEW_TOKENS" -ge 1 ] || opsd_die "MAX_RESPONSE_LENGTH must be >= 1 token, got $MAX_NEW_TOKENS"
MAX_PROMPT_LENGTH=${MAX_PROMPT_LENGTH:-2048}
opsd_int MAX_PROMPT_LENGTH "$MAX_PROMPT_LENGTH"
[ "$MAX_PROMPT_LENGTH" -ge 1 ] || opsd_die "MAX_PROMPT_LENGTH must be >= 1 token, got $MAX_PROMPT_LENGTH"
FILTER=$(opsd_bool FILTER_OVERLONG_PROMPTS "${FILTER_OVERLONG_PROMPTS:-1}")
ENABLE_THINKING=${ENABLE_THINKING:-False}
REWARD_FUNCTION=${REWARD_FUNCTION:-math_reward}
REWARD_NAME=$REWARD_FUNCTION  # upstream's run name spells it as given
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

raw_root=false
if [ -n "${DATA_DIR:-}" ]; then
  for raw in MATH-500/test.jsonl AIME_2024/aime_2024_problems.parquet AIME_2025/train.jsonl; do
    [ -f "$DATA_DIR/$raw" ] && raw_root=true
  done
  if [ "$raw_root" = false ]; then
    [ -n "${DATA_FILES:-}" ] || opsd_die "DATA_DIR=$DATA_DIR holds none of upstream's raw benchmarks \
(MATH-500/test.jsonl, AIME_2024/aime_2024_problems.parquet, AIME_2025/train.jsonl); for prepared benchmark files set \
DATA_FILES (and unset DATA_DIR)"
    opsd_note "DATA_DIR=$DATA_DIR holds none of upstream's raw benchmarks: evaluating DATA_FILES instead"
  elif [ -n "${DATA_FILES:-}" ]; then
    opsd_note "DATA_DIR is upstream's raw root and wins: DATA_FILES unused"
  fi
fi
if [ "$raw_root" = true ]; then
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
    exp=$(echo "$MODEL_NAME" | tr '/' '_')-eval-$INSTRUCTION_VARIANT-$REWARD_NAME-${RUN_ID:-local}
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
  --max_prompt_length "$MAX_PROMPT_LENGTH"
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
[ "$FILTER" = true ] && args+=(--filter_overlong_prompts)
if [ "$(opsd_bool ENABLE_THINKING "$ENABLE_THINKING")" = true ]; then
  args+=(--enable_thinking)
else
  args+=(--no-enable_thinking)
fi
if [ "$(opsd_gpu_count)" -eq 0 ]; then opsd_cpu_threads 1; fi

cmd=("$PYTHON" -m opsd.evaluate "${args[@]}" "$@")
echo "+ ${cmd[*]}"
exec "${cmd[@]}"
