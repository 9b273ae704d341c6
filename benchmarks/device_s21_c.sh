#!/usr/bin/env bash
# Seventeenth session (one H200, about 7 minutes). 1. The four GPU tests device_s21_b.sh's suite failed at the new
# FP8 defaults (the route's bf16 product: the fast-accumulation test's bound, and the MoE oracle loop now taking
# the fp32 product), at the defaults and with the route off. 2. Issue 13's throughput floors at the new defaults
# (the route's product in bf16, gate_up in it up to 36 rows) against SHARDLLM_FP8_TENSORWISE_FP32=1.
#     LIMIT_S=430 bash benchmarks/device_s21_c.sh
set -u
. benchmarks/device_rows.sh
device_start 430
export CUDA_VISIBLE_DEVICES=${GPU:-0}
T="tests/layers/test_fp8_gpu.py tests/layers/test_fp8_moe_gpu.py"
K="fast_accumulation or experts_grouped or each_format or route or below_the_gemv or online_linear"
for e in "" "SHARDLLM_FP8_TENSORWISE_MAX_OUTPUT=0"; do
  say "tests with '$e':"
  env $e timeout 90 python -m pytest -q -p no:cacheprovider -m gpu $T -k "$K" 2>&1 \
    | grep -E "AssertionError: \(|^E +assert|passed|failed" | head -12 | tee -a "$OUT/summary.txt"
done
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8 --num_requests 500 --input_len 1000 --output_len 1000"
row 100 "1000_default" ""
row 75 "1000_fp32_product" "SHARDLLM_FP8_TENSORWISE_FP32=1"
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8 --num_requests 1000 --input_len 128 --output_len 128"
row 55 "128_default" ""
row 55 "128_fp32_product" "SHARDLLM_FP8_TENSORWISE_FP32=1"
phase_rows
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
