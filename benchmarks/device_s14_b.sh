#!/usr/bin/env bash
# Queued by the thirteenth session (one H200, about 7 minutes; issue 13's batch-1 floor, 0.85 of the roofline;
# 0.682-0.692 with SHARDLLM_GEMV_W_EARLY=2). One early weight tile a program gained 1.1% at batch 1: the GEMVs are
# latency-bound per program (4-8 dependent steps of 2-16 KB), and the kernels before them (norm, attention reduce)
# leave HBM idle for 2-3 us. SHARDLLM_GEMV_W_EARLY_STEPS=2|4 loads the first 2 or 4 tiles before the PDL wait.
# GPU tests first (bit-equal to the default at 1, 2 and 4 tiles; the PTX order), then Llama-3-8B batch 1, fp8 at
# 1 / 2 / 4 tiles and bf16 at 1 / 4, alternating, twice.
#     LIMIT_S=420 bash benchmarks/device_s14_b.sh
set -u
. benchmarks/device_rows.sh
device_start 420
export CUDA_VISIBLE_DEVICES=${GPU:-0}
timeout 150 python -m pytest -q -m gpu -p no:cacheprovider tests/layers/test_gemv.py tests/layers/test_pdl.py 2>&1 \
  | tail -3 | tee -a "$OUT/summary.txt"
B1="--model llama-3-8b --batch_size 1 --num_requests 2 --input_len 128 --output_len 128"
for r in a b; do
  MODEL_FLAGS="$B1 --dtype fp8"
  for s in 1 2 4; do row 35 "fp8_steps${s}_$r" "SHARDLLM_GEMV_W_EARLY_STEPS=$s"; done
  MODEL_FLAGS="$B1 --dtype bf16"
  for s in 1 4; do row 35 "bf16_steps${s}_$r" "SHARDLLM_GEMV_W_EARLY_STEPS=$s"; done
done
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
