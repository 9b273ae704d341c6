#!/usr/bin/env bash
# Twelfth session, call 3 (one H200, about 3.5 minutes; issue 13). Where the GPU waits in a decode step:
# 1. Llama-3-8B fp8 + fp8 KV, 1000 x 128/128 under benchmarks/sync_debug.py (torch's CUDA sync debug mode): the call
#    sites that make the host wait for the GPU, by count (a per-step sync drains the queue under async scheduling).
# 2. benchmarks/profile_decode.py at 512 x 1000 (the 1000/1000 decode phase): wall vs GPU busy per step, kernels.
#     LIMIT_S=240 bash benchmarks/device_s12_c.sh
set -u
. benchmarks/device_rows.sh
device_start 240
export CUDA_VISIBLE_DEVICES=${GPU:-0}
BENCH="python benchmarks/sync_debug.py shardllm.bench.throughput"
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8"
row 70 128_sync_debug "" --num_requests 1000 --input_len 128 --output_len 128
grep '^sync-site' "$w/err_128_sync_debug.txt" | head -25 | cut -c1-400 | tee -a "$OUT/summary.txt"
timeout 150 python benchmarks/profile_decode.py --model llama-3-8b --dtype fp8 --kv_cache_dtype fp8 \
  --batch_sizes 512 --input_len 1000 --steps 8 --top 20 --out_dir "$w/prof" > "$w/profile.txt" 2> "$w/profile_err.txt"
tail -c 5000 "$w/profile.txt" | tee -a "$OUT/summary.txt"; tail -3 "$w/profile_err.txt"
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
