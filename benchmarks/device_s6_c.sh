#!/usr/bin/env bash
# The next session's third call (kind nvidia-h200-x2, about 6 minutes): where Llama-3-70B fp8 + fp8 KV loses against
# TensorRT-LLM's floors (one H200 3,803 out tok/s at 1000 x 128/128, we 3,454; tp 2 7,606, we 5,999; fourth session).
#   1. decode-step profiles at batch 1024: tp 2 (both GPUs), then tp 1;
#   2. the 1000 x 128/128 row at tp 2 with the current defaults (MoE-free: the greedy sampler's fast path and the
#      fifth session's attention table are what changed for it), plus BLOCK_SIZE if set (device_s6_b's winner).
# Results in $OUT/results.tgz and $OUT/summary.txt.    LIMIT_S=400 [BLOCK_SIZE=32] bash benchmarks/device_s6_c.sh
set -u
. benchmarks/device_rows.sh  # device_start, pack, say, b, row
device_start 400
for tp in 2 1; do
  [ "$(left)" -ge 140 ] || { say "70b tp $tp profile: skipped (time)"; continue; }
  timeout 130 python benchmarks/profile_decode.py --load_format dummy --input_len 128 --batch_sizes 1024 --steps 6 \
    --top 20 --out_dir "$w/ranks_70b_tp$tp" --model llama-3-70b --dtype fp8 --kv_cache_dtype fp8 --tp_size $tp \
    > "$w/prof_70b_tp$tp.jsonl" 2> "$w/prof_70b_tp$tp.err"
  say "70b tp $tp profile: rc=$?"; pack
done
python benchmarks/profile_decode.py --summary "$w"/prof_70b_tp*.jsonl >> "$OUT/summary.txt" 2>&1
MODEL_FLAGS="--model llama-3-70b --dtype fp8 --kv_cache_dtype fp8"
T128="--num_requests 1000 --input_len 128 --output_len 128"
row 170 70b_fp8kv_tp2 "" --tp_size 2 $T128
[ -n "${BLOCK_SIZE:-}" ] && row 170 "70b_fp8kv_tp2_bs$BLOCK_SIZE" "" --tp_size 2 --block_size "$BLOCK_SIZE" $T128
say "total: $((SECONDS - t0)) s"; pack
