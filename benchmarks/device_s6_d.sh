#!/usr/bin/env bash
# Sixth session, fourth call (one H200, about 5 minutes): the FP8 cache's new default (64-token blocks, the decode
# table's TMA entries without page_chunk past 16-token pages) beside the old (--block_size 16), one row at a time on
# one GPU, and the bf16 cache beside them at 1000/1000 (issue 13: "FP8 KV cache at 1000/1000: report beside bf16").
# Results in $OUT/results.tgz and $OUT/summary.txt.    LIMIT_S=300 bash benchmarks/device_s6_d.sh
set -u
. benchmarks/device_rows.sh  # device_start, pack, say, b, row
device_start 300
export CUDA_VISIBLE_DEVICES=0
MODEL_FLAGS="--model llama-3-8b --dtype fp8"
T1000="--num_requests 500 --input_len 1000 --output_len 1000"
T128="--num_requests 1000 --input_len 128 --output_len 128"
row 75 fp8kv_1000_default "" --kv_cache_dtype fp8 $T1000
row 75 fp8kv_1000_bs16 "" --kv_cache_dtype fp8 --block_size 16 $T1000
row 55 fp8kv_128_default "" --kv_cache_dtype fp8 $T128
row 55 fp8kv_128_bs16 "" --kv_cache_dtype fp8 --block_size 16 $T128
row 80 bf16kv_1000 "" $T1000
say "total: $((SECONDS - t0)) s"; pack
