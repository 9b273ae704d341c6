#!/usr/bin/env bash
# (The CUDA GEMV these calls measured was removed after them; its code, with this script's, is at commit 86ce489.)
# Nineteenth session (one H200, about 9 minutes). The batch-1 FP8 GEMV in CUDA (layers/cuda_gemv.py: NVRTC-compiled,
# weights streamed into shared memory by bulk copies issued before the PDL wait; SHARDLLM_CUDA_GEMV, off by
# default). 1. Its GPU tests. 2. Kernel by kernel against the Triton GEMV (benchmarks/cuda_gemv_bench.py). 3.
# Llama-3-8B fp8 + fp8 KV batch 1, 128/128, TPOT: Triton against CUDA at a few ring depths, alternating.
#     LIMIT_S=560 bash benchmarks/device_s24_a.sh
set -u
. benchmarks/device_rows.sh
device_start 560
export CUDA_VISIBLE_DEVICES=${GPU:-0}
timeout 170 python -m pytest -q -p no:cacheprovider -m gpu tests/layers/test_cuda_gemv.py -x 2>&1 \
  | grep -E "AssertionError|^E +|passed|failed|^FAILED|^ERROR|Error" | head -30 | tee -a "$OUT/summary.txt"
timeout 120 python benchmarks/cuda_gemv_bench.py --stages 4 8 --blocks_per_sm 1 2 > "$w/kernels.jsonl" 2> "$w/kernels_err.txt"
tail -3 "$w/kernels_err.txt" >> "$OUT/summary.txt"
cat "$w/kernels.jsonl" | tee -a "$OUT/summary.txt" > /dev/null
pack
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8 --batch_size 1 --num_requests 2 --input_len 128 --output_len 128"
row 90 "triton" "SHARDLLM_CUDA_GEMV=0"
row 50 "cuda_s4" "SHARDLLM_CUDA_GEMV=1"
row 40 "triton_2" "SHARDLLM_CUDA_GEMV=0"
row 50 "cuda_s8" "SHARDLLM_CUDA_GEMV=1 SHARDLLM_CUDA_GEMV_STAGES=8"
row 50 "cuda_s4_b2" "SHARDLLM_CUDA_GEMV=1 SHARDLLM_CUDA_GEMV_BLOCKS_PER_SM=2"
row 50 "cuda_s6" "SHARDLLM_CUDA_GEMV=1 SHARDLLM_CUDA_GEMV_STAGES=6"
row 40 "triton_3" "SHARDLLM_CUDA_GEMV=0"
grep -h "CUDA GEMV" "$w"/err_cuda*.txt | sort | uniq -c | head -5 | tee -a "$OUT/summary.txt"
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
