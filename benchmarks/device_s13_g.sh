#!/usr/bin/env bash
# Thirteenth session, last call (one H200, about 10 minutes; issue 13). The whole GPU suite at this session's defaults
# (SHARDLLM_GEMV_W_EARLY=2, the FP8 cache's 1-row TMA decode entry) on two workers (multi-GPU tests skip on one
# GPU), then, in the time left, Llama-3-70B fp8 + fp8 KV on this one GPU at 1000 x 128/128 (tenth session 3,845;
# TensorRT-LLM 3,803). Needs `bash benchmarks/pack_test_wheels.sh` here and carry [".whl_test"].
#     LIMIT_S=560 bash benchmarks/device_s13_g.sh
set -u
. benchmarks/device_rows.sh
device_start 560
OUT="$OUT" SUITE_LIMIT_S=${SUITE_LIMIT_S:-330} GPU_SUITE_WORKERS=2 bash benchmarks/device_gpu_suite.sh > "$w/suite.txt" 2>&1
say "suite rc $?"
grep -E "passed|failed|FAILED|ERROR|skipped" "$w/suite.txt" | tail -15 | cut -c1-300 | tee -a "$OUT/summary.txt"
pack
export CUDA_VISIBLE_DEVICES=0
MODEL_FLAGS="--model llama-3-70b --dtype fp8 --kv_cache_dtype fp8"
row 150 70b_128_default "" --num_requests 1000 --input_len 128 --output_len 128
phase_rows
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
