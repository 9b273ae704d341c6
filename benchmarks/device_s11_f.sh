#!/usr/bin/env bash
# Eleventh session, call 4 (one H200, about 7 minutes; issue 13). 1. The FP8 MoE GPU tests (the loop reference now at
# fp32 accumulation, as the grouped GEMM) and the transposed-V cache tests; 2. the batch-1 fp8 decode step profiled
# with PDL off (kernel durations then do not include PDL's waits for the previous kernel: where the 0.9 ms over the
# 1.89 ms roofline goes); 3. 8B fp8 + fp8 KV at the defaults (the transposed V cache), nothing else on the machine:
# 500 x 1000/1000 twice (call 2 17,832 / 17,841; call 3, beside a profile on the other GPU, 17,287 / 17,222) and
# 1000 x 128/128.
#     LIMIT_S=440 bash benchmarks/device_s11_f.sh
set -u
. benchmarks/device_rows.sh
device_start 440
export CUDA_VISIBLE_DEVICES=0
timeout 150 python -m pytest -q -m gpu -p no:cacheprovider tests/layers/test_fp8_moe_gpu.py \
  tests/layers/test_v_transposed_cache.py 2>&1 | tail -3 | tee -a "$OUT/summary.txt"
SHARDLLM_PDL=0 timeout 100 python benchmarks/profile_decode.py --model llama-3-8b --dtype fp8 --batch_sizes 1 \
  --input_len 128 --steps 32 --out_dir "$w/prof_b1" > "$w/profile_b1.jsonl" 2> "$w/profile_b1.err"
say "b1 profile, PDL off: $(tail -c 2500 "$w/profile_b1.jsonl")"
pack
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8"
row 75 1000_default "" --num_requests 500 --input_len 1000 --output_len 1000
row 75 1000_default_b "" --num_requests 500 --input_len 1000 --output_len 1000
row 50 128_default "" --num_requests 1000 --input_len 128 --output_len 128
phase_rows
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
