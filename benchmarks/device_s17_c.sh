#!/usr/bin/env bash
# Fifteenth session (one H200, about 2 minutes; issue 13's batch 1). device_s17_b.sh found the one-row GEMV configs
# for o and gate_up 8% slower end to end under PDL though faster alone: the same rows with PDL off, and with the
# early weight tile off (SHARDLLM_GEMV_W_EARLY=0), to tell whether PDL is what they lose to.
#     LIMIT_S=240 bash benchmarks/device_s17_c.sh
set -u
. benchmarks/device_rows.sh
device_start 240
export CUDA_VISIBLE_DEVICES=${GPU:-0}
A='{"fp8":{"4096x4096":{"1":[0,1,2048,1,2,3,0]},"28672x4096":{"1":[0,1,2048,1,2,3,0]}}}'
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8 --batch_size 1 --num_requests 2 --input_len 128 --output_len 128"
for r in a b; do
  row 70 "b1_pdl0_default_$r" "SHARDLLM_PDL=0"
  row 70 "b1_pdl0_o_gateup_$r" "SHARDLLM_PDL=0 SHARDLLM_GEMV_CONFIGS=$A"
done
row 70 "b1_wearly0_o_gateup" "SHARDLLM_GEMV_W_EARLY=0 SHARDLLM_GEMV_CONFIGS=$A"
say "total: $((SECONDS - t0)) s"
rm -rf "$w"
