#!/usr/bin/env bash
# Issue 13's rows not yet measured, two H200s (kind nvidia-h200-x2), about 9 minutes; run after device_next.sh has
# confirmed the new paths (TABLE: the decode-config JSON to try, e.g. the sweep's table.json; default: the repo's).
#   1. Llama-3-70B fp8 + fp8 KV at tp = 2, 1000 x 128/128 (TensorRT-LLM's one-GPU 3,803 x 2 = 7,606 is the floor),
#      and its batch-1 latency;
#   2. Mixtral-8x7B at tp = 2, bf16 beside fp8, 1000 x 128/128 (TensorRT-LLM publishes 27,451 on 2 x H100);
#   3. Llama-3-8B fp8 + fp8 KV 500 x 1000/1000 on one GPU beside the bf16 cache on the other (floor 17,744).
# Step limits are the engine's defaults (1024 sequences, 16k tokens on an H200). Results packed into
# $OUT/results.tgz and $OUT/summary.txt (the device returns at most 8 files).
#   TABLE="$(tr -d " " < table.json)" bash benchmarks/device_next_b.sh     (the JSON without spaces)
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-bench_out}; mkdir -p "$OUT"; w="$OUT/work"; mkdir -p "$w"; t0=$SECONDS
. benchmarks/device_rows.sh  # pack, say, b
ENVS="SHARDLLM_DECODE_CONFIGS=${TABLE:-{\}}"
T128="--num_requests 1000 --input_len 128 --output_len 128"
B1="--batch_size 1 --num_requests 2 --input_len 128 --output_len 128"
say "$(nvidia-smi --query-gpu=index,name --format=csv,noheader | tr '\n' ' ') $(date -u)  $ENVS"
T=200 b 70b_fp8kv_tp2 "$ENVS" --model llama-3-70b --dtype fp8 --kv_cache_dtype fp8 --tp_size 2 $T128; pack
T=150 b 70b_fp8_tp2_b1 "$ENVS" --model llama-3-70b --dtype fp8 --tp_size 2 $B1; pack
T=200 b mixtral_bf16_tp2 "$ENVS" --model mixtral-8x7b --tp_size 2 $T128; pack
T=200 b mixtral_fp8_tp2 "$ENVS" --model mixtral-8x7b --dtype fp8 --tp_size 2 $T128; pack
T1000="--num_requests 500 --input_len 1000 --output_len 1000 --max_batch_size 512"
b 8b_fp8kv_1000 "CUDA_VISIBLE_DEVICES=0 $ENVS" --model llama-3-8b --dtype fp8 --kv_cache_dtype fp8 $T1000 &
b 8b_fp8_1000_bf16kv "CUDA_VISIBLE_DEVICES=1 $ENVS" --model llama-3-8b --dtype fp8 $T1000 & wait
say "total: $((SECONDS - t0)) s"; pack
