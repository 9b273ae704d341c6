#!/usr/bin/env bash
# Fourth session, call 4 (kind nvidia-h200-x2, about 8 minutes): issue 13's two-GPU rows, bf16 beside fp8, each row
# started only if the time left (LIMIT_S) covers its timeout. Default engine settings (on an H200: 1024 sequences,
# 16k tokens a step) and the repo's decode table.
#   1. Llama-3-70B fp8 + fp8 KV, tp = 2, 1000 x 128/128 (floor: TensorRT-LLM's one-GPU 3,803 x 2 = 7,606), and
#      its batch-1 latency; 70B bf16 tp = 2 beside it;
#   2. Mixtral-8x7B tp = 2, fp8 beside bf16, 1000 x 128/128 (TensorRT-LLM publishes 27,451 on 2 x H100).
# Results in $OUT/results.tgz and $OUT/summary.txt.    LIMIT_S=540 bash benchmarks/device_s4_b.sh
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-bench_out}; mkdir -p "$OUT"; w="$OUT/work"; mkdir -p "$w"
limit=${LIMIT_S:-540}; t0=$SECONDS
. benchmarks/device_rows.sh  # pack, say, b, row
T128="--num_requests 1000 --input_len 128 --output_len 128"
B1="--batch_size 1 --num_requests 2 --input_len 128 --output_len 128"
say "$(nvidia-smi --query-gpu=index,name --format=csv,noheader | tr '\n' ' ') $(date -u)"
row 170 70b_fp8kv_tp2 "" --model llama-3-70b --dtype fp8 --kv_cache_dtype fp8 --tp_size 2 $T128
row 120 70b_fp8_tp2_b1 "" --model llama-3-70b --dtype fp8 --tp_size 2 $B1
row 130 mixtral_fp8_tp2 "" --model mixtral-8x7b --dtype fp8 --tp_size 2 $T128
row 130 mixtral_bf16_tp2 "" --model mixtral-8x7b --tp_size 2 $T128
row 150 70b_bf16_tp2 "" --model llama-3-70b --tp_size 2 $T128
say "total: $((SECONDS - t0)) s"; pack
