#!/usr/bin/env bash
# Queued by the twelfth session (kind nvidia-h200-x2, about 10 minutes; issue 13's 70B tp 2 floor, 7,606; 6,471 in
# the eleventh session, its prefill phase 9.23 of 19.78 s with 160 all-reduces of 256 MiB per 16k-token step).
# Llama-3-70B fp8 + fp8 KV, tp = 2, 1000 x 128/128: the default; the two-micro-batch overlap of steps with prompt
# chunks only (SHARDLLM_TP_OVERLAP_PREFILL=1, decode split off by a huge MIN_TOKENS); both splits; both splits with
# the GEMMs inside them leaving 16 SMs to NCCL's kernels (SHARDLLM_TP_OVERLAP_SM_CARVEOUT, thirteenth session: an
# all-reduce beside a GEMM that holds every SM waits for it).
#     LIMIT_S=590 bash benchmarks/device_s13_a.sh   (the fourth row only if ~150 s are left)
set -u
. benchmarks/device_rows.sh
device_start 590
T128="--num_requests 1000 --input_len 128 --output_len 128"
MODEL_FLAGS="--model llama-3-70b --dtype fp8 --kv_cache_dtype fp8 --tp_size 2"
row 150 70b_tp2_default "" $T128
row 150 70b_tp2_prefill_split "SHARDLLM_TP_OVERLAP=1 SHARDLLM_TP_OVERLAP_PREFILL=1 SHARDLLM_TP_OVERLAP_MIN_TOKENS=1000000" $T128
row 150 70b_tp2_both_splits "SHARDLLM_TP_OVERLAP=1 SHARDLLM_TP_OVERLAP_PREFILL=1" $T128
row 150 70b_tp2_both_c16 "SHARDLLM_TP_OVERLAP=1 SHARDLLM_TP_OVERLAP_PREFILL=1 SHARDLLM_TP_OVERLAP_SM_CARVEOUT=16" $T128
phase_rows
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
