#!/usr/bin/env bash
# Issues 5 and 6 on a 4-GPU host (layouts overridable for 2 GPUs): GPU tests, layout consistency on real (tiny) weights, then
# Llama-3-8B dummy bf16 over pp/tp layouts and Mixtral-8x7B dummy bf16 over tp/ep layouts, 256 x 128/128.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-bench_out}; mkdir -p "$out"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
timeout 150 python -m pytest -q -m gpu -p no:cacheprovider ${GPU_TESTS:-tests} 2>&1 | tail -15
timeout 150 python benchmarks/tp_consistency.py --arch mixtral --layouts ${EP_LAYOUTS:-1,1,1 2,1,1 2,1,2 4,1,4 2,2,2} --device cuda \
  --dtypes float32 > "$out/ep_consistency.json" 2>/dev/null; echo "ep consistency rc=$?"; grep -E 'pass|vs' "$out/ep_consistency.json"
timeout 120 python benchmarks/tp_consistency.py --layouts ${PP_LAYOUTS:-1,1,1 1,2,1 2,2,1} --device cuda --dtypes float32 \
  > "$out/pp_consistency.json" 2>/dev/null; echo "pp consistency rc=$?"; grep -E 'pass|vs' "$out/pp_consistency.json"
bench() {  # model tp pp ep
  timeout 170 python -m shardllm.bench.throughput --model $1 --load_format dummy --dtype bf16 --tp_size $2 --pp_size $3 \
    --ep_size $4 --num_requests 256 --input_len 128 --output_len 128 --json 2> "$out/err_$1_$2_$3_$4.txt" | tail -1 | tee -a "$out/tput.jsonl"
  tail -c 300 "$out/err_$1_$2_$3_$4.txt" | grep -i error
}
for l in ${LLAMA_LAYOUTS:-1:1:1 1:2:1 2:1:1 2:2:1}; do bench llama-3-8b ${l//:/ }; done
for l in ${MOE_LAYOUTS:-2:1:1 2:1:2 4:1:1 4:1:4}; do bench mixtral-8x7b ${l//:/ }; done
