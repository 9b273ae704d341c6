#!/usr/bin/env bash
# Issue 13, FP8 KV-cache scales inside the Triton kernels (one H200, kind nvidia-h200, about 6-7 min; PROFILE=1 runs
# only part 4, about 3 min, as a separate call). Run from the repo root:  bash benchmarks/device_kv_scales.sh
#  1. GPU tests: the scaled kernels against the torch reference, a CUDA graph reading scales set after its capture,
#     no more launches with an e4m3 cache than with bf16, the tuned fp8 decode configs with scales; the engine-level
#     first-step-scales test and the attention / fused-op / decode-config GPU tests the change touches.
#  2. benchmarks/kv_scale_kernels.py: Llama-3-8B attention shapes, 32 layers in one CUDA graph, old (four torch ops
#     per layer) beside new (in the kernels), batch 1 / 64 / 512: GPU us per decode step.
#  3. Llama-3-8B (dummy weights), fp8 weights + e4m3 cache, SHARDLLM_KV_SCALES_IN_KERNELS=0 (old) beside 1 (new),
#     fp8 + bf16 cache for reference: batch-1 TPOT and 1000 x 128/128 (max batch 512).
#  4. (PROFILE=1, instead of 1-3) benchmarks/profile_decode.py at batch 1 and 512, old beside new: kernels and wall
#     per step.
# Results under $OUT (or ./bench_out): kv_scale_kernels.jsonl, kv_scales_bench.jsonl, kv_scales_profile_*.jsonl.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-bench_out}; mkdir -p "$out"
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv,noheader; date -u
if [ "${PROFILE:-0}" != 1 ]; then
timeout 240 python -m pytest -q -m gpu -p no:cacheprovider tests/layers/test_fp8_kv_kernel_scales.py \
  tests/layers/test_fp8_kv_scales.py tests/layers/test_attention_rotary.py tests/layers/test_triton_attention.py \
  tests/layers/test_decode_attention_configs.py tests/layers/test_fused_ops.py \
  "tests/layers/test_fp8_gpu.py::test_tiny_fp8_model_graphs_equal_eager" \
  2>&1 | tail -12
timeout 90 python benchmarks/kv_scale_kernels.py --batch_sizes 1 64 512 --seq_len 170 --layers 32 \
  2> "$out/err_kv_scale_kernels.txt" | tee "$out/kv_scale_kernels.jsonl"
b() { timeout ${T:-100} python -m shardllm.bench.throughput --load_format dummy --model llama-3-8b --dtype fp8 "$@" \
      --json 2> "$out/err_kvs_$RANDOM.txt" | tail -1 | tee -a "$out/kv_scales_bench.jsonl" | python -c "
import json, os, sys
r = json.loads(sys.stdin.read())
print(os.environ.get('SHARDLLM_KV_SCALES_IN_KERNELS', '1'), {k: r.get(k) for k in ('kv_cache_dtype', 'batch_size', 'output_tok_s', 'tpot_ms_p50')})"; }
for v in 0 1; do
  export SHARDLLM_KV_SCALES_IN_KERNELS=$v
  b --kv_cache_dtype fp8 --batch_size 1 --num_requests 2 --input_len 128 --output_len 128
  b --kv_cache_dtype fp8 --num_requests 1000 --input_len 128 --output_len 128 --max_batch_size 512
done
export SHARDLLM_KV_SCALES_IN_KERNELS=1
b --kv_cache_dtype auto --batch_size 1 --num_requests 2 --input_len 128 --output_len 128
b --kv_cache_dtype auto --num_requests 1000 --input_len 128 --output_len 128 --max_batch_size 512
else
  for v in 0 1; do
    SHARDLLM_KV_SCALES_IN_KERNELS=$v timeout 120 python benchmarks/profile_decode.py --model llama-3-8b --dtype fp8 \
      --kv_cache_dtype fp8 --batch_sizes 1 512 --steps 16 --top 8 2> "$out/err_kvs_profile_$v.txt" \
      > "$out/kv_scales_profile_$v.jsonl"
    echo "SHARDLLM_KV_SCALES_IN_KERNELS=$v"; python benchmarks/profile_decode.py --summary "$out/kv_scales_profile_$v.jsonl"
  done
fi
grep -h -i -E "error|Traceback" "$out"/err_kv*.txt | head -6
