#!/usr/bin/env bash
# Eleventh session, call 1 (kind nvidia-h200-x2, about 9.5 minutes; issue 13's two-GPU rows, first measured since
# fast accumulation landed). Each row starts only if the time left covers its timeout.
#   1. Llama-3-70B fp8 + fp8 KV, tp = 2, 1000 x 128/128 (floor 2 x 3,803 = 7,606; 6,192 in the sixth session), the
#      default beside the two-micro-batch overlap of the all-reduce (SHARDLLM_TP_OVERLAP=1: at 70B NCCL was 16% of a
#      batch-1024 step); its batch-1 latency;
#   2. Mixtral-8x7B tp = 2 ep = 2, fp8 beside bf16 (TensorRT-LLM publishes 27,451 on 2 x H100).
#     LIMIT_S=570 bash benchmarks/device_s11_c.sh
set -u
. benchmarks/device_rows.sh
device_start 570
T128="--num_requests 1000 --input_len 128 --output_len 128"
B1="--batch_size 1 --num_requests 2 --input_len 128 --output_len 128"
MODEL_FLAGS="--model llama-3-70b --dtype fp8 --kv_cache_dtype fp8 --tp_size 2"
row 150 70b_tp2_default "" $T128
row 150 70b_tp2_overlap "SHARDLLM_TP_OVERLAP=1" $T128
row 100 70b_tp2_b1 "" $B1
MODEL_FLAGS="--model mixtral-8x7b --tp_size 2 --ep_size 2"
row 110 mixtral_fp8_tp2_ep2 "" --dtype fp8 $T128
row 110 mixtral_bf16_tp2_ep2 "" $T128
phase_rows
say "total: $((SECONDS - t0)) s"; pack
