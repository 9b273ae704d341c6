#!/usr/bin/env bash
# Eighteenth session (one H200, about 5 minutes). What the decode attention's split reduce costs a batch-1 fp8 step
# (its kernel: 1.9 us a layer with PDL off, sixteenth-session profile): the batch-1 entry's partitions (8) against
# 1, 2 and 4 through SHARDLLM_DECODE_CONFIGS (one partition: no reduce launch), at 128/128 (the roofline row: 128-256
# tokens of context, 2-4 64-token pages) and 1000/128 (16-18 pages). Rows alternate; the default runs twice.
#     LIMIT_S=330 bash benchmarks/device_s23_a.sh
set -u
. benchmarks/device_rows.sh
device_start 330
export CUDA_VISIBLE_DEVICES=${GPU:-0}
cfg() { echo "SHARDLLM_DECODE_CONFIGS={\"fp8_e4m3/128/1/64\":{\"num_splits\":$1,\"num_stages\":3,\"num_warps\":2,\"prefetch_pages\":true,\"tma\":true}}"; }
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8 --batch_size 1 --num_requests 2 --input_len 128 --output_len 128"
row 80 "b1_128_default" ""
row 35 "b1_128_splits1" "$(cfg 1)"
row 35 "b1_128_splits2" "$(cfg 2)"
row 35 "b1_128_splits4" "$(cfg 4)"
row 35 "b1_128_default2" ""
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8 --batch_size 1 --num_requests 2 --input_len 1000 --output_len 128"
row 35 "b1_1000_default" ""
row 35 "b1_1000_splits1" "$(cfg 1)"
row 35 "b1_1000_splits2" "$(cfg 2)"
phase_rows
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
