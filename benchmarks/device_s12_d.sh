#!/usr/bin/env bash
# Twelfth session, call 4 (one H200, about 8 minutes; issue 13). 1. GPU tests that run the prefill kernel at the
# engine's new defaults (triton_prefill.prefill_config) and the warm-up. 2. Llama-3-8B fp8 + fp8 KV (transposed V):
# the new defaults beside the launch before them (SHARDLLM_PREFILL_CONFIG={}: PrefillConfig() for every step),
# alternating, at 1000 x 128/128 and 500 x 1000/1000.
#     LIMIT_S=480 bash benchmarks/device_s12_d.sh
set -u
. benchmarks/device_rows.sh
device_start 480
export CUDA_VISIBLE_DEVICES=${GPU:-0}
timeout 150 python -m pytest -q -m gpu -p no:cacheprovider tests/layers/test_triton_attention.py \
  tests/worker/test_gpu_paths.py tests/worker/test_kernel_warm_up.py tests/test_prompt_logprobs.py 2>&1 \
  | tail -4 | tee -a "$OUT/summary.txt"
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8"
T1000="--num_requests 500 --input_len 1000 --output_len 1000"
T128="--num_requests 1000 --input_len 128 --output_len 128"
row 45 128_default "" $T128
row 45 128_before "SHARDLLM_PREFILL_CONFIG={}" $T128
row 70 1000_default "" $T1000
row 70 1000_before "SHARDLLM_PREFILL_CONFIG={}" $T1000
row 70 1000_default_b "" $T1000
row 70 1000_before_b "SHARDLLM_PREFILL_CONFIG={}" $T1000
phase_rows
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
