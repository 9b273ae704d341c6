#!/usr/bin/env bash
# Fourteenth session, last call (one H200, about 4 minutes: what was left of the session's device time; issue 13's
# 500 x 1000/1000 floor). SHARDLLM_FLASH_PREFILL=1: prompt chunks without cached context attend through torch's
# FlashAttention-2 varlen kernel over the step's own k, v (layers/attention/flash_prefill.py) instead of the Triton
# prefill kernel over the cache (~100 TFLOP/s in the 1000/1000 prefill phase, ~19% of its steps). 1. Its GPU tests
# (the three-way split equal to the all-Triton step and the torch reference, bf16 and fp16). 2. 500 x 1000/1000
# (8B fp8, fp8 KV) default, then with it, then the default again if time is left.
#     LIMIT_S=220 bash benchmarks/device_s15_c.sh
set -u
. benchmarks/device_rows.sh
device_start 220
export CUDA_VISIBLE_DEVICES=${GPU:-0}
timeout 60 python -m pytest -q -m gpu -p no:cacheprovider tests/layers/test_flash_prefill.py 2>&1 | tail -3 \
  | tee -a "$OUT/summary.txt"
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8 --num_requests 500 --input_len 1000 --output_len 1000"
row 75 1000_default ""
row 75 1000_flash_prefill "SHARDLLM_FLASH_PREFILL=1"
grep -h "FlashAttention prefill failed" "$w"/err_1000_flash_prefill.txt 2>/dev/null | head -2 | tee -a "$OUT/summary.txt"
row 70 1000_default_b ""
phase_rows
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
