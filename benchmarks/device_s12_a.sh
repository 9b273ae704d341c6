#!/usr/bin/env bash
# Queued by the eleventh session for the next one (one H200, about 9.5 minutes; issue 13's 500 x 1000/1000 floor,
# 17,222-17,841 against 17,744 across the eleventh session's calls). 1. GPU tests of this session's unmeasured work:
# the prefill launch variants, the review's fixes (the transposed-V eligibility, the arg-max warm-up: no kernel
# compiled after start-up). 2. benchmarks/prefill_sweep.py at 16k-token prefill steps (the default launch took 42-48
# ms of a ~250 ms prefill step, ~100 TFLOP/s). 3. 8B fp8 + fp8 KV at 500 x 1000/1000 and 1000 x 128/128 with the
# sweep's best launch for the transposed layout (SHARDLLM_PREFILL_CONFIG) beside the default, alternating.
#     LIMIT_S=560 bash benchmarks/device_s12_a.sh
set -u
. benchmarks/device_rows.sh
device_start 560
export CUDA_VISIBLE_DEVICES=${GPU:-0}
timeout 150 python -m pytest -q -m gpu -p no:cacheprovider tests/layers/test_prefill_configs.py \
  tests/layers/test_argmax.py tests/worker/test_kernel_warm_up.py tests/layers/test_v_transposed_cache.py 2>&1 \
  | tail -4 | tee -a "$OUT/summary.txt"
timeout 170 python benchmarks/prefill_sweep.py --budget_s 140 > "$w/sweep.txt" 2>&1
grep -v '^{' "$w/sweep.txt" | tail -6 | tee -a "$OUT/summary.txt"
pack
pick() { grep "^$1 vt:" "$w/sweep.txt" | sed -n "s/.*SHARDLLM_PREFILL_CONFIG='\(.*\)'/\1/p" | tr -d ' '; }
C1000=$(pick 16x1000); C128=$(pick 128x128)
say "picked: 16x1000 ${C1000:-none}, 128x128 ${C128:-none}"
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8"
T1000="--num_requests 500 --input_len 1000 --output_len 1000"
if [ -n "$C1000" ] && [ "$C1000" != "{}" ]; then
  row 75 1000_default "" $T1000
  row 75 1000_sweep "SHARDLLM_PREFILL_CONFIG=$C1000" $T1000
  row 75 1000_default_b "" $T1000
  row 75 1000_sweep_b "SHARDLLM_PREFILL_CONFIG=$C1000" $T1000
else
  row 75 1000_default "" $T1000
fi
if [ -n "$C128" ] && [ "$C128" != "{}" ]; then
  row 50 128_default "" --num_requests 1000 --input_len 128 --output_len 128
  row 50 128_sweep "SHARDLLM_PREFILL_CONFIG=$C128" --num_requests 1000 --input_len 128 --output_len 128
fi
phase_rows
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
