#!/usr/bin/env bash
# Sixth session, fifth call (one H200, about 6 minutes): the decode table for the FP8 cache's 64-token pages.
#   1. `attention_sweep.py --block_size 64` over the FP8 cache: batch 512 at 170 and 1500 tokens (one entry: the
#      128/128 and 1000/1000 workloads share bucket 512), 256 x 170, 64 x 1000, 1 x 200;
#   2. its table end to end (SHARDLLM_DECODE_CONFIGS) beside the repo's (64-token pages with the 16-token table's
#      entries, page_chunk dropped): 8B fp8 + fp8 KV, 500 x 1000/1000 and 1000 x 128/128, one row at a time.
# Results in $OUT/results.tgz and $OUT/summary.txt.    LIMIT_S=400 bash benchmarks/device_s6_e.sh
set -u
. benchmarks/device_rows.sh  # device_start, pack, say, b, row
device_start 400
export CUDA_VISIBLE_DEVICES=0
timeout ${SWEEP_S:-150} python benchmarks/attention_sweep.py --block_size 64 --dtypes fp8_e4m3 --budget_s ${BUDGET_S:-80} \
  --cases 512x1500 512x170 256x170 64x1000 1x200 --out "$w/sweep64.jsonl" > "$w/sweep64.txt" 2>&1
say "sweep rc=$?"; grep -E "^(b=|  entry|precompiled|sweep)" "$w/sweep64.txt" | tee -a "$OUT/summary.txt"; pack
table=$(grep "^DECODE_CONFIGS = " "$w/sweep64.txt" | sed 's/^DECODE_CONFIGS = //' | tr -d ' ')  # no spaces: b splits ENVS on them
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8"
T1000="--num_requests 500 --input_len 1000 --output_len 1000"
T128="--num_requests 1000 --input_len 128 --output_len 128"
if [ -n "$table" ]; then
  say "swept table: $table"
  row 75 fp8kv_1000_swept64 "SHARDLLM_DECODE_CONFIGS=$table" $T1000
  row 75 fp8kv_1000_repo "" $T1000
  row 55 fp8kv_128_swept64 "SHARDLLM_DECODE_CONFIGS=$table" $T128
  row 55 fp8kv_128_repo "" $T128
fi
say "total: $((SECONDS - t0)) s"; pack
