#!/usr/bin/env bash
# One prepared GPU run of issue 12's measurements, within 10 minutes on one H100/H200-class card:
#   1. python -m lab.bench: the loss step at N=16384, H=2560, V=151936 in bf16 (TRL's Triton kernel, the chunked
#      recompute, the upstream-style step, the fused loss full-token and with a frozen head, and each rule at
#      rho 0.5/0.2/0.1/0.05 with the fused gradient pass), each variant in its own process, 3 timed repeats;
#   2. python -m lab.profile: whole OPD steps through OPDTrainer with a random-weight Qwen3-0.6B student and
#      Qwen3-1.7B teacher (vocabulary 151936), per phase, for no selector, teachability 10% and soft_or 50%.
# Both write JSON (and the profile a PNG) under $OUT after every variant, so a run stopped by its timeout keeps
# what it measured.
#
#   bash run_scripts/gpu_bench.sh           # on the GPU machine
#   bash run_scripts/gpu_bench.sh --tiny    # CPU, tiny shapes (a minute; checks the script end to end)
#
# Variables:
#   OUT                  output folder (default runs/gpu_bench-<time>)
#   BENCH_TIMEOUT        seconds for the bench (default 330)
#   PROFILE_TIMEOUT      seconds for the profile (default 240)
#   PROFILE_COMPLETION   completion tokens per rollout of the profile (default 512)
#   VENV, PYTHON_BIN     interpreter, as in train_opd.sh
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
opsd_help "${BASH_SOURCE[0]}" "$@"
cd "$OPSD_ROOT"
opsd_python
PY=$PYTHON
OUT=${OUT:-runs/gpu_bench-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
opsd_gpu_info "$OUT/nvidia-smi.csv"
"$PY" - > "$OUT/versions.txt" 2>&1 <<'PY' || true
import importlib
for name in ("torch", "transformers", "trl", "triton"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as err:  # report, do not fail
        print(name, "missing:", type(err).__name__)
PY
if [ "${1:-}" = "--tiny" ]; then
  bench=(--device cpu --n 256 1024 --h 64 --v 512 --dtype float32 --rules teachability soft_or --rhos 0.1
         --repeats 1 --threads 1)
  profile=(--device cpu --tiny --steps 1 --threads 1)
else
  bench=(--device cuda --n 16384 --h 2560 --v 151936 --dtype bfloat16 --repeats 3 --threads 0)
  profile=(--device cuda --steps 3 --batch 8 --prompt_length 256 --completion_length "${PROFILE_COMPLETION:-512}")
fi
echo "[gpu_bench] writing to $OUT"
status=0
timeout --signal=INT "${BENCH_TIMEOUT:-330}" "$PY" -m lab.bench "${bench[@]}" --out "$OUT/bench.json" \
  | tee "$OUT/bench.txt" || status=$?
timeout --signal=INT "${PROFILE_TIMEOUT:-240}" "$PY" -m lab.profile "${profile[@]}" --out "$OUT/profile.json" \
  | tee "$OUT/profile.txt" || status=$?
exit $status
