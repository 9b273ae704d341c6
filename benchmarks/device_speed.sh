#!/usr/bin/env bash
# Issue 7 on one GPU: kernel and graph tests, kernel micro-benchmark, shardllm bench beside transformers.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-bench_out}; mkdir -p "$out"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
python -c "import triton; print('triton', triton.__version__)"
timeout 200 python -m pytest -q -m gpu -p no:cacheprovider tests/layers tests/worker 2>&1 | tail -12
timeout 90 python benchmarks/attention_kernels.py 2>&1 | tail -14
b() { timeout ${T:-150} python -m shardllm.bench.throughput --model llama-3-8b --load_format dummy --dtype bf16 "$@" --json \
      2> "$out/err_$#_$RANDOM.txt" | tail -1 | tee -a "$out/speed.jsonl"; }
b --batch_size 1 --num_requests 2 --input_len 128 --output_len 256
b --batch_size 1 --num_requests 2 --input_len 128 --output_len 64 --enforce_eager
b --num_requests 1000 --input_len 128 --output_len 128
T=200 b --num_requests 500 --input_len 1000 --output_len 1000 --max_batch_size 512
timeout 150 python benchmarks/peer_transformers.py --batch_sizes 1 64 --input_len 128 --output_len 128 2>&1 | grep peer
grep -h -i -E "error|Traceback" "$out"/err_*.txt | head -5
