#!/usr/bin/env bash
# Issue 4 on a GPU host: tp consistency on real (tiny) weights, then Llama-3-8B dummy bf16 at tp = 1, 2, 4.
# Run from the repo root on the device: bash benchmarks/device_tp.sh  (results under $OUT or ./bench_out)
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-bench_out}; mkdir -p "$out"
nvidia-smi --query-gpu=index,name,memory.total --format=csv | tee "$out/gpus.csv"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 240 python benchmarks/tp_consistency.py --tp 1 2 4 --device cuda > "$out/consistency.json" 2> "$out/consistency.err"
echo "consistency rc=$?"; grep -E '"pass"|tp=' "$out/consistency.json"; tail -3 "$out/consistency.err"
for tp in ${TPS:-1 2 4}; do
  timeout 200 python -m shardllm.bench.throughput --model llama-3-8b --load_format dummy --dtype bf16 --tp_size $tp \
    --num_requests 256 --input_len 128 --output_len 128 --json 2> "$out/tput_tp$tp.err" | tail -1 | tee -a "$out/tput.jsonl"
  tail -2 "$out/tput_tp$tp.err"
  timeout 120 python -m shardllm.bench.throughput --model llama-3-8b --load_format dummy --dtype bf16 --tp_size $tp \
    --batch_size 1 --num_requests 2 --input_len 128 --output_len 64 --json 2> "$out/lat_tp$tp.err" | tail -1 | tee -a "$out/lat.jsonl"
  tail -2 "$out/lat_tp$tp.err"
done
