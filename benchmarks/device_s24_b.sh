#!/usr/bin/env bash
# (The CUDA GEMV these calls measured was removed after them; its code, with this script's, is at commit 86ce489.)
# Nineteenth session, call 2 (one H200, about 8 minutes). The CUDA GEMV's register-streaming form (csrc/
# fp8_gemv_reg.cu: a warp streams its rows through registers, first piece loaded before the PDL wait) beside the
# shared-memory ring of call 1. 1. GPU tests. 2. Kernel by kernel, PDL on and off. 3. 8B fp8 + fp8 KV batch 1
# 128/128 TPOT, Triton against the register form at 1-3 blocks an SM, alternating.
#     LIMIT_S=540 bash benchmarks/device_s24_b.sh
set -u
. benchmarks/device_rows.sh
device_start 540
export CUDA_VISIBLE_DEVICES=${GPU:-0}
timeout 200 python -m pytest -q -p no:cacheprovider -m gpu tests/layers/test_cuda_gemv.py 2>&1 \
  | grep -E "AssertionError|^E +|passed|failed|^FAILED|^ERROR|Error" | head -30 | tee -a "$OUT/summary.txt"
timeout 100 python benchmarks/cuda_gemv_bench.py --variants reg:1 reg:2 reg:4 tma:4:2 > "$w/kernels.jsonl" 2> "$w/kernels_err.txt"
SHARDLLM_PDL=0 timeout 60 python benchmarks/cuda_gemv_bench.py --variants reg:2 reg:4 > "$w/kernels_nopdl.jsonl" 2>> "$w/kernels_err.txt"
tail -3 "$w/kernels_err.txt" >> "$OUT/summary.txt"
pack
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8 --batch_size 1 --num_requests 2 --input_len 128 --output_len 128"
row 90 "triton" "SHARDLLM_CUDA_GEMV=0"
row 50 "reg_b1" "SHARDLLM_CUDA_GEMV=1 SHARDLLM_CUDA_GEMV_BLOCKS_PER_SM=1"
row 50 "reg_b2" "SHARDLLM_CUDA_GEMV=1 SHARDLLM_CUDA_GEMV_BLOCKS_PER_SM=2"
row 40 "triton_2" "SHARDLLM_CUDA_GEMV=0"
row 50 "reg_b4" "SHARDLLM_CUDA_GEMV=1 SHARDLLM_CUDA_GEMV_BLOCKS_PER_SM=4"
row 50 "reg_b2_2" "SHARDLLM_CUDA_GEMV=1 SHARDLLM_CUDA_GEMV_BLOCKS_PER_SM=2"
grep -h "CUDA GEMV" "$w"/err_*.txt | sort | uniq -c | head -5 | tee -a "$OUT/summary.txt"
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
