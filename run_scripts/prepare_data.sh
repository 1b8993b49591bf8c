#!/usr/bin/env bash
# Convert a local math dataset file into standardized prompt files (DIR/train.jsonl [+ validation.jsonl]).
#
#   INPUT=data/raw/dapo-math-17k.parquet OUTPUT_DIR=data/dapo bash run_scripts/prepare_data.sh
#   INPUT=data/raw/math500.jsonl OUTPUT_DIR=data/math500 SPLIT_NAME=test bash run_scripts/prepare_data.sh
#
# Environment variables (defaults in brackets):
#   INPUT          local .jsonl / .json / .parquet file (required)
#   OUTPUT_DIR     output directory (required)
#   LAYOUT         auto | dapo | math500 | aime24 | aime25 | generic          [auto]
#   INSTRUCTION    boxed | dapo | none | custom text containing {question}  [boxed]
#   VAL_FRACTION   fraction of rows written to validation.jsonl              [0]
#   SEED           seed of the validation split                              [0]
#   SPLIT_NAME     name of the main output file                              [train]
#   LIMIT          keep only the first N cleaned rows                        [all]
# Extra arguments are passed on to `python -m opsd.data` (see `python -m opsd.data --help`), e.g.
#   --no-conversational, --question_column q --answer_column a.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

: "${INPUT:?set INPUT=path/to/raw/file (.jsonl, .json or .parquet)}"
: "${OUTPUT_DIR:?set OUTPUT_DIR=directory for the prepared files}"
LAYOUT="${LAYOUT:-auto}"
INSTRUCTION="${INSTRUCTION:-boxed}"
VAL_FRACTION="${VAL_FRACTION:-0}"
SEED="${SEED:-0}"
SPLIT_NAME="${SPLIT_NAME:-train}"
LIMIT="${LIMIT:-}"

if [[ -x "$ROOT/.venv/bin/python" ]]; then
  PYTHON="$ROOT/.venv/bin/python"
else
  PYTHON="python3"
fi

CMD=("$PYTHON" -m opsd.data
  --input "$INPUT"
  --output_dir "$OUTPUT_DIR"
  --layout "$LAYOUT"
  --instruction "$INSTRUCTION"
  --val_fraction "$VAL_FRACTION"
  --seed "$SEED"
  --split_name "$SPLIT_NAME")
if [[ -n "$LIMIT" ]]; then
  CMD+=(--limit "$LIMIT")
fi
CMD+=("$@")

printf '+'
printf ' %q' "${CMD[@]}"
printf '\n'
"${CMD[@]}"
