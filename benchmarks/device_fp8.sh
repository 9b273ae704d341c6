#!/usr/bin/env bash
# Issue 13 on one H200: FP8 GPU tests, GEMM micro-benchmark, Llama-3-8B (dummy weights) bf16 beside fp8 (+ fp8 KV).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-bench_out}; mkdir -p "$out"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader; date -u
timeout 150 python -m pytest -q -m gpu -p no:cacheprovider tests/layers/test_fp8_gpu.py tests/layers/test_fp8_kv_cache.py 2>&1 | tail -8
timeout 120 python benchmarks/fp8_gemm.py 2>&1 | tail -30 | tee "$out/gemm.jsonl"
b() { timeout ${T:-120} python -m shardllm.bench.throughput --model llama-3-8b --load_format dummy "$@" --json \
      2> "$out/err_$#_$RANDOM.txt" | tail -1 | tee -a "$out/fp8.jsonl"; }
for dt in bf16 fp8; do
  b --dtype $dt --batch_size 1 --num_requests 2 --input_len 128 --output_len 128
  b --dtype $dt --num_requests 1000 --input_len 128 --output_len 128 --max_batch_size 512
done
b --dtype fp8 --kv_cache_dtype fp8 --num_requests 1000 --input_len 128 --output_len 128 --max_batch_size 512
grep -h -i -E "error|Traceback|fail" "$out"/err_*.txt | head -8
