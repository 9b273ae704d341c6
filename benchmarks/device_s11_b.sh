#!/usr/bin/env bash
# Queued by the tenth session (one H200, about 4 minutes; issue 13). Where a 1000/1000-like decode step goes: 8B fp8 +
# fp8 KV at batch 512 over ~1,500-token contexts (benchmarks/profile_decode.py, 8 profiled steps: kernels by name, GPU
# busy / idle, host phases), the default beside SHARDLLM_KV_V_TRANSPOSED=1. The tenth session's accounting of the
# 22.9 ms decode-phase step (attention ~14 ms at 438 us a layer, FP8 GEMMs ~5.5, LM head ~0.9, the rest ~2.5) is from
# separate kernel timings; this measures it in one step, idle time included.
#     LIMIT_S=280 bash benchmarks/device_s11_b.sh
set -u
. benchmarks/device_rows.sh
device_start 280
export CUDA_VISIBLE_DEVICES=${GPU:-0}
for vt in 0 1; do
  [ "$(left)" -ge 120 ] || { say "vt=$vt: skipped (time)"; continue; }
  SHARDLLM_KV_V_TRANSPOSED=$vt timeout 130 python benchmarks/profile_decode.py --model llama-3-8b --dtype fp8 \
    --kv_cache_dtype fp8 --batch_sizes 512 --input_len 1500 --steps 8 --out_dir "$w/prof_vt$vt" \
    > "$w/profile_vt$vt.jsonl" 2> "$w/profile_vt$vt.err"
  say "vt=$vt: $(tail -c 1500 "$w/profile_vt$vt.jsonl")"
  pack
done
