#!/usr/bin/env bash
# OPD with token-importance selection (TIP / TA-OPD): run_scripts/train_opd.sh plus the selector variables.
#
#   SELECTOR=soft_or RATIO=0.5 MODEL_PATH=... TEACHER_MODEL_PATH=... bash run_scripts/train_tip.sh [flags]
#   bash run_scripts/train_tip.sh --help      # these variables, then every variable of train_opd.sh
#
# Variables, default in brackets:
#   SELECTOR         [soft_or] all | random | position_first | position_last | entropy_sample | entropy_topk |
#                    divergence_topk | soft_or | q3 | teachability | teachability_entropy | none (full-token)
#   RATIO            [0.5] share of the valid completion tokens kept
#   SCOPE            [rollout_batch] rollout_batch | micro_batch | sequence
#   SUPPORT_TOP_K    [16] TA-OPD's K (teacher support size)
#   SELECTOR_OPTIONS [unset] JSON of rule options
#   TOKEN_DUMP_DIR   [unset] write per-token statistics there
#   EXP_TAG          [-tip-$SELECTOR-r$RATIO] inserted into upstream's experiment name (train_opd.sh's EXP_NAME)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
if opsd_wants_help "$@"; then
  opsd_header "${BASH_SOURCE[0]}"
  echo
  exec bash "$OPSD_ROOT/run_scripts/train_opd.sh" --help
fi
opsd_abspath TOKEN_DUMP_DIR
cd "$OPSD_ROOT"
sel_args=(--selector "${SELECTOR:-soft_or}" --ratio "${RATIO:-0.5}" --scope "${SCOPE:-rollout_batch}"
          --support_top_k "${SUPPORT_TOP_K:-16}")
[ -n "${SELECTOR_OPTIONS:-}" ] && sel_args+=(--selector_options "$SELECTOR_OPTIONS")
[ -n "${TOKEN_DUMP_DIR:-}" ] && sel_args+=(--token_dump_dir "$TOKEN_DUMP_DIR")
export OPD_ENTRY=tip_ext.train
export EXP_TAG=${EXP_TAG:--tip-${SELECTOR:-soft_or}-r${RATIO:-0.5}}
exec bash run_scripts/train_opd.sh "${sel_args[@]}" "$@"
