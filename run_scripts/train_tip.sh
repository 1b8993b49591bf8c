#!/usr/bin/env bash
# OPD with token-importance selection: run_scripts/train_opd.sh plus the selector variables.
#
#   SELECTOR=soft_or RATIO=0.5 MODEL_PATH=... TEACHER_MODEL_PATH=... bash run_scripts/train_tip.sh [flags]
#
# SELECTOR (soft_or): all | random | position_first | position_last | entropy_sample | entropy_topk |
#   divergence_topk | soft_or | q3 | teachability | teachability_entropy | none (full-token baseline)
# RATIO (0.5), SCOPE (rollout_batch | micro_batch | sequence), SUPPORT_TOP_K (16, TA-OPD K), SELECTOR_OPTIONS (JSON, optional),
# TOKEN_DUMP_DIR (optional), plus every variable of train_opd.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
sel_args=(--selector "${SELECTOR:-soft_or}" --ratio "${RATIO:-0.5}" --scope "${SCOPE:-rollout_batch}"
          --support_top_k "${SUPPORT_TOP_K:-16}")
[ -n "${SELECTOR_OPTIONS:-}" ] && sel_args+=(--selector_options "$SELECTOR_OPTIONS")
[ -n "${TOKEN_DUMP_DIR:-}" ] && sel_args+=(--token_dump_dir "$TOKEN_DUMP_DIR")
export OPD_ENTRY=tip_ext.train
export OUTPUT_DIR=${OUTPUT_DIR:-runs/tip-${SELECTOR:-soft_or}-${RATIO:-0.5}-$(date +%Y%m%d-%H%M%S)}
exec bash run_scripts/train_opd.sh "${sel_args[@]}" "$@"
