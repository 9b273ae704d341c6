#!/usr/bin/env bash
# Tenth session, call 4 (one H200, about 8 minutes; issue 13). The shipped defaults after this session's changes (fast
# accumulation up to K = 8192; the 64-token FP8-cache decode entries with page ids an iteration ahead): GPU tests of
# the decode kernels and of the start-up warm-up (no compile after it with the new table); the 256 bucket, which
# call 3 did not time (256 x 170 / 256 x 1000, the old entry beside the new); then 8B fp8 + fp8 KV at the defaults,
# 500 x 1000/1000 and 1000 x 128/128; then Llama-3-70B fp8 + fp8 KV on this one GPU at 1000 x 128/128, the default
# beside SHARDLLM_FP8_FAST_ACCUM_MAX_K=0 (3,548 in the seventh session; TensorRT-LLM 3,803).
#     LIMIT_S=520 bash benchmarks/device_s10_d.sh
set -u
. benchmarks/device_rows.sh
device_start 520
export CUDA_VISIBLE_DEVICES=0
timeout 100 python -m pytest -q -m gpu -p no:cacheprovider tests/worker/test_kernel_warm_up.py \
  tests/layers/test_decode_attention_tma.py 2>&1 | tail -3 | tee -a "$OUT/summary.txt"
timeout 60 python benchmarks/fp8_attention_kernel.py --cases 256x170 256x1000 --block_sizes 64 --configs \
  '[{"tma": true, "num_warps": 2, "num_stages": 4}, {"tma": true, "num_warps": 2, "num_stages": 3, "prefetch_pages": true}]' \
  2>&1 | tee "$w/kernel.jsonl" | tee -a "$OUT/summary.txt"
pack
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8"
row 75 1000_default "" --num_requests 500 --input_len 1000 --output_len 1000
row 50 128_default "" --num_requests 1000 --input_len 128 --output_len 128
MODEL_FLAGS="--model llama-3-70b --dtype fp8 --kv_cache_dtype fp8"
row 140 70b_128_default "" --num_requests 1000 --input_len 128 --output_len 128
row 140 70b_128_exact "SHARDLLM_FP8_FAST_ACCUM_MAX_K=0" --num_requests 1000 --input_len 128 --output_len 128
phase_rows
pack
