#!/usr/bin/env bash
# (The CUDA GEMV these calls measured was removed after them; its code, with this script's, is at commit 86ce489.)
# Nineteenth session, call 4 (one H200, about 6 minutes). Why the CUDA GEMV's register form, faster than the Triton
# GEMV kernel by kernel under PDL (o, gate_up), loses end to end: 8B fp8 + fp8 KV batch 1 128/128 TPOT, Triton
# against the register form at 4 / 8 / 16 blocks an SM (more, shorter-lived blocks), with PDL and without
# (SHARDLLM_PDL=0), alternating; then a profiled decode step each (PDL off: kernel times without their waits).
#     LIMIT_S=400 bash benchmarks/device_s24_c.sh
set -u
. benchmarks/device_rows.sh
device_start 400
export CUDA_VISIBLE_DEVICES=${GPU:-0}
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8 --batch_size 1 --num_requests 2 --input_len 128 --output_len 128"
row 90 "triton" "SHARDLLM_CUDA_GEMV=0"
row 45 "reg_b4" "SHARDLLM_CUDA_GEMV=1 SHARDLLM_CUDA_GEMV_BLOCKS_PER_SM=4"
row 45 "reg_b8" "SHARDLLM_CUDA_GEMV=1 SHARDLLM_CUDA_GEMV_BLOCKS_PER_SM=8"
row 45 "reg_b16" "SHARDLLM_CUDA_GEMV=1 SHARDLLM_CUDA_GEMV_BLOCKS_PER_SM=16"
row 40 "triton_2" "SHARDLLM_CUDA_GEMV=0"
row 40 "triton_nopdl" "SHARDLLM_CUDA_GEMV=0 SHARDLLM_PDL=0"
row 45 "reg_b4_nopdl" "SHARDLLM_CUDA_GEMV=1 SHARDLLM_CUDA_GEMV_BLOCKS_PER_SM=4 SHARDLLM_PDL=0"
for v in "0" "1"; do
  [ "$(left)" -ge 70 ] || { say "profile $v: skipped (time)"; continue; }
  SHARDLLM_PDL=0 SHARDLLM_CUDA_GEMV=$v SHARDLLM_CUDA_GEMV_BLOCKS_PER_SM=4 timeout 70 python benchmarks/profile_decode.py \
    --model llama-3-8b --dtype fp8 --kv_cache_dtype fp8 --batch_sizes 1 --steps 16 --top 12 > "$w/profile_$v.jsonl" 2> "$w/profile_err_$v.txt"
  say "profile CUDA_GEMV=$v: $(tail -c 3000 "$w/profile_$v.jsonl")"
  pack
done
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
