#!/usr/bin/env bash
# Queued by the fourteenth session (one H200, about 5 minutes; issue 13's 500 x 1000/1000 floor). Its last call ran
# SHARDLLM_FLASH_PREFILL=1 at 1000/1000 with no change (17,168 against 17,158 / 17,157 out tok/s, prefill phase 7.55
# s against 7.53 / 7.49) but no line said whether the engine's steps took FlashAttention. 1. The kernels alone:
# benchmarks/prefill_sweep.py's engine launch beside torch's FlashAttention-2 on the fresh 16 x 1000 and 128 x 128
# prefill steps (us a layer, TFLOP/s). 2. 1000/1000 default and with it, alternating, twice, and the announcement
# ("FlashAttention prefill took ...") from its log. If FlashAttention is 2x+ the kernel's speed and the run gains
# 2%+, make it the default.
#     LIMIT_S=360 bash benchmarks/device_s16_a.sh
set -u
. benchmarks/device_rows.sh
device_start 360
export CUDA_VISIBLE_DEVICES=${GPU:-0}
timeout 90 python benchmarks/prefill_sweep.py --cases 16x1000 128x128 --layouts vt --configs '[{}]' --flash 2>&1 \
  | grep -v -i warn | tee -a "$OUT/summary.txt"
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8 --num_requests 500 --input_len 1000 --output_len 1000"
for r in a b; do
  row 70 "1000_default_$r" ""
  row 70 "1000_flash_prefill_$r" "SHARDLLM_FLASH_PREFILL=1"
done
grep -h "FlashAttention prefill" "$w"/err_1000_flash_prefill_*.txt 2>/dev/null | sort | uniq -c | tee -a "$OUT/summary.txt"
phase_rows
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
