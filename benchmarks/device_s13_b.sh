#!/usr/bin/env bash
# Queued by the twelfth session (one H200, about 9.5 minutes; issue 13's 500 x 1000/1000 margin). The decode attention
# is 53% of a 1000/1000 decode step (8.73 of 16.56 ms at 512 x 1000, 3.8 TB/s), and its launch for the transposed V
# cache (the FP8 cache's default on sm90 since the eleventh session) was never swept. 1. benchmarks/attention_sweep.py
# --v_transposed at 64-token pages (the engine's current launch against VT_GRID and other partition counts). 2. Llama-3-8B
# fp8 + fp8 KV, 500 x 1000/1000 and 1000 x 128/128 with the sweep's table (SHARDLLM_DECODE_CONFIGS) beside the default,
# alternating.
#     LIMIT_S=560 bash benchmarks/device_s13_b.sh
set -u
. benchmarks/device_rows.sh
device_start 560
export CUDA_VISIBLE_DEVICES=${GPU:-0}
timeout 260 python benchmarks/attention_sweep.py --v_transposed --block_size 64 --dtypes fp8_e4m3 \
  --cases 512x1000 512x1500 256x1000 64x1000 1x200 --budget_s 200 --out "$w/sweep_rows.jsonl" > "$w/sweep.txt" 2>&1
grep -E "^b=|entry|DECODE_CONFIGS|sweep|precompiled" "$w/sweep.txt" | cut -c1-300 | tee -a "$OUT/summary.txt"
pack
TABLE=$(sed -n 's/^DECODE_CONFIGS = //p' "$w/sweep.txt" | tr -d ' ')
say "table: ${TABLE:-none}"
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8"
T1000="--num_requests 500 --input_len 1000 --output_len 1000"
if [ -n "$TABLE" ] && [ "$TABLE" != "{}" ]; then
  row 75 1000_default "" $T1000
  row 75 1000_swept "SHARDLLM_DECODE_CONFIGS=$TABLE" $T1000
  row 75 1000_default_b "" $T1000
  row 75 1000_swept_b "SHARDLLM_DECODE_CONFIGS=$TABLE" $T1000
  row 50 128_default "" --num_requests 1000 --input_len 128 --output_len 128
  row 50 128_swept "SHARDLLM_DECODE_CONFIGS=$TABLE" --num_requests 1000 --input_len 128 --output_len 128
fi
phase_rows
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
