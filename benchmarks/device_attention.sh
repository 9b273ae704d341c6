#!/usr/bin/env bash
# Issues 13 / 15 on one H200 (kind nvidia-h200, about 65 s): the decode-attention launch sweep
# (benchmarks/attention_sweep.py: bf16 and fp8_e4m3 caches, Llama-3-8B heads, batch 512/256/64/1), then the
# kernel's GPU tests of the tunable configs. Run from the repo root:  bash benchmarks/device_attention.sh
# Results under $OUT (or ./bench_out): attention_rows.jsonl (every row), attention_sweep.txt (log + JSON table).
# The sweep compiles its grid in 12 processes first (~15 s), then times it for ~20 s; paste its
# "DECODE_CONFIGS = {...}" line into shardllm/layers/attention/decode_configs.py. End to end, the tuned and the
# original launch compare by SHARDLLM_DECODE_ATTN_TUNED=1 / 0 on the same command (e.g. shardllm bench).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-bench_out}; mkdir -p "$out"
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv,noheader; date -u
timeout 50 python benchmarks/attention_sweep.py --budget_s 34 --out "$out/attention_rows.jsonl" \
  > "$out/attention_sweep.txt" 2>&1
echo "sweep rc=$?"
cut -c1-3000 "$out/attention_sweep.txt"
timeout 18 python -m pytest -q -m gpu -p no:cacheprovider tests/layers/test_decode_attention_configs.py 2>&1 | tail -4
