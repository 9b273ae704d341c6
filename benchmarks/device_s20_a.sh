#!/usr/bin/env bash
# Queued by the sixteenth session (one H200, about 6 minutes): the per-tensor route of few-row FP8 GEMMs, on by
# default since that session (SHARDLLM_FP8_TENSORWISE_MAX_OUTPUT = 2^20 output elements, N <= 8192) from kernel
# timings alone, and its bf16-product variant (SHARDLLM_FP8_TENSORWISE_FP32=0, off). 1. The FP8 GPU tests (the
# route's own, and the fast-accumulation test on both paths). 2. `fp8_gemm.py --recipes` at M = 16-1024: does the
# bf16 product widen where the route wins? At M = 16, is the small-M GEMV (the engine's up to 16 rows) still
# faster than the route (else GEMV_MAX_M should come down)? 3. 8B fp8 + fp8 KV, B requests of 1000 prompt and 256
# output tokens at batch size B = 64 and 256: the route off, the default, and the bf16 product. Keep the default if batch 64 gains
# and batch 256 does not lose in this call; else set it to 0 (envs and fp8_utils).
#     LIMIT_S=330 bash benchmarks/device_s20_a.sh
set -u
. benchmarks/device_rows.sh
device_start 330
export CUDA_VISIBLE_DEVICES=${GPU:-0}
timeout 45 python -m pytest -q -p no:cacheprovider -m gpu tests/layers/test_fp8_gpu.py -k "not tiny and not experts" \
  2>&1 | tail -3 | tee -a "$OUT/summary.txt"
timeout 75 python benchmarks/fp8_gemm.py --recipes --ms 16 32 64 256 512 1024 > "$w/recipes.jsonl" 2> "$w/recipes_err.txt"
recipe_table "$w/recipes.jsonl"
for B in 64 256; do
  MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8 --batch_size $B --num_requests $B --input_len 1000 --output_len 256"
  row 75 "b${B}_off" "SHARDLLM_FP8_TENSORWISE_MAX_OUTPUT=0"  # the first row meets a cold Triton cache
  row 40 "b${B}_default" ""
  row 40 "b${B}_bf16_product" "SHARDLLM_FP8_TENSORWISE_FP32=0"
done
phase_rows
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
