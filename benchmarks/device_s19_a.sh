#!/usr/bin/env bash
# Sixteenth session (one H200, about 9 minutes; issue 13's batch-1 floor). SHARDLLM_DECODE_FUSED_ROTARY is now the
# largest decode-only step (rows) that takes the fused rotary + KV write inside the TMA decode kernel: device_s18_a.sh
# measured it on every step at batch 1 -1.5% TPOT (2.789 -> 2.746 ms), but 500 x 1000/1000 -0.5% and 1000 x 128/128
# -1.1% out tok/s. Here: where it stops paying. 1. GPU tests of the fused decode and the warm-up. 2. 8B fp8 + fp8 KV,
# B requests of 1000 prompt tokens and 256 output tokens at batch size B, off (0) and on for every step (4096),
# alternating, B = 1 .. 256 (in the order of their weight for the decision). The decode-phase TPOT is the figure.
#     LIMIT_S=540 bash benchmarks/device_s19_a.sh
set -u
. benchmarks/device_rows.sh
device_start 540
export CUDA_VISIBLE_DEVICES=${GPU:-0}
timeout 120 python -m pytest -q -p no:cacheprovider -m gpu tests/layers/test_decode_fused_rotary.py \
  tests/worker/test_kernel_warm_up.py 2>&1 | tail -3 | tee -a "$OUT/summary.txt"
for B in 1 16 64 256 4 32 8 128; do
  MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8 --batch_size $B --num_requests $B --input_len 1000 --output_len 256"
  row 60 "b${B}_off" "SHARDLLM_DECODE_FUSED_ROTARY=0"
  row 45 "b${B}_on" "SHARDLLM_DECODE_FUSED_ROTARY=4096"
done
phase_rows
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
