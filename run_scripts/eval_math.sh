#!/usr/bin/env bash
# Sampling evaluation (mean@k / pass@k) of a local model or LoRA adapter on the math benchmarks.
#
#   MODEL_PATH=runs/tip-soft_or-50 bash run_scripts/eval_math.sh [extra python -m opsd.evaluate flags]
#
# Variables (default):
#   MODEL_PATH      (required) local model directory or LoRA adapter directory
#   BASE_MODEL      (unset) base model of an adapter; default: the adapter's base_model_name_or_path
#   DATA_FILES      ("data/math500.jsonl data/aime24.jsonl data/aime25.jsonl") space-separated, NAME=FILE allowed;
#                   X.jsonl falls back to directory X/ (prepare_data.sh with SPLIT_NAME=test writes X/test.jsonl);
#                   missing files are skipped with a note, none existing is an error
#   K (16)  TEMPERATURE (1.0)  TOP_P (1.0)  TOP_K (0 = off)  SEED (0)
#   MAX_NEW_TOKENS  (4096) completion budget. The papers allow 8192 response tokens; 4096 halves the cost of a
#                   16-sample AIME/MATH-500 sweep and truncates only long thinking traces (the truncated share is
#                   reported). Set 8192 to match the papers' setting exactly.
#   BATCH_SIZE      (64) sequences per generate call (HF backend)
#   BACKEND         (hf) hf | vllm
#   OUTPUT_DIR      ($MODEL_PATH/eval) where eval_*.json go (opsd.compare looks there)
#   ENABLE_THINKING (unset = not passed to the chat template; 1/true or 0/false)
#   LIMIT           (unset) first N problems per benchmark
#   DTYPE           (unset = bfloat16 on CUDA, float32 on CPU)
#   PYTHON_BIN      (.venv/bin/python when present, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON_BIN:-$([ -x "$VENV/bin/python" ] && echo "$VENV/bin/python" || echo python3)}

: "${MODEL_PATH:?set MODEL_PATH to the local model (or LoRA adapter) directory to evaluate}"
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
    echo "note: benchmark file $file not found, skipped" >&2
  fi
done
if [ ${#data[@]} -eq 0 ]; then
  echo "error: none of DATA_FILES exists ($DATA_FILES); prepare them with run_scripts/prepare_data.sh or set DATA_FILES" >&2
  exit 2
fi

args=(
  --model "$MODEL_PATH"
  --data "${data[@]}"
  --k "${K:-16}"
  --temperature "${TEMPERATURE:-1.0}"
  --top_p "${TOP_P:-1.0}"
  --top_k "${TOP_K:-0}"
  --seed "${SEED:-0}"
  --max_new_tokens "${MAX_NEW_TOKENS:-4096}"
  --batch_size "${BATCH_SIZE:-64}"
  --backend "${BACKEND:-hf}"
  --output_dir "${OUTPUT_DIR:-$MODEL_PATH/eval}"
)
[ -n "${BASE_MODEL:-}" ] && args+=(--base_model "$BASE_MODEL")
[ -n "${LIMIT:-}" ] && args+=(--limit "$LIMIT")
[ -n "${DTYPE:-}" ] && args+=(--dtype "$DTYPE")
case "${ENABLE_THINKING:-}" in
  "") ;;
  1|true|True|TRUE|yes) args+=(--enable_thinking) ;;
  0|false|False|FALSE|no) args+=(--no-enable_thinking) ;;
  *) echo "error: ENABLE_THINKING must be 1/true or 0/false, got '$ENABLE_THINKING'" >&2; exit 2 ;;
esac

cmd=("$PY" -m opsd.evaluate "${args[@]}" "$@")
echo "+ ${cmd[*]}"
exec "${cmd[@]}"
