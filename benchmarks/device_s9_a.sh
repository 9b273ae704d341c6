#!/usr/bin/env bash
# Ninth session (one H200, about 9 minutes): first-run Triton compiles moved out of the timed run (16-byte aligned
# step tensors, the prefill kernel unspecialized on its sliced pointers, start-up warm-up of the mixed-step decode
# and short-chunk prefill variants). GPU tests first, then 8B fp8 + fp8 KV rows under benchmarks/triton_compile_log.py
# (each says how many kernels it met after its CUDA-graph capture), each with its own Triton cache: cold cache with
# the warm-up on, off (SHARDLLM_KERNEL_WARM_UP=0) and the mixed-step split off; then the first cache again (warm),
# then 500 x 1000/1000 on it. Results in $OUT/results.tgz and $OUT/summary.txt.
#     LIMIT_S=560 bash benchmarks/device_s9_a.sh
set -u
. benchmarks/device_rows.sh  # device_start, pack, say, b, row, late_compiles
device_start 560
export CUDA_VISIBLE_DEVICES=0
timeout 200 python -m pytest -q -m gpu -p no:cacheprovider tests/worker/test_kernel_warm_up.py \
  tests/layers/test_mixed_step_attention.py tests/worker/test_gpu_paths.py tests/layers/test_triton_attention.py \
  2>&1 | tail -4 | tee -a "$OUT/summary.txt"
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8"
BENCH="python benchmarks/triton_compile_log.py shardllm.bench.throughput"
T128="--num_requests 1000 --input_len 128 --output_len 128 --max_batch_size 512"
T1000="--num_requests 500 --input_len 1000 --output_len 1000"
for r in "cold_warmup TRITON_CACHE_DIR=$w/tc_a" "cold_nowarmup TRITON_CACHE_DIR=$w/tc_b SHARDLLM_KERNEL_WARM_UP=0" \
         "cold_nosplit TRITON_CACHE_DIR=$w/tc_c SHARDLLM_MIXED_STEP_DECODE_KERNEL=0" "warm_warmup TRITON_CACHE_DIR=$w/tc_a"; do
  set -- $r; name=$1; shift
  row 75 "128_$name" "$*" $T128; late_compiles "128_$name"
done
row 90 1000_warm_warmup "TRITON_CACHE_DIR=$w/tc_a" $T1000; late_compiles 1000_warm_warmup
phase_rows
rm -rf "$w"/tc_*; pack
