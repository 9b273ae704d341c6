#!/usr/bin/env bash
# Eighteenth session (one H200, about 6 minutes). The per-tensor route's scales left to the quantizer that reads
# the linear's output (SHARDLLM_FP8_DEFER_SCALE, new, on: o, gate_up and down at tp 1 skip their scale launch, the
# fused RMSNorm / SiLU-and-mul quantizers apply the scales as they load the product). 1. Its GPU tests and the FP8
# GPU tests around it. 2. Llama-3-8B fp8 + fp8 KV decode at batch 2 / 8 / 16 / 64 (B requests of 1000/256 at batch
# B, decode-phase TPOT), on against off, alternating.
#     LIMIT_S=420 bash benchmarks/device_s23_b.sh
set -u
. benchmarks/device_rows.sh
device_start 420
export CUDA_VISIBLE_DEVICES=${GPU:-0}
T="tests/layers/test_fp8_deferred_scale.py tests/layers/test_fp8_fused_act_quant.py tests/layers/test_fp8_gpu.py"
timeout 150 python -m pytest -q -p no:cacheprovider -m gpu $T 2>&1 \
  | grep -E "AssertionError|^E +|passed|failed|^FAILED|^ERROR" | head -30 | tee -a "$OUT/summary.txt"
for B in 8 2 16 64; do
  MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8 --batch_size $B --num_requests $B --input_len 1000 --output_len 256"
  t=35; [ "$B" = 8 ] && t=75
  row $t "b${B}_defer" ""
  row 35 "b${B}_no_defer" "SHARDLLM_FP8_DEFER_SCALE=0"
done
phase_rows
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
