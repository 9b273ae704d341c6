#!/usr/bin/env bash
# Twelfth session, call 2 (one H200, about 9.5 minutes; issue 13). 1. GPU tests of the prefill launch variants with
# the new per-layout defaults (triton_prefill.prefill_config: STANDARD, V_T_LONG). 2. Llama-3-8B fp8 + fp8 KV at
# 500 x 1000/1000 and 1000 x 128/128: the two-micro-batch overlap at tp 1 (one half's decode attention beside the
# other half's GEMMs: SHARDLLM_TP_OVERLAP=1 SHARDLLM_TP_OVERLAP_AT_TP1=1) beside the default, alternating; the default
# row under triton_compile_log with a cold Triton cache (late compiles: the V_T_LONG launch must be warmed up).
# 3. The bf16 cache (kv_cache_dtype auto) at 1000/1000: the earlier launch (SHARDLLM_PREFILL_CONFIG={}, i.e.
# PrefillConfig()) beside the new STANDARD default.
#     LIMIT_S=560 bash benchmarks/device_s12_b.sh
set -u
. benchmarks/device_rows.sh
device_start 560
export CUDA_VISIBLE_DEVICES=${GPU:-0}
timeout 100 python -m pytest -q -m gpu -p no:cacheprovider tests/layers/test_prefill_configs.py 2>&1 \
  | tail -3 | tee -a "$OUT/summary.txt"
BENCH="python benchmarks/triton_compile_log.py shardllm.bench.throughput"
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8"
T1000="--num_requests 500 --input_len 1000 --output_len 1000"
T128="--num_requests 1000 --input_len 128 --output_len 128"
OV="SHARDLLM_TP_OVERLAP=1 SHARDLLM_TP_OVERLAP_AT_TP1=1"
row 80 1000_default "TRITON_CACHE_DIR=$w/tc_cold" $T1000; late_compiles 1000_default
row 75 1000_overlap "$OV" $T1000; late_compiles 1000_overlap
row 50 128_default "" $T128
row 50 128_overlap "$OV" $T128
MODEL_FLAGS="--model llama-3-8b --dtype fp8"
row 75 1000_bf16kv_before "SHARDLLM_PREFILL_CONFIG={}" $T1000
row 75 1000_bf16kv_default "" $T1000
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8"
row 75 1000_default_b "" $T1000
row 75 1000_overlap_b "$OV" $T1000
phase_rows
say "total: $((SECONDS - t0)) s"; rm -rf "$w/tc_cold"; pack
rm -rf "$w"
