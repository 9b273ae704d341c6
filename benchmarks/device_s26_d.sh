#!/usr/bin/env bash
# Twenty-first session (one H200, about 3 minutes): the norms' L2 prefetch issued before their PDL wait
# (SHARDLLM_L2_PREFETCH_EARLY=1), batch-1 8B fp8 + fp8 KV rows at 0 / 2 / 4 MB, alternating.
#     LIMIT_S=300 bash benchmarks/device_s26_d.sh
set -u
. benchmarks/device_rows.sh
device_start 300
export CUDA_VISIBLE_DEVICES=${GPU:-0}
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8 --batch_size 1 --num_requests 2 --input_len 128 --output_len 128"
row 60 "fp8_pf0" "SHARDLLM_L2_PREFETCH_MB=0"
row 60 "fp8_early4" "SHARDLLM_L2_PREFETCH_EARLY=1"
row 60 "fp8_early2" "SHARDLLM_L2_PREFETCH_EARLY=1 SHARDLLM_L2_PREFETCH_MB=2"
row 60 "fp8_pf0b" "SHARDLLM_L2_PREFETCH_MB=0"
row 60 "fp8_early4b" "SHARDLLM_L2_PREFETCH_EARLY=1"
say "total: $((SECONDS - t0)) s"; pack
