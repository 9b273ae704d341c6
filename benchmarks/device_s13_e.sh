#!/usr/bin/env bash
# Queued by the twelfth session (one H200, about 5 minutes; issue 13's batch-1 floor, 0.85 of the roofline; 0.684 in
# the twelfth session). SHARDLLM_GEMV_W_EARLY: each program of a batch-1 GEMV loads its first weight tile before its
# PDL wait, while the kernel before (a norm, the attention and its reduce) still runs; 1: not the fused SiLU down
# GEMV (it follows gate_up's, bandwidth-bound too), 2: every GEMV. GPU tests first (bit-equal to the default, the
# PTX's order), then Llama-3-8B fp8 batch 1 at 0 / 1 / 2, alternating, twice.
#     LIMIT_S=330 bash benchmarks/device_s13_e.sh
set -u
. benchmarks/device_rows.sh
device_start 330
export CUDA_VISIBLE_DEVICES=${GPU:-0}
timeout 90 python -m pytest -q -m gpu -p no:cacheprovider tests/layers/test_gemv.py tests/layers/test_pdl.py 2>&1 \
  | tail -3 | tee -a "$OUT/summary.txt"
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --batch_size 1 --num_requests 2 --input_len 128 --output_len 128"
for r in a b; do
  for mode in 0 1 2; do row 35 "b1_w_early${mode}_$r" "SHARDLLM_GEMV_W_EARLY=$mode"; done
done
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
