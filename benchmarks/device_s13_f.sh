#!/usr/bin/env bash
# Thirteenth session (one H200, about 6 minutes; issue 13's batch-1 floor, 0.85 of the roofline). Batch 1 on
# Llama-3-8B: SHARDLLM_GEMV_W_EARLY 0 beside 2 (the new default) for fp8 and bf16 weights; fp8 weights with the FP8
# KV cache, with the decode table as shipped and with the 1-row 64-token-page entry this session's sweep picked
# (num_splits 8, TMA: 6.7 -> 5.4 us a layer at 1 x 200), alternating, twice.
#     LIMIT_S=400 bash benchmarks/device_s13_f.sh
set -u
. benchmarks/device_rows.sh
device_start 400
export CUDA_VISIBLE_DEVICES=${GPU:-0}
TABLE=$(python - <<'PY'
import json
from shardllm.layers.attention.decode_configs import DECODE_CONFIGS
t = dict(DECODE_CONFIGS)
t["fp8_e4m3/128/1/64"] = {"num_splits": 8, "num_stages": 3, "num_warps": 2, "prefetch_pages": True, "tma": True}
print(json.dumps(t, separators=(",", ":")))
PY
)
say "table: $TABLE"
B1="--model llama-3-8b --batch_size 1 --num_requests 2 --input_len 128 --output_len 128"
for r in a b; do
  MODEL_FLAGS="$B1 --dtype fp8"
  row 35 "fp8_e0_$r" "SHARDLLM_GEMV_W_EARLY=0"
  row 35 "fp8_e2_$r" "SHARDLLM_GEMV_W_EARLY=2"
  row 35 "fp8_kv8_e2_$r" "SHARDLLM_GEMV_W_EARLY=2" --kv_cache_dtype fp8
  row 35 "fp8_kv8_e2_b1tbl_$r" "SHARDLLM_GEMV_W_EARLY=2 SHARDLLM_DECODE_CONFIGS=$TABLE" --kv_cache_dtype fp8
  MODEL_FLAGS="$B1 --dtype bf16"
  row 35 "bf16_e0_$r" "SHARDLLM_GEMV_W_EARLY=0"
  row 35 "bf16_e2_$r" "SHARDLLM_GEMV_W_EARLY=2"
done
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
