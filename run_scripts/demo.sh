#!/usr/bin/env bash
# The built-in default: the CPU distillation lab (lab/study.py) on both built-in tasks. Sets itself up on a fresh
# machine (virtualenv, then the lab's teachers and students, trained once and cached in .cache/lab).
#   bash run_scripts/demo.sh                     default study: addition and reverse_sum, 3 seeds
#   bash run_scripts/demo.sh --task reverse_sum  one task (repeat --task for several)
#   bash run_scripts/demo.sh --full              every configuration, 5 seeds, 120 steps
# Extra flags go to `python -m lab.study` (--output_dir, --configs, --seeds, --steps, --workers, ...).
# Variables:
#   VENV             virtualenv to create/use (default .venv)
#   OMP_NUM_THREADS  threads of the main process (default 1; every run goes to a worker process with 1 thread)
set -euo pipefail
cd "$(dirname "$0")/.."
bash run_scripts/setup.sh
VENV=${VENV:-.venv}
# one thread per process: multi-threaded tiny kernels stall when another process takes a core
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$VENV/bin/python" -m lab.study "$@"
