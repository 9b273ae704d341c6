#!/usr/bin/env bash
# Issues 13 and 15 on two GPUs (kind nvidia-h200-x2): where a decode step's time goes on every rank.
# Llama-3-8B dummy, input 128, batch 1 and 512 in one engine per layout: tp1 bf16 and tp1 fp8 (side by side, one GPU
# each), then tp2 bf16, then pp2 bf16 (synchronous scheduling, the pp default). About 2.5 min; the timeouts add up
# to 250 s. Run from the repo root on the device: bash benchmarks/device_profile.sh  (results under $OUT)
# EXTRA=1 adds pp2 with --async_scheduling on and tp2 with --all_reduce symm_mem (about 1.5 min more).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-bench_out}; mkdir -p "$out"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
common=(--model llama-3-8b --load_format dummy --input_len 128 --batch_sizes 1 512 --steps 16 --top 15)
p() {  # name timeout args...: one layout, its JSON lines in $out/<name>.jsonl, rank files under $out/ranks_<name>
  local name=$1 t=$2; shift 2
  timeout "$t" python benchmarks/profile_decode.py "${common[@]}" --out_dir "$out/ranks_$name" "$@" \
    > "$out/$name.jsonl" 2> "$out/$name.err"
  echo "$name rc=$? ($(grep -c '^{' "$out/$name.jsonl") of 2 lines)"
  grep -E "Error|error:|Traceback" "$out/$name.err" | head -3
}
CUDA_VISIBLE_DEVICES=0 p tp1_bf16 100 --dtype bf16 &
CUDA_VISIBLE_DEVICES=1 p tp1_fp8 100 --dtype fp8 &
wait
p tp2_bf16 75 --dtype bf16 --tp_size 2
p pp2_bf16 75 --dtype bf16 --pp_size 2
if [ "${EXTRA:-0}" = 1 ]; then
  p pp2_bf16_async 75 --dtype bf16 --pp_size 2 --async_scheduling on
  p tp2_bf16_symm 75 --dtype bf16 --tp_size 2 --all_reduce symm_mem
fi
echo "==== summary (per step; kernels: top 3 by time on each rank) ===="
files=""
for n in tp1_bf16 tp1_fp8 tp2_bf16 pp2_bf16 pp2_bf16_async tp2_bf16_symm; do
  [ -s "$out/$n.jsonl" ] && files="$files $out/$n.jsonl"
done
[ -n "$files" ] && python benchmarks/profile_decode.py --summary $files
