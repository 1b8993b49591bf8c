#!/usr/bin/env bash
# One prepared GPU run of issue 12's and issue 18's measurements, within 10 minutes on one H100/H200-class card:
#   1. python -m lab.bench: the loss step at N=16384, H=2560, V=151936 in bf16 (TRL's Triton kernel, the chunked
#      recompute, the upstream-style step, the fused loss full-token and with a frozen head, and each rule at
#      rho 0.5/0.2/0.1/0.05 with the fused gradient pass), each variant in its own process, 3 timed repeats;
#   2. python -m lab.profile: whole OPD steps through OPDTrainer with a random-weight Qwen3-0.6B student and
#      Qwen3-1.7B teacher (vocabulary 151936), bf16, 2 micro-batches of 4 rollouts, completion lengths uniform in
#      0.2-1 x PROFILE_COMPLETION, per phase (issue 18): full-token padded (the trainer before issue 18), full-token
#      padding-free, teachability 10% with the separate statistics pass and padded, then teachability 10%, soft_or
#      20%, entropy_sample 20% with the statistics recorded during generation and padding-free passes. With
#      flash-attn installed both models use flash_attention_2, so the padding-free passes are packed varlen rows;
#      without it they are one unpadded pass per sequence (sdpa).
#   3. with vLLM installed: the full-token padding-free step once more with vLLM generation (statistics would fall
#      back to the separate pass there; lengths are what the model samples).
# Each writes JSON (and the profile a PNG) under $OUT after every variant, so a run stopped by its timeout keeps
# what it measured.
#
#   bash run_scripts/gpu_bench.sh           # on the GPU machine
#   bash run_scripts/gpu_bench.sh --tiny    # CPU, tiny shapes (a minute; checks the script end to end)
#
# Variables:
#   OUT                  output folder (default runs/gpu_bench-<time>)
#   BENCH_TIMEOUT        seconds for the bench (default 180; the loss-step bench of issue 12)
#   PROFILE_TIMEOUT      seconds for the profile (default 330)
#   PROFILE_COMPLETION   completion limit per rollout of the profile (default 512)
#   VLLM_TIMEOUT         seconds for the vLLM profile (default 60; skipped when vLLM is not installed)
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
for name in ("torch", "transformers", "trl", "triton", "flash_attn", "vllm"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as err:  # report, do not fail
        print(name, "missing:", type(err).__name__)
PY
configs=(none/padded none teachability@0.1/padded/separate teachability@0.1 soft_or@0.2 entropy_sample@0.2)
if [ "${1:-}" = "--tiny" ]; then
  bench=(--device cpu --n 256 1024 --h 64 --v 512 --dtype float32 --rules teachability soft_or --rhos 0.1
         --repeats 1 --threads 1)
  profile=(--device cpu --tiny --steps 1 --threads 1 --batch 2 --accumulation 2 --prompt_length 8
           --completion_length 16)
  tiny=1
else
  bench=(--device cuda --n 16384 --h 2560 --v 151936 --dtype bfloat16 --repeats 3 --threads 0)
  profile=(--device cuda --steps 2 --batch 4 --accumulation 2 --prompt_length 256
           --completion_length "${PROFILE_COMPLETION:-512}" --length_spread 0.2)
  if opsd_has_module flash_attn; then profile+=(--attn_implementation flash_attention_2); fi
  tiny=0
fi
echo "[gpu_bench] writing to $OUT"
status=0
timeout --signal=INT "${BENCH_TIMEOUT:-180}" "$PY" -m lab.bench "${bench[@]}" --out "$OUT/bench.json" \
  | tee "$OUT/bench.txt" || status=$?
timeout --signal=INT "${PROFILE_TIMEOUT:-330}" "$PY" -m lab.profile "${profile[@]}" --configs "${configs[@]}" \
  --out "$OUT/profile.json" | tee "$OUT/profile.txt" || status=$?
if [ "$tiny" = 0 ] && opsd_has_module vllm; then
  timeout --signal=INT "${VLLM_TIMEOUT:-60}" "$PY" -m lab.profile "${profile[@]}" --vllm --configs none \
    --out "$OUT/profile_vllm.json" | tee "$OUT/profile_vllm.txt" || status=$?
fi
exit $status
