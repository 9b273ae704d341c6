#!/usr/bin/env bash
# Issue 13, FP8 KV cache scales computed on the first step (one H200, ~4 min): the GPU tests (Triton kernels and
# CUDA graphs read the scale tensors), then Llama-3-8B fp8 weights with the bf16 cache beside the e4m3 cache at
# batch 1 and 1000 x 128/128: the cost of the four elementwise scale ops per layer an FP8 cache now always runs.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-bench_out}; mkdir -p "$out"
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
timeout 400 python -m pytest -q -m gpu -p no:cacheprovider tests/layers/test_fp8_kv_scales.py \
  "tests/layers/test_fp8_gpu.py::test_tiny_fp8_model_graphs_equal_eager" 2>&1 | tail -15
b() { timeout ${T:-90} python -m shardllm.bench.throughput --load_format dummy --model llama-3-8b "$@" --json \
      2> "$out/err_kv_$RANDOM.txt" | tail -1 | tee -a "$out/fp8_kv.jsonl" | python -c "import json,sys; r=json.loads(sys.stdin.read()); print({k: r.get(k) for k in ('dtype','kv_cache_dtype','batch_size','output_tok_s','tpot_ms_p50')})"; }
for kv in auto fp8; do
  b --dtype fp8 --kv_cache_dtype $kv --batch_size 1 --num_requests 2 --input_len 128 --output_len 128
  b --dtype fp8 --kv_cache_dtype $kv --num_requests 1000 --input_len 128 --output_len 128 --max_batch_size 512
done
grep -h -i -E "error|Traceback" "$out"/err_kv_*.txt | head -5
