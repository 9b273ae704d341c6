#!/usr/bin/env bash
# Queued by the twelfth session (one H200, about 9.5 minutes; issue 13). 1. GPU tests of the transposed V cache
# (the tiled V^T write, kv_write.write_v_transposed, among them) and of the prefill variants. 2. Llama-3-8B fp8 +
# fp8 KV, 1000 x 128/128 with the tiled V^T write for steps with prompt chunks (SHARDLLM_KV_V_T_TILED_WRITE=1) beside
# the fused kernel's row store, alternating (the eleventh session measured the row store taking a 16k-token step's KV
# write from 3.4 to 7.6 ms). 3. The prefill launch's per-layout defaults (triton_prefill.prefill_config) were measured
# at two fresh-prompt cases only (16 x 1000, 128 x 128, 64-token pages); the transposed layout's 512-token cut between
# V_T_SHORT and V_T_LONG and later chunks of long prompts were not: benchmarks/prefill_sweep.py at 16k-token steps of
# 256-, 512- and 2048-token prompts and of 4096-token chunks after 4096 cached tokens, both layouts, the launches in
# question (the defaults and their neighbours), in the time left.
#     LIMIT_S=560 bash benchmarks/device_s13_d.sh
set -u
. benchmarks/device_rows.sh
device_start 560
export CUDA_VISIBLE_DEVICES=${GPU:-0}
timeout 110 python -m pytest -q -m gpu -p no:cacheprovider tests/layers/test_v_transposed_cache.py \
  tests/layers/test_prefill_configs.py 2>&1 | tail -3 | tee -a "$OUT/summary.txt"
MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8"
T128="--num_requests 1000 --input_len 128 --output_len 128"
row 50 128_row_store "" $T128
row 50 128_tiled_v "SHARDLLM_KV_V_T_TILED_WRITE=1" $T128
row 50 128_row_store_b "" $T128
row 50 128_tiled_v_b "SHARDLLM_KV_V_T_TILED_WRITE=1" $T128
phase_rows
pack
CONFIGS='[{}, {"num_warps": 4, "split_causal": true}, {"block_n": 128, "split_causal": true}, {"rows": 256},
  {"split_causal": true}, {"block_n": 128}]'
budget=$(( $(left) - 40 ))
if [ "$budget" -ge 40 ]; then
  timeout $((budget + 30)) python benchmarks/prefill_sweep.py --cases 32x512 64x256 2x4096+4096 8x2048 \
    --configs "$CONFIGS" --budget_s "$budget" > "$w/sweep.txt" 2>&1
  grep -v '^{' "$w/sweep.txt" | tail -12 | tee -a "$OUT/summary.txt"
else
  say "prefill sweep: skipped (time)"
fi
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
