#!/usr/bin/env bash
# Eleventh session, call 2 (kind nvidia-h200-x2, about 9.5 minutes): device_s11_a.sh on GPU 0 (the transposed V
# cache: GPU tests, kernel, 8B fp8 + fp8 KV end to end beside the default) while device_s11_b.sh profiles the
# 1000/1000-like decode step on GPU 1 (both layouts). Two single-GPU jobs on one host: compare rows within a GPU only.
# Results: $OUT/results.tgz + summary.txt (GPU 0), $OUT/b/results.tgz + summary.txt (GPU 1).
#     bash benchmarks/device_s11_d.sh
set -u
OUT=${OUT:-bench_out}; mkdir -p "$OUT/b"
GPU=1 OUT="$OUT/b" LIMIT_S=330 bash benchmarks/device_s11_b.sh > "$OUT/b/log.txt" 2>&1 &
GPU=0 LIMIT_S=550 bash benchmarks/device_s11_a.sh
wait
rm -rf "$OUT/work" "$OUT/b/work"
