#!/usr/bin/env bash
# (The CUDA GEMV these calls measured was removed after them; its code, with this script's, is at commit 86ce489.)
# Nineteenth session, call 5 (one H200, about 4 minutes). The register form with the fused SiLU down GEMV kept on
# Triton (its bit-equality probe now compares Triton with Triton), at 4 / 16 / 32 blocks an SM (16: about one row a
# warp, as the CUDA probe of the fourteenth session); kernels (PDL on and off), then 8B fp8 + fp8 KV batch 1 128/128
# TPOT against Triton, alternating.
#     LIMIT_S=330 bash benchmarks/device_s24_d.sh
set -u
. benchmarks/device_rows.sh
device_start 330
export CUDA_VISIBLE_DEVICES=${GPU:-0}
timeout 60 python benchmarks/cuda_gemv_bench.py --variants reg:4 reg:16 reg:32 > "$w/kernels.jsonl" 2> "$w/kernels_err.txt"
SHARDLLM_PDL=0 timeout 50 python benchmarks/cuda_gemv_bench.py --variants reg:4 reg:16 > "$w/kernels_nopdl.jsonl" 2>> "$w/kernels_err.txt"
tail -2 "$w/kernels_err.txt" >> "$OUT/summary.txt"
pack
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8 --batch_size 1 --num_requests 2 --input_len 128 --output_len 128"
row 90 "triton" "SHARDLLM_CUDA_GEMV=0"
row 45 "reg_b4" "SHARDLLM_CUDA_GEMV=1 SHARDLLM_CUDA_GEMV_BLOCKS_PER_SM=4"
row 45 "reg_b16" "SHARDLLM_CUDA_GEMV=1 SHARDLLM_CUDA_GEMV_BLOCKS_PER_SM=16"
row 40 "triton_2" "SHARDLLM_CUDA_GEMV=0"
row 45 "reg_b32" "SHARDLLM_CUDA_GEMV=1 SHARDLLM_CUDA_GEMV_BLOCKS_PER_SM=32"
row 45 "reg_b16_2" "SHARDLLM_CUDA_GEMV=1 SHARDLLM_CUDA_GEMV_BLOCKS_PER_SM=16"
grep -h "fused SiLU\|CUDA GEMV" "$w"/err_reg*.txt | sort | uniq -c | head -5 | tee -a "$OUT/summary.txt"
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
