#!/usr/bin/env bash
# Issues 13 / 15 on one H200 (kind nvidia-h200, about 90 s): the small-M GEMV sweep (benchmarks/gemv_sweep.py: cuBLAS
# bf16, the previous FP8 kernel and the gemv.py grid at Llama-3-8B's tp 1 / tp 2 shapes, M = 1..16), then the GEMV's
# GPU tests. Run from the repo root:  bash benchmarks/device_gemv.sh
# Results under $OUT (or ./bench_out): gemv_rows.jsonl (every row), gemv_sweep.txt (the log with the JSON tables).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-bench_out}; mkdir -p "$out"
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv,noheader; date -u
timeout 55 python benchmarks/gemv_sweep.py --budget_s 40 --out "$out/gemv_rows.jsonl" > "$out/gemv_sweep.txt" 2>&1
echo "sweep rc=$?"
grep -v '^{' "$out/gemv_sweep.txt" | grep -v '^\s*$' | cut -c1-3000
timeout 30 python -m pytest -q -m gpu -p no:cacheprovider tests/layers/test_gemv.py 2>&1 | tail -4
