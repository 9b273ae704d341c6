#!/usr/bin/env bash
# Sixteenth session (one H200, about 4 minutes; decode batches of 17-256). SHARDLLM_FP8_TENSORWISE_MAX_OUTPUT (M x N
# elements, N <= 8192; at commit f69831f SHARDLLM_FP8_SMALL_M_TENSORWISE, a row bound for every shape, run at 0 and
# 256): row-wise FP8 GEMMs within it run as cuBLAS's per-tensor kernel with unit scales into fp32 plus one Triton launch
# applying the token and channel scales (the tenth session measured the row-wise kernel at 2x the per-tensor one's
# time at M = 64 for N = 4096). 1. GPU tests of it. 2. `fp8_gemm.py --recipes` at M = 32-512 (Llama-3-8B shapes).
# 3. 8B fp8 + fp8 KV, B requests of 1000 prompt and 256 output tokens at batch size B = 64 and 256, off and default.
#     LIMIT_S=280 bash benchmarks/device_s19_b.sh
set -u
. benchmarks/device_rows.sh
device_start 280
export CUDA_VISIBLE_DEVICES=${GPU:-0}
timeout 60 python -m pytest -q -p no:cacheprovider -m gpu tests/layers/test_fp8_gpu.py -k "per_tensor or probe" 2>&1 \
  | tail -3 | tee -a "$OUT/summary.txt"
timeout 60 python benchmarks/fp8_gemm.py --recipes --ms 32 64 128 256 512 > "$w/recipes.jsonl" 2> "$w/recipes_err.txt"
recipe_table "$w/recipes.jsonl"
for B in 64 256; do
  MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8 --batch_size $B --num_requests $B --input_len 1000 --output_len 256"
  row 75 "b${B}_off" "SHARDLLM_FP8_TENSORWISE_MAX_OUTPUT=0"  # the first row meets a cold Triton cache
  row 40 "b${B}_default" ""
done
phase_rows
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
