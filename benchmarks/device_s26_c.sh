#!/usr/bin/env bash
# Twenty-first session (one H200, about 9 minutes): the L2 prefetch from the norms (layers/l2_prefetch.py) on a
# GPU: its gpu tests, then batch-1 rows (8B, 128/128) at SHARDLLM_L2_PREFETCH_MB 0 / 4 / 8 (/ 2), alternating, fp8 + fp8
# KV and bf16.
#     LIMIT_S=560 bash benchmarks/device_s26_c.sh
set -u
. benchmarks/device_rows.sh
device_start 560
export CUDA_VISIBLE_DEVICES=${GPU:-0}
timeout 150 python -m pytest -q -p no:cacheprovider -m gpu tests/layers/test_l2_prefetch.py tests/layers/test_pdl.py \
  -k "prefetch or pdl_on_and_off and not tp2" 2>&1 | tail -3 | tee -a "$OUT/summary.txt"
B1="--batch_size 1 --num_requests 2 --input_len 128 --output_len 128"
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8 $B1"
row 70 "fp8_pf0" "SHARDLLM_L2_PREFETCH_MB=0"
row 70 "fp8_pf4" ""
row 70 "fp8_pf8" "SHARDLLM_L2_PREFETCH_MB=8"
row 70 "fp8_pf0b" "SHARDLLM_L2_PREFETCH_MB=0"
row 70 "fp8_pf4b" ""
row 70 "fp8_pf8b" "SHARDLLM_L2_PREFETCH_MB=8"
row 70 "fp8_pf2" "SHARDLLM_L2_PREFETCH_MB=2"
MODEL_FLAGS="--model llama-3-8b --dtype bfloat16 $B1"
row 70 "bf16_pf0" "SHARDLLM_L2_PREFETCH_MB=0"
row 70 "bf16_pf4" ""
python - "$w/rows.jsonl" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
for l in open(sys.argv[1]):
    r = json.loads(l)
    print(f'{r["row"]:<10} tpot p50 {r.get("tpot_ms_p50")} ms  of roofline {r.get("fraction_of_roofline")}  {r.get("error", "")}')
PY
say "total: $((SECONDS - t0)) s"; pack
