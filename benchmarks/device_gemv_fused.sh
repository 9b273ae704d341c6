#!/usr/bin/env bash
# Issues 15 / 13 on one H200 (kind nvidia-h200), about 4-5 minutes (an estimate: not yet run): SiLU-and-mul folded
# into the down projection's GEMV at M <= 2 (shardllm/layers/gemv_silu.py).
# 1. GPU tests: the fused kernel bit-equal to silu_and_mul + GEMV at Llama-3-8B down shapes, graph capture, an MLP,
#    a tiny Llama's tokens (bf16, fp8, CUDA graphs) with the switch on and off; and the plain GEMV's tests;
# 2. micro-benchmark (benchmarks/gemv_silu.py): fused vs silu_and_mul + the engine's down path, Llama-3-8B down at
#    tp 1 and 2, bf16 and fp8, M 1 and 2, CUDA graphs; prints FUSED_SILU_TABLES' JSON;
# 3. batch-1 TPOT of Llama-3-8B dummy, bf16 and fp8, SHARDLLM_GEMV_FUSED_SILU=0 (old) and 1 (new), one at a time;
#    EXTRA=1 (+1 minute): also SHARDLLM_GEMV_FUSED_NORM=1 (add + RMSNorm folded into qkv / gate_up, opt-in) with the
#    SiLU fusion on, and the norm-fused GEMV's GPU tests (tests/layers/test_gemv_norm.py) in part 1.
# The kernels' part 2 also times the norm-fused GEMV against add + RMSNorm + GEMV at qkv / gate_up shapes.
# Limits: tests 150 s, kernels 80 s, each engine row ROW_TIMEOUT (75) s: at most ~530 s, ~680 s with EXTRA=1 (then set
# ROW_TIMEOUT=55 to stay under a 600 s call). Batch-1 rows use --batch_size 1 (one graph bucket: a short capture).
#   bash benchmarks/device_gemv_fused.sh      results: $OUT/gemv_fused.jsonl, logs $OUT/err_*.txt
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-bench_out}; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader; date -u
t0=$SECONDS

echo "== 1. GPU tests"
timeout 150 python -m pytest -q -m gpu -p no:cacheprovider -rfEs --durations=5 \
  tests/layers/test_gemv_silu.py tests/layers/test_gemv.py ${EXTRA:+tests/layers/test_gemv_norm.py} 2>&1 | tail -14
echo "tests: $((SECONDS - t0)) s"

echo "== 2. kernels"
timeout 80 python benchmarks/gemv_silu.py --budget_s 24 2>&1 | grep -v Warning
echo "kernels: $((SECONDS - t0)) s"

echo "== 3. batch-1 TPOT, switch 0 (silu_and_mul + down) and 1 (fused)"
for dtype in bfloat16 fp8; do
  for sw in 0 1 ${EXTRA:+norm}; do
    norm=0; [ "$sw" = norm ] && { sw=1; norm=1; }
    err="$out/err_${dtype}_$sw$norm.txt"
    line=$(SHARDLLM_GEMV_FUSED_SILU=$sw SHARDLLM_GEMV_FUSED_NORM=$norm timeout ${ROW_TIMEOUT:-75} \
           python -m shardllm.bench.throughput --model llama-3-8b --load_format dummy --dtype $dtype \
           --batch_size 1 --num_requests 2 --input_len 128 --output_len 128 --json 2> "$err" | tail -1)
    [ -z "$line" ] && { echo "$dtype silu=$sw norm=$norm: no output"; tail -3 "$err"; continue; }
    echo "$line" | python -c "
import json, sys
d = json.loads(sys.stdin.read()); d.update(gemv_fused_silu=$sw, gemv_fused_norm=$norm, dtype_arg='$dtype')
open('$out/gemv_fused.jsonl', 'a').write(json.dumps(d) + '\n')
keys = ('tpot_ms_p50', 'tpot_ms_p99', 'output_tok_s', 'load_s', 'elapsed_s')
print('$dtype silu=$sw norm=$norm', {k: d.get(k) for k in keys})"
  done
done
echo "total: $((SECONDS - t0)) s"; date -u
