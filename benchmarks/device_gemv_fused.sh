#!/usr/bin/env bash
# Issues 15 / 13 on one H200 (kind nvidia-h200), about 3-4 minutes: SiLU-and-mul folded into the down projection's
# GEMV at M <= 2 (shardllm/layers/gemv_silu.py).
# 1. GPU tests: the fused kernel bit-equal to silu_and_mul + GEMV at Llama-3-8B down shapes, graph capture, an MLP,
#    a tiny Llama's tokens (bf16, fp8, CUDA graphs) with the switch on and off; and the plain GEMV's tests;
# 2. micro-benchmark (benchmarks/gemv_silu.py): fused vs silu_and_mul + the engine's down path, Llama-3-8B down at
#    tp 1 and 2, bf16 and fp8, M 1 and 2, CUDA graphs; prints FUSED_SILU_TABLES' JSON;
# 3. batch-1 TPOT of Llama-3-8B dummy, bf16 and fp8, SHARDLLM_GEMV_FUSED_SILU=0 (old) and 1 (new), one at a time.
#   bash benchmarks/device_gemv_fused.sh      results: $OUT/gemv_fused.jsonl, logs $OUT/err_*.txt
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-bench_out}; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader; date -u
t0=$SECONDS

echo "== 1. GPU tests"
timeout 170 python -m pytest -q -m gpu -p no:cacheprovider -rfEs --durations=5 \
  tests/layers/test_gemv_silu.py tests/layers/test_gemv.py 2>&1 | tail -14
echo "tests: $((SECONDS - t0)) s"

echo "== 2. kernels"
timeout 80 python benchmarks/gemv_silu.py --budget_s 40 2>&1 | grep -v Warning
echo "kernels: $((SECONDS - t0)) s"

echo "== 3. batch-1 TPOT, switch 0 (silu_and_mul + down) and 1 (fused)"
for dtype in bfloat16 fp8; do
  for sw in 0 1; do
    line=$(SHARDLLM_GEMV_FUSED_SILU=$sw timeout ${ROW_TIMEOUT:-120} python -m shardllm.bench.throughput \
           --model llama-3-8b --load_format dummy --dtype $dtype --batch_size 1 --num_requests 2 --input_len 128 \
           --output_len 128 --json 2> "$out/err_${dtype}_$sw.txt" | tail -1)
    [ -z "$line" ] && { echo "$dtype fused=$sw: no output"; tail -3 "$out/err_${dtype}_$sw.txt"; continue; }
    echo "$line" | python -c "
import json, sys
d = json.loads(sys.stdin.read()); d.update(gemv_fused_silu=$sw, dtype_arg='$dtype')
open('$out/gemv_fused.jsonl', 'a').write(json.dumps(d) + '\n')
print('$dtype fused=$sw', {k: d.get(k) for k in ('tpot_ms_p50', 'tpot_ms_p99', 'output_tok_s', 'load_s', 'elapsed_s')})"
  done
done
echo "total: $((SECONDS - t0)) s"; date -u
