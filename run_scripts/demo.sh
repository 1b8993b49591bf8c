#!/usr/bin/env bash
# The built-in default: the CPU distillation lab (lab/study.py). Sets itself up on a fresh machine.
#   bash run_scripts/demo.sh            default study (3 seeds, <= 10 minutes on 2 CPU cores including setup)
#   bash run_scripts/demo.sh --full     the complete study (5 seeds, longer runs)
# Extra flags go to `python -m lab.study` (--output_dir, --configs, --seeds, --steps, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash run_scripts/setup.sh
VENV=${VENV:-.venv}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec "$VENV/bin/python" -m lab.study "$@"
