#!/usr/bin/env bash
# Eleventh session, call 5 (one H200, about 3 minutes; issue 13's batch-1 row). The greedy arg-max in two Triton
# kernels (layers/argmax.py; torch's took 35 us of a 2.87 ms batch-1 step): its GPU tests, the kernels beside
# torch.argmax, then 8B fp8 batch 1 with it (the default) and with SHARDLLM_TRITON_ARGMAX=0, alternating.
#     LIMIT_S=200 bash benchmarks/device_s11_g.sh
set -u
. benchmarks/device_rows.sh
device_start 200
export CUDA_VISIBLE_DEVICES=0
timeout 60 python -m pytest -q -m gpu -p no:cacheprovider tests/layers/test_argmax.py 2>&1 | tail -2 \
  | tee -a "$OUT/summary.txt"
timeout 30 python benchmarks/argmax_kernel.py 2>&1 | tail -3 | tee -a "$OUT/summary.txt"
MODEL_FLAGS="--model llama-3-8b --dtype fp8"
B1="--batch_size 1 --num_requests 2 --input_len 128 --output_len 128"
row 45 b1_triton_argmax "" $B1
row 45 b1_torch_argmax "SHARDLLM_TRITON_ARGMAX=0" $B1
row 45 b1_triton_argmax_b "" $B1
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
