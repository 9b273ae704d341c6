#!/usr/bin/env bash
# Queued by the ninth session for the next one (one H200, about 9 minutes; issue 13). GPU tests of the start-up warm-up
# and the mixed-step split; then the FP8-cache decode kernel at 64-token pages with two pages a tile (block_n 128; with
# page_chunk 2 the pair shares one softmax update) beside the table's launch; then 8B fp8 + fp8 KV end to end at the
# engine's defaults (max batch 1024 on an H200): 1000 x 128/128 twice, and 500 x 1000/1000 at --max_num_tokens 16384
# (the default) and 32768 alternating (+2.5% once in the seventh session). Results in $OUT/results.tgz, summary.txt.
# The tests first: the warm-up's form after cb3a7b6 (one runner step, eager decodes too) has not run on a GPU yet.
#     LIMIT_S=560 bash benchmarks/device_s10_a.sh
set -u
. benchmarks/device_rows.sh  # device_start, pack, say, b, row, phase_rows
device_start 560
export CUDA_VISIBLE_DEVICES=0
timeout 240 python -m pytest -q -m gpu -p no:cacheprovider tests/worker/test_kernel_warm_up.py \
  tests/layers/test_mixed_step_attention.py tests/worker/test_gpu_paths.py tests/layers/test_fp8_kv_scales.py \
  2>&1 | tail -4 | tee -a "$OUT/summary.txt"
T='"tma": true'
timeout 120 python benchmarks/fp8_attention_kernel.py --cases 512x1500 512x170 64x1000 --block_sizes 64 --configs \
  "[{$T, \"num_warps\": 2, \"num_stages\": 4}, {$T, \"block_n\": 128, \"num_warps\": 2, \"num_stages\": 2},
    {$T, \"block_n\": 128, \"num_warps\": 4, \"num_stages\": 2}, {$T, \"block_n\": 128, \"num_warps\": 4, \"num_stages\": 3},
    {$T, \"block_n\": 128, \"page_chunk\": 2, \"num_warps\": 4, \"num_stages\": 3},
    {$T, \"block_n\": 128, \"page_chunk\": 2, \"num_warps\": 2, \"num_stages\": 3}]" \
  2>&1 | tee "$w/kernel.jsonl" | tee -a "$OUT/summary.txt"
pack
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8"
T128="--num_requests 1000 --input_len 128 --output_len 128"
T1000="--num_requests 500 --input_len 1000 --output_len 1000"
row 60 128_default "" $T128
row 80 1000_16k "" $T1000
row 80 1000_32k "" $T1000 --max_num_tokens 32768
row 80 1000_16k_b "" $T1000
row 80 1000_32k_b "" $T1000 --max_num_tokens 32768
row 60 128_default_b "" $T128
phase_rows
pack
