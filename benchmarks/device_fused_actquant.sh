#!/usr/bin/env bash
# Issue 13, one H200 (kind nvidia-h200), about 3-4 minutes: FP8 activation quantization fused into RMSNorm and
# SiLU-and-mul (shardllm/layers/quantization/fp8_fused.py). 1. its GPU tests (bit-exact kernels, a tiny FP8 Llama's
# tokens with CUDA graphs on = off); 2. fused vs unfused kernels at M 512/1024/8192, H 4096 / I 14336, CUDA graphs;
# 3. Llama-3-8B fp8 1000 x 128/128 at max batch 1024 with SHARDLLM_FP8_FUSED_ACT_QUANT=0 (unfused) and 1 (fused).
#   bash benchmarks/device_fused_actquant.sh     results: $OUT/fused_actquant.jsonl, logs $OUT/err_*.txt
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-bench_out}; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader; date -u
echo "== 1. GPU tests"
timeout 170 python -m pytest -q -m gpu -p no:cacheprovider -rfEs --durations=5 \
  tests/layers/test_fp8_fused_act_quant.py 2>&1 | tail -12
echo "== 2. kernels"
timeout 90 python benchmarks/fused_act_quant.py 2>&1 | grep -v Warning
echo "== 3. throughput"
for sw in 0 1; do
  line=$(SHARDLLM_FP8_FUSED_ACT_QUANT=$sw timeout ${T:-150} python -m shardllm.bench.throughput --model llama-3-8b \
         --load_format dummy --dtype fp8 --max_batch_size 1024 --max_num_tokens 16384 --num_requests 1000 \
         --input_len 128 --output_len 128 --json 2> "$out/err_fused$sw.txt" | tail -1)
  [ -z "$line" ] && { echo "fused=$sw: no output"; tail -3 "$out/err_fused$sw.txt"; continue; }
  echo "$line" | python -c "
import json, sys
d = json.loads(sys.stdin.read()); d['fp8_fused_act_quant'] = $sw
open('$out/fused_actquant.jsonl', 'a').write(json.dumps(d) + '\n')
print('fused=$sw', {k: d.get(k) for k in ('output_tok_s', 'tpot_ms_p50', 'batch_size', 'load_s', 'elapsed_s', 'steps')})"
done
date -u
