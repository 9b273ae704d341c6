#!/usr/bin/env bash
# Seventeenth session (one H200, under 10 minutes): the GPU suite at the new FP8 defaults (SHARDLLM_FP8_GEMV_MAX_M=1,
# the per-tensor route's bf16 product, no N limit), then batch 1 and 2 decode rows: the default against the GEMV up
# to 16 rows (batch 2 was not in device_s21_a.sh), and batch 1 at 128/128 (issue 13's roofline floor).
# Here: `bash benchmarks/pack_test_wheels.sh`; then with carry [".whl_test"]:
#     SUITE_LIMIT_S=380 LIMIT_S=170 bash benchmarks/device_s21_b.sh
set -u
GPU_SUITE_WORKERS=${GPU_SUITE_WORKERS:-2} SUITE_LIMIT_S=${SUITE_LIMIT_S:-380} bash benchmarks/device_gpu_suite.sh \
  > /tmp/suite_stdout.txt 2>&1
grep -E "^GPU SUITE|^FAILED|^ERROR" /tmp/suite_stdout.txt | head -30
. benchmarks/device_rows.sh
device_start 170
grep -E "^GPU SUITE" /tmp/suite_stdout.txt >> "$OUT/summary.txt"
cp /tmp/suite_stdout.txt "$w/suite_stdout.txt"
export CUDA_VISIBLE_DEVICES=${GPU:-0}
for B in 2 1; do
  MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8 --batch_size $B --num_requests $B --input_len 1000 --output_len 256"
  row 50 "b${B}_default" ""
  row 30 "b${B}_gemv16" "SHARDLLM_FP8_GEMV_MAX_M=16"
done
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8 --batch_size 1 --num_requests 2 --input_len 128 --output_len 128"
row 25 "b1_128_default" ""
phase_rows
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
