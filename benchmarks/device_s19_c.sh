#!/usr/bin/env bash
# Sixteenth session, last call (one H200, under 3 minutes): the FP8 GPU tests with the per-tensor route on by default
# (SHARDLLM_FP8_TENSORWISE_MAX_OUTPUT = 2^20 elements, N <= 8192), then 8B fp8 + fp8 KV at batch 64 (64 requests of
# 1000 prompt and 256 output tokens): the default beside the route off, one row each.
#     LIMIT_S=140 bash benchmarks/device_s19_c.sh
set -u
. benchmarks/device_rows.sh
device_start 140
export CUDA_VISIBLE_DEVICES=${GPU:-0}
timeout 30 python -m pytest -q -p no:cacheprovider -m gpu tests/layers/test_fp8_gpu.py -k "not tiny and not experts" \
  2>&1 | tail -3 | tee -a "$OUT/summary.txt"
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8 --batch_size 64 --num_requests 64 --input_len 1000 --output_len 256"
row 75 "b64_default" ""
row 33 "b64_off" "SHARDLLM_FP8_TENSORWISE_MAX_OUTPUT=0"
phase_rows
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
