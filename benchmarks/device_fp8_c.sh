#!/usr/bin/env bash
# Issue 13, third pass on one H200: Llama-3-8B bf16 beside fp8 (tuned small-M kernel) at batch 1 and 1000 x 128/128.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-bench_out}; mkdir -p "$out"
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
b() { timeout ${T:-60} python -m shardllm.bench.throughput --load_format dummy --model llama-3-8b "$@" --json \
      2> "$out/err_$#_$RANDOM.txt" | tail -1 | tee -a "$out/fp8c.jsonl" | python -c "import json,sys; r=json.loads(sys.stdin.read()); print({k: r.get(k) for k in ('dtype','quantization','batch_size','output_tok_s','tpot_ms_p50','fraction_of_roofline','roofline_ms_per_token')})"; }
for dt in bf16 fp8; do
  b --dtype $dt --batch_size 1 --num_requests 2 --input_len 128 --output_len 128
  b --dtype $dt --num_requests 1000 --input_len 128 --output_len 128 --max_batch_size 512
done
grep -h -i -E "error|Traceback" "$out"/err_*.txt | head -5
