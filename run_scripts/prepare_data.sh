#!/usr/bin/env bash
# Convert a local math dataset file into standardized prompt files (DIR/train.jsonl [+ validation.jsonl]).
#
#   INPUT=data/raw/dapo-math-17k.parquet OUTPUT_DIR=data/dapo bash run_scripts/prepare_data.sh
#   INPUT=data/raw/math500.jsonl OUTPUT_DIR=data/math500 SPLIT_NAME=test bash run_scripts/prepare_data.sh
#
# Variables, default in brackets (paths you set are relative to the directory you run the script from):
#   INPUT          local .jsonl / .json / .parquet file (required)
#   OUTPUT_DIR     output directory (required)
#   LAYOUT         [auto] auto | dapo | math500 | aime24 | aime25 | generic
#   INSTRUCTION    [boxed] boxed | dapo | none | upstream | custom text containing {question}
#   VAL_FRACTION   [0] fraction of rows written to validation.jsonl (random subset, input order kept)
#   TRAIN_RATIO    [unset] upstream's split instead: shuffled with SEED, first int(n x ratio) rows for training
#   SEED           [0] seed of the validation split (upstream: 42)
#   SPLIT_NAME     [train] name of the main output file
#   LIMIT          [all] keep only the first N cleaned rows
#   PYTHON_BIN     [$VENV/bin/python, else python3]
#   VENV           [.venv]
# Extra arguments are passed on to `python -m opsd.data` (see `python -m opsd.data --help`), e.g.
#   --no-conversational, --question_column q --answer_column a.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
opsd_help "${BASH_SOURCE[0]}" "$@"
opsd_abspath INPUT OUTPUT_DIR VENV
cd "$OPSD_ROOT"
opsd_python

: "${INPUT:?set INPUT=path/to/raw/file (.jsonl, .json or .parquet)}"
: "${OUTPUT_DIR:?set OUTPUT_DIR=directory for the prepared files}"
LAYOUT="${LAYOUT:-auto}"
INSTRUCTION="${INSTRUCTION:-boxed}"
VAL_FRACTION="${VAL_FRACTION:-0}"
SEED="${SEED:-0}"
SPLIT_NAME="${SPLIT_NAME:-train}"
LIMIT="${LIMIT:-}"

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
if [[ -n "${TRAIN_RATIO:-}" ]]; then
  CMD+=(--train_ratio "$TRAIN_RATIO")
fi
CMD+=("$@")

printf '+'
printf ' %q' "${CMD[@]}"
printf '\n'
"${CMD[@]}"
