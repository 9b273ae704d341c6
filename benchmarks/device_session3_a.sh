#!/usr/bin/env bash
# Issue 13, one H200 (kind nvidia-h200), about 9.5 minutes: the GPU checks of code that had only run on CPU
# (block-FP8 scale layout, FP8 KV scales in the kernels, grouped FP8 MoE), then Llama-3-8B fp8 throughput at
# larger running batches (max_batch_size 512 / 1024 / 2048 beside bf16), and 500 x 1000/1000.
#   bash benchmarks/device_session3_a.sh     results: $OUT/a.jsonl
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-bench_out}; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader; date -u
echo "== 1. block layout"; timeout 150 bash benchmarks/device_fp8_block_layout.sh 2>&1 | grep -v Warning | tail -20
echo "== 2. kv scales + moe tests"
timeout 200 python -m pytest -q -m gpu -p no:cacheprovider tests/layers/test_fp8_kv_kernel_scales.py \
  tests/layers/test_fp8_kv_scales.py tests/layers/test_attention_rotary.py tests/layers/test_triton_attention.py \
  tests/layers/test_decode_attention_configs.py tests/layers/test_fused_ops.py tests/layers/test_gemv*.py \
  "tests/layers/test_fp8_gpu.py::test_tiny_fp8_model_graphs_equal_eager" \
  "tests/layers/test_fp8_gpu.py::test_fp8_experts_grouped_gemm_equals_the_expert_loop" 2>&1 | tail -12
echo "== 3. throughput"
b() {  # b NAME FLAGS...
  local name=$1; shift
  line=$(timeout ${T:-120} python -m shardllm.bench.throughput --model llama-3-8b --load_format dummy --json "$@" \
         2> "$out/err_$name.txt" | tail -1)
  [ -z "$line" ] && { echo "$name: no output"; tail -3 "$out/err_$name.txt"; return; }
  echo "$line" | python -c "
import json, sys
d = json.loads(sys.stdin.read()); d['row'] = '$name'
open('$out/a.jsonl', 'a').write(json.dumps(d) + '\n')
print('$name', {k: d.get(k) for k in ('output_tok_s', 'tpot_ms_p50', 'batch_size', 'kv_blocks', 'load_s', 'elapsed_s', 'steps')})"
}
T128="--num_requests 1000 --input_len 128 --output_len 128"
b fp8_mb512 --dtype fp8 --max_batch_size 512 $T128
b fp8_mb1024 --dtype fp8 --max_batch_size 1024 $T128
b fp8kv_mb1024 --dtype fp8 --kv_cache_dtype fp8 --max_batch_size 1024 $T128
b fp8_mb1024_tok16k --dtype fp8 --max_batch_size 1024 --max_num_tokens 16384 $T128
b bf16_mb1024 --dtype bf16 --max_batch_size 1024 $T128
T=200 b fp8_1000_mb512 --dtype fp8 --max_batch_size 512 --num_requests 500 --input_len 1000 --output_len 1000
grep -h -i -E "Traceback|Error" "$out"/err_*.txt | sort | uniq -c | head -8
