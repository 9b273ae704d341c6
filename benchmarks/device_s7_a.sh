#!/usr/bin/env bash
# Seventh session, first call (one H200, about 7 minutes): batch-1 decode's kernel boundaries (issues 13 and 15).
#   1. GPU tests of the two opt-ins never run on a GPU: the residual add + RMSNorm inside the qkv / gate_up GEMV
#      (SHARDLLM_GEMV_FUSED_NORM=1, layers/gemv_norm.py) and the GEMV's L2 prefetch of its weights between the PDL
#      signal and wait (SHARDLLM_GEMV_PDL_PREFETCH_MB, layers/gemv.py + pdl.py);
#   2. Llama-3-8B batch-1, one row at a time: fp8 and bf16, each switch alone and both (fp8 at 85% of the roofline
#      is issue 13's aim: 0.675 now);
#   3. Llama-3-70B fp8 + fp8 KV on this one GPU, 1000 x 128/128 (floor 3,803; 3,454 in the fourth session).
# Results in $OUT/results.tgz and $OUT/summary.txt.    LIMIT_S=480 bash benchmarks/device_s7_a.sh
set -u
. benchmarks/device_rows.sh  # device_start, pack, say, b, row
device_start 480
export CUDA_VISIBLE_DEVICES=0
timeout 100 python -m pytest -q -m gpu -p no:cacheprovider -rfEs tests/layers/test_gemv_norm.py \
  "tests/layers/test_pdl.py::test_gpu_gemv_with_the_weight_prefetch_equals_without" > "$w/b1_tests.txt" 2>&1
say "gpu tests: $(tail -1 "$w/b1_tests.txt")"; grep -E "^(FAILED|ERROR)" "$w/b1_tests.txt" | head | tee -a "$OUT/summary.txt"
MODEL_FLAGS="--model llama-3-8b"
B1="--batch_size 1 --num_requests 2 --input_len 128 --output_len 128"
P=${PREFETCH_MB:-16}
row 40 8b_fp8_b1_base "SHARDLLM_GEMV_FUSED_NORM=0 SHARDLLM_GEMV_PDL_PREFETCH_MB=0" --dtype fp8 $B1
row 40 8b_fp8_b1_norm "SHARDLLM_GEMV_FUSED_NORM=1 SHARDLLM_GEMV_PDL_PREFETCH_MB=0" --dtype fp8 $B1
row 40 8b_fp8_b1_prefetch "SHARDLLM_GEMV_FUSED_NORM=0 SHARDLLM_GEMV_PDL_PREFETCH_MB=$P" --dtype fp8 $B1
row 40 8b_fp8_b1_both "SHARDLLM_GEMV_FUSED_NORM=1 SHARDLLM_GEMV_PDL_PREFETCH_MB=$P" --dtype fp8 $B1
row 40 8b_bf16_b1_base "SHARDLLM_GEMV_FUSED_NORM=0 SHARDLLM_GEMV_PDL_PREFETCH_MB=0" $B1
row 40 8b_bf16_b1_norm "SHARDLLM_GEMV_FUSED_NORM=1 SHARDLLM_GEMV_PDL_PREFETCH_MB=0" $B1
row 40 8b_bf16_b1_prefetch "SHARDLLM_GEMV_FUSED_NORM=0 SHARDLLM_GEMV_PDL_PREFETCH_MB=$P" $B1
grep -h "fused\|probe" "$w"/err_8b_*_b1_norm.txt 2>/dev/null | head -5 | tee -a "$OUT/summary.txt"
MODEL_FLAGS="--model llama-3-70b --dtype fp8 --kv_cache_dtype fp8"
row 150 70b_fp8kv_tp1_128 "" --num_requests 1000 --input_len 128 --output_len 128
say "total: $((SECONDS - t0)) s"; pack
