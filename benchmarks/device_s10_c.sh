#!/usr/bin/env bash
# (Ran once, 2026-12-01; its sub_tiles / head_split rows lost and the fields were removed afterwards: kept as the record.)
# Tenth session, call 3 (one H200, about 9 minutes; issue 13). GPU tests of fast accumulation up to K = 8192 (the new
# default) and of the TMA kernel's page ids an iteration ahead (prefetch_pages: num_stages - 1 pages in flight; the
# table's launch keeps one, benchmarks/kernel_ir.py); the FP8-cache decode kernel at 64-token pages with them; then
# 8B fp8 + fp8 KV end to end: the default (fast accumulation up to K = 8192) beside SHARDLLM_FP8_FAST_ACCUM_MAX_K=0
# at 1000 x 128/128 and 500 x 1000/1000, then both with the kernel config that did best over 512 x 1500 and
# 1024 x 192 (relative to the table's) as the 64-token entry for batches past 256 (SHARDLLM_DECODE_CONFIGS).
#     LIMIT_S=560 bash benchmarks/device_s10_c.sh
set -u
. benchmarks/device_rows.sh
device_start 560
export CUDA_VISIBLE_DEVICES=0
timeout 120 python -m pytest -q -m gpu -p no:cacheprovider tests/layers/test_fp8_gpu.py \
  tests/layers/test_decode_attention_tma.py 2>&1 | tail -4 | tee -a "$OUT/summary.txt"
B='"tma": true, "num_warps": 2'
P='"tma": true, "num_warps": 2, "prefetch_pages": true'
timeout 150 python benchmarks/fp8_attention_kernel.py --cases 512x1500 1024x192 64x1000 --block_sizes 64 \
  --configs "[{$B, \"num_stages\": 4}, {$P, \"num_stages\": 2}, {$P, \"num_stages\": 3}, {$P, \"num_stages\": 4},
  {$P, \"num_stages\": 3, \"sub_tiles\": 2}, {$P, \"num_stages\": 4, \"sub_tiles\": 2},
  {\"tma\": true, \"num_warps\": 4, \"prefetch_pages\": true, \"num_stages\": 3},
  {$P, \"num_stages\": 3, \"head_split\": 2}]" 2>&1 | tee "$w/kernel.jsonl" | tee -a "$OUT/summary.txt"
pack
best=$(python -c '
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
score = {}
for case in ((512, 1500), (1024, 192)):
    rs = [r for r in rows if (r.get("batch"), r.get("ctx")) == case and r.get("us")]
    for r in rs:
        key = json.dumps(r["config"], sort_keys=True, separators=(",", ":"))
        score[key] = score.get(key, 0) + r["us"] / rs[0]["us"]
base = next(iter(score), None)
pick = min(score, key=score.get) if score else None
if pick and pick != base and score[pick] < score[base] - 0.04:
    print(json.dumps({"fp8_e4m3/128/512/64": json.loads(pick)}, separators=(",", ":")))
' "$w/kernel.jsonl")
say "best over 512x1500 + 1024x192: ${best:-the table entry}"
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8"
T128="--num_requests 1000 --input_len 128 --output_len 128"
T1000="--num_requests 500 --input_len 1000 --output_len 1000"
row 60 128_default "" $T128
row 60 128_exact "SHARDLLM_FP8_FAST_ACCUM_MAX_K=0" $T128
row 80 1000_default "" $T1000
row 80 1000_exact "SHARDLLM_FP8_FAST_ACCUM_MAX_K=0" $T1000
if [ -n "$best" ]; then
  row 80 1000_kernel "SHARDLLM_DECODE_CONFIGS=$best" $T1000
  row 60 128_kernel "SHARDLLM_DECODE_CONFIGS=$best" $T128
fi
phase_rows
pack
