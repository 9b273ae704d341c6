#!/usr/bin/env bash
# Queued by the twelfth session (one H200, about 5 minutes; issue 13). The prefill launch's per-layout defaults
# (triton_prefill.prefill_config) were measured at two fresh-prompt cases only (16 x 1000, 128 x 128, 64-token pages);
# the transposed layout's 512-token cut between V_T_SHORT and V_T_LONG and later chunks of long prompts were not.
# benchmarks/prefill_sweep.py at 16k-token steps of 256-, 512- and 2048-token prompts and of 4096-token chunks after
# 4096 cached tokens, both layouts, the launches in question (the defaults and their neighbours); then GPU tests of the prefill variants.
#     LIMIT_S=290 bash benchmarks/device_s13_d.sh
set -u
. benchmarks/device_rows.sh
device_start 290
export CUDA_VISIBLE_DEVICES=${GPU:-0}
CONFIGS='[{}, {"num_warps": 4, "split_causal": true}, {"block_n": 128, "split_causal": true}, {"rows": 256},
  {"split_causal": true}, {"block_n": 128}]'
timeout 230 python benchmarks/prefill_sweep.py --cases 64x256 32x512 8x2048 2x4096+4096 --configs "$CONFIGS" \
  --budget_s 200 > "$w/sweep.txt" 2>&1
grep -v '^{' "$w/sweep.txt" | tail -12 | tee -a "$OUT/summary.txt"
pack
timeout 40 python -m pytest -q -m gpu -p no:cacheprovider tests/layers/test_prefill_configs.py 2>&1 | tail -2 \
  | tee -a "$OUT/summary.txt"
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
