#!/usr/bin/env bash
# Eleventh session, call 3 (kind nvidia-h200-x2, about 8 minutes; issue 13). The transposed V cache is now the FP8
# cache's default on sm90+: 1. the whole GPU suite in parallel mode (both GPUs; multi-GPU tests after), with the new
# default everywhere; 2. on GPU 0, 8B fp8 + fp8 KV 500 x 1000/1000 at the default beside SHARDLLM_KV_V_TRANSPOSED=0,
# alternating, while GPU 1 profiles the batch-1 fp8 decode step (2.81 ms against a 1.89 ms roofline: where the
# 0.9 ms goes, kernel by kernel). Needs carry [".whl_test"] (bash benchmarks/pack_test_wheels.sh).
#     bash benchmarks/device_s11_e.sh
set -u
. benchmarks/device_rows.sh
device_start 560
OUT="$OUT" SUITE_LIMIT_S=280 GPU_SUITE_WORKERS=2 bash benchmarks/device_gpu_suite.sh > "$w/suite_stdout.txt" 2>&1
say "suite rc $?: $(grep -E '[0-9]+ (passed|failed)' "$OUT/gpu_suite.log" | tail -4 | tr '\n' ' ')"
grep -E "^(FAILED|ERROR)" "$OUT/gpu_suite.log" | head -20 | tee -a "$OUT/summary.txt"
pack
( export CUDA_VISIBLE_DEVICES=1
  timeout 150 python benchmarks/profile_decode.py --model llama-3-8b --dtype fp8 --batch_sizes 1 --input_len 128 \
    --steps 32 --out_dir "$w/prof_b1" > "$w/profile_b1.jsonl" 2> "$w/profile_b1.err" ) &
export CUDA_VISIBLE_DEVICES=0
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8"
T1000="--num_requests 500 --input_len 1000 --output_len 1000"
row 75 1000_vt "" $T1000
row 75 1000_standard "SHARDLLM_KV_V_TRANSPOSED=0" $T1000
row 75 1000_vt_b "" $T1000
wait
phase_rows
say "b1 profile: $(tail -c 2500 "$w/profile_b1.jsonl")"
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
