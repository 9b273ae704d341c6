#!/usr/bin/env bash
# Twenty-first session (one H200, about 3 minutes): benchmarks/l2_prefetch_probe.py, L2 bulk prefetch of the next
# GEMV's weights in a batch-1 step's HBM-idle gaps (attention, norms), at the profile's gap lengths and shorter.
#     LIMIT_S=300 bash benchmarks/device_s26_a.sh
set -u
. benchmarks/device_rows.sh
device_start 300
export CUDA_VISIBLE_DEVICES=${GPU:-0}
timeout 150 python benchmarks/l2_prefetch_probe.py 2>&1 | grep -v Warning | tee -a "$OUT/summary.txt" | tail -40
timeout 100 python benchmarks/l2_prefetch_probe.py --att_us 6 --norm_us 1.5 --pf_mb 0,6 --chunk_kb 32 --rounds 2 \
  2>&1 | grep -v Warning | tee -a "$OUT/summary.txt" | tail -12
say "total: $((SECONDS - t0)) s"
