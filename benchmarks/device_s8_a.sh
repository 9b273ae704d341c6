#!/usr/bin/env bash
# Eighth session (one H200, about 7 minutes): the mixed-step attention split (decodes of a prefill-phase step in the
# decode kernel). Its GPU tests first, then 8B fp8 + fp8 KV 500 x 1000/1000 and 1000 x 128/128 with the split on
# (default) and off (SHARDLLM_MIXED_STEP_DECODE_KERNEL=0), alternating, then a prefill-phase step profile with it on.
# Results in $OUT/results.tgz and $OUT/summary.txt.    LIMIT_S=480 bash benchmarks/device_s8_a.sh
set -u
. benchmarks/device_rows.sh  # device_start, pack, say, b, row
device_start 480
export CUDA_VISIBLE_DEVICES=0
timeout 120 python -m pytest -q -m gpu -p no:cacheprovider tests/layers/test_mixed_step_attention.py \
  tests/layers/test_fp8_kv_kernel_scales.py 2>&1 | tail -3 | tee -a "$OUT/summary.txt"
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8"
T1000="--num_requests 500 --input_len 1000 --output_len 1000"
T128="--num_requests 1000 --input_len 128 --output_len 128 --max_batch_size 512"
row 75 fp8kv_1000_split "" $T1000
row 75 fp8kv_1000_nosplit "SHARDLLM_MIXED_STEP_DECODE_KERNEL=0" $T1000
row 60 fp8kv_128_split "" $T128
row 60 fp8kv_128_nosplit "SHARDLLM_MIXED_STEP_DECODE_KERNEL=0" $T128
row 75 fp8kv_1000_split_b "" $T1000
phase_rows
if [ "$(left)" -ge 80 ]; then
  row 80 fp8kv_1000_prefill_profile "SHARDLLM_PROFILE_DIR=$w/prefill SHARDLLM_PROFILE_STEPS=14:3 SHARDLLM_PROFILE_TOP=25" $T1000
  python - "$w/prefill/rank0.json" <<'PY' 2>&1 | tee -a "$OUT/summary.txt"
import json, sys
d = json.load(open(sys.argv[1]))
a = d["all"]
print("mean step:", {k: a.get(k) for k in ("wall_us", "gpu_busy_us", "gpu_idle_us")})
for k in a["top_kernels"][:12]:
    print(f'  {k["us_per_step"]:10.1f} us x{k["calls_per_step"]:<6} {k["name"][:90]}')
PY
fi
pack
