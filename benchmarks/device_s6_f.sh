#!/usr/bin/env bash
# Sixth session, sixth call (one H200, about 3 minutes): the opt-in residual add + RMSNorm inside the qkv / gate_up
# GEMV at batch 1 (layers/gemv_norm.py, SHARDLLM_GEMV_FUSED_NORM=1, never timed): its GPU tests, then Llama-3-8B
# batch-1 decode with it on and off, fp8 and bf16, one row at a time on one GPU.
# Results in $OUT/results.tgz and $OUT/summary.txt.    LIMIT_S=210 bash benchmarks/device_s6_f.sh
set -u
. benchmarks/device_rows.sh  # device_start, pack, say, b, row
device_start 210
export CUDA_VISIBLE_DEVICES=0
timeout 80 python -m pytest -q -m gpu -p no:cacheprovider -rfEs tests/layers/test_gemv_norm.py > "$w/norm_tests.txt" 2>&1
say "gemv_norm gpu tests: $(tail -1 "$w/norm_tests.txt")"; grep -E "^(FAILED|ERROR)" "$w/norm_tests.txt" | head | tee -a "$OUT/summary.txt"
MODEL_FLAGS="--model llama-3-8b"
B1="--batch_size 1 --num_requests 2 --input_len 128 --output_len 128"
row 40 8b_fp8_b1_norm_on "SHARDLLM_GEMV_FUSED_NORM=1" --dtype fp8 $B1
row 40 8b_fp8_b1_norm_off "SHARDLLM_GEMV_FUSED_NORM=0" --dtype fp8 $B1
row 40 8b_bf16_b1_norm_on "SHARDLLM_GEMV_FUSED_NORM=1" $B1
row 40 8b_bf16_b1_norm_off "SHARDLLM_GEMV_FUSED_NORM=0" $B1
grep -h "fused\|probe\|norm" "$w"/err_8b_*_norm_on.txt 2>/dev/null | head -5 | tee -a "$OUT/summary.txt"
say "total: $((SECONDS - t0)) s"; pack
