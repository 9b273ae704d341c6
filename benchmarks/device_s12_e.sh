#!/usr/bin/env bash
# Twelfth session, call 5 (one H200, about 3 minutes; issue 13, batch-1 decode). GPU tests of the fused partition
# merge in the decode kernel (triton_paged FUSED_REDUCE: batches of up to 16 sequences, no reduce launch), then
# Llama-3-8B fp8 batch 1 with it (the default) beside SHARDLLM_DECODE_FUSED_REDUCE=0, alternating.
#     LIMIT_S=190 bash benchmarks/device_s12_e.sh   (ran at commit 04d383b; the fused merge lost and was reverted)
set -u
. benchmarks/device_rows.sh
device_start 190
export CUDA_VISIBLE_DEVICES=${GPU:-0}
timeout 80 python -m pytest -q -m gpu -p no:cacheprovider tests/layers/test_decode_fused_reduce.py \
  tests/layers/test_triton_attention.py -k "gpu" 2>&1 | tail -3 | tee -a "$OUT/summary.txt"
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --batch_size 1 --num_requests 2 --input_len 128 --output_len 128"
row 35 b1_fused ""
row 35 b1_reduce_kernel "SHARDLLM_DECODE_FUSED_REDUCE=0"
row 35 b1_fused_b ""
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
