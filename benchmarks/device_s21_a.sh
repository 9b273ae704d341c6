#!/usr/bin/env bash
# Seventeenth session (one H200, about 6 minutes; ran at a0e52b5, while SHARDLLM_FP8_TENSORWISE_MAX_N existed).
# device_s20_a.sh's kernel table showed the small-M FP8 GEMV at
# M = 16 slower than cuBLAS's per-tensor route in every Llama-3-8B shape (qkv 21.3 vs 8.8 us, o 13.6 vs 7.4,
# gate_up 43.2 vs 34.2, down 25.6 vs 21.7), and batch 4-16 decode steps cost 1.6-1.9 ms more than batch 1's.
# Here: where the GEMV should stop (SHARDLLM_FP8_GEMV_MAX_M, new; default 16). 1. The FP8 GPU tests (a new one: the
# GEMM from one row). 2. `fp8_gemm.py --recipes` at M = 1-16 (gemv and the per-token quantization beside the
# routes). 3. 8B fp8 + fp8 KV, B requests of 1000 prompt and 256 output tokens at batch size B: the GEMV (default)
# against the FP8 GEMM from 1 row at B = 1 and from 2 rows at B = 4, 8, 16, with the route's bf16 product and no N
# limit (gate_up in), and at B = 8 with neither; at B = 32 the bf16 product with and without gate_up.
#     LIMIT_S=450 bash benchmarks/device_s21_a.sh
set -u
. benchmarks/device_rows.sh
device_start 450
export CUDA_VISIBLE_DEVICES=${GPU:-0}
timeout 60 python -m pytest -q -p no:cacheprovider -m gpu tests/layers/test_fp8_gpu.py -k "not tiny and not experts" \
  2>&1 | tail -3 | tee -a "$OUT/summary.txt"
timeout 75 python benchmarks/fp8_gemm.py --recipes --ms 1 2 4 8 16 > "$w/recipes.jsonl" 2> "$w/recipes_err.txt"
recipe_table "$w/recipes.jsonl"
GEMM="SHARDLLM_FP8_TENSORWISE_FP32=0 SHARDLLM_FP8_TENSORWISE_MAX_N=0"
for B in 8 1 4 16; do
  MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8 --batch_size $B --num_requests $B --input_len 1000 --output_len 256"
  row 75 "b${B}_gemv" ""  # the first row meets a cold Triton cache
  row 40 "b${B}_gemm" "SHARDLLM_FP8_GEMV_MAX_M=$([ "$B" = 1 ] && echo 0 || echo 1) $GEMM"
  [ "$B" = 8 ] && row 40 "b8_gemm_fp32_narrow" "SHARDLLM_FP8_GEMV_MAX_M=1"
done
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8 --batch_size 32 --num_requests 32 --input_len 1000 --output_len 256"
row 40 "b32_bf16_product" "SHARDLLM_FP8_TENSORWISE_FP32=0"
row 40 "b32_bf16_any_n" "$GEMM"
phase_rows
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
