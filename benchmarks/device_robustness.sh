#!/usr/bin/env bash
# Issue 12 items 5, 10, 12 on GPUs (nvidia-h200-x2; on one GPU the tp=2 case runs at tp=1): sampling edges on CUDA
# (tiny top_p, an underflowing repetition penalty, logit_bias), one request's raising logits processor failing that
# request alone with CUDA graphs and async scheduling on every tp rank, then a short throughput run to check that
# the sampler's extra guards cost nothing measurable (compare output_tok_s with docs/benchmarks.md).
# Run from the repo root:  bash benchmarks/device_robustness.sh      (about 3 minutes)
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
python -m pytest -q -m gpu -p no:cacheprovider tests/worker/test_sampler_limits.py tests/engine/test_request_faults.py
echo "pytest rc=$?"
python -m shardllm.entrypoints.cli bench --model llama-3-8b --load_format dummy --dtype bf16 --num_requests 500 \
  --input_len 128 --output_len 128 --json 2>/dev/null | tail -1 | python -c "
import json, sys; r = json.loads(sys.stdin.read()); print({k: r[k] for k in ('output_tok_s', 'tpot_ms_p50', 'steps')})"
