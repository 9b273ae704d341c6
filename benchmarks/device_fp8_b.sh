#!/usr/bin/env bash
# Issue 13, second pass on one H200: FP8 GPU tests, small-M kernel config sweep, Llama-3-8B batch 1 bf16 beside
# fp8, Llama-3-8B / Llama-3-70B / Mixtral-8x7B fp8 at 1000 x 128/128 (dummy weights).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-bench_out}; mkdir -p "$out"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader; date -u
timeout 100 python -m pytest -q -m gpu -p no:cacheprovider tests/layers/test_fp8_gpu.py 2>&1 | tail -4
timeout 90 python benchmarks/fp8_gemm.py --sweep_small_m 2>&1 | tail -5 | tee "$out/sweep.jsonl" | cut -c1-400
b() { timeout ${T:-90} python -m shardllm.bench.throughput --load_format dummy "$@" --json \
      2> "$out/err_$#_$RANDOM.txt" | tail -1 | tee -a "$out/fp8b.jsonl" | cut -c1-700; }
for dt in bf16 fp8; do b --model llama-3-8b --dtype $dt --batch_size 1 --num_requests 2 --input_len 128 --output_len 128; done
b --model llama-3-8b --dtype fp8 --num_requests 1000 --input_len 128 --output_len 128 --max_batch_size 512
T=150 b --model llama-3-70b --dtype fp8 --num_requests 1000 --input_len 128 --output_len 128 --max_batch_size 512
T=110 b --model mixtral-8x7b --dtype fp8 --num_requests 1000 --input_len 128 --output_len 128 --max_batch_size 512
grep -h -i -E "error|Traceback|fail|unavailable" "$out"/err_*.txt | head -8
