#!/usr/bin/env bash
# Twenty-first session (one H200, about 1 minute): benchmarks/l2_prefetch_probe.py --o_rows: o's GEMV cold, hot in
# L2, and after an attention-length gap that bulk-prefetches or loads it (does L2 residency speed the GEMV at all?).
#     LIMIT_S=200 bash benchmarks/device_s26_b.sh
set -u
. benchmarks/device_rows.sh
device_start 200
export CUDA_VISIBLE_DEVICES=${GPU:-0}
for att in 8 20; do
  timeout 80 python benchmarks/l2_prefetch_probe.py --o_rows --att_us $att 2>&1 | grep -v Warning | tee -a "$OUT/summary.txt"
done
say "total: $((SECONDS - t0)) s"
