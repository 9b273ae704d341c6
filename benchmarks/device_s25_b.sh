#!/usr/bin/env bash
# Twentieth session (one H200, about 4 minutes): the session's CPU-side changes on the device's torch 2.11 /
# transformers 5.17 (the tp-split, host-memory and bench tests, CPU tests run there with -m "not gpu"), then one
# batch-1 bench row (8B fp8 + fp8 KV, 128/128) for the bench's fields on a GPU (attention_backend, peak memory).
#     LIMIT_S=300 bash benchmarks/device_s25_b.sh
set -u
. benchmarks/device_rows.sh
device_start 300
export CUDA_VISIBLE_DEVICES=${GPU:-0}
timeout 150 python -m pytest -q -p no:cacheprovider -m "not gpu" tests/test_planner.py tests/model_loader/test_host_memory.py \
  tests/executor/test_tensor_parallel.py -k "split or planner or host or fp8 or plan" 2>&1 | tail -3 | tee -a "$OUT/summary.txt"
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8 --batch_size 1 --num_requests 2 --input_len 128 --output_len 128"
row 120 "b1_fp8" ""
python - "$w/rows.jsonl" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
for l in open(sys.argv[1]):
    r = json.loads(l)
    print({k: r.get(k) for k in ("attention_backend", "peak_gib_per_rank", "weights_gib_per_rank", "all_reduce",
                                 "tpot_ms_p50", "fraction_of_roofline")})
PY
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
