#!/usr/bin/env bash
# Issues 4-8 on one 4-GPU host, in parts that fit a 10-minute call each (run from the repo root):
#   bash benchmarks/device_x4.sh speed   # GPU tests, one-GPU speed (GPU 0) beside transformers, TP graph probe
#   bash benchmarks/device_x4.sh layouts # Llama-3-8B pp/tp layouts, Mixtral-8x7B tp/ep layouts, consistency
#   bash benchmarks/device_x4.sh big     # Llama-3-70B at tp 4 and tp 2 x pp 2, batch-1 decode and all-reduce share
#   bash benchmarks/device_x4.sh peer    # shardllm beside transformers eager (batch 1/64/256) and compiled static cache
#   bash benchmarks/device_x4.sh profile # where a decode step's time goes (batch 1 and 256, GPU 0)
#   bash benchmarks/device_x4.sh pp      # pipelines with and without async scheduling, on one host (A/B)
#   bash benchmarks/device_x4.sh ar      # symmetric-memory all-reduce: GPU tests, latency beside NCCL, tp runs A/B
# Results: JSON lines under $OUT (or ./bench_out). EAGER_TP=1 adds --enforce_eager to runs with tp > 1.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-bench_out}; mkdir -p "$out"
B="python -m shardllm.bench.throughput --load_format dummy --dtype bf16 --json"
bench() {  # tag timeout args...: one JSON line to $out/$tag.jsonl, errors shown
  local tag=$1 t=$2; shift 2
  echo "== $tag: $*"
  timeout "$t" $B "$@" 2> "$out/$tag.err" | tail -1 | tee -a "$out/$tag.jsonl"
  grep -h -E "Error|error:|Traceback|captured" "$out/$tag.err" | tail -3
}
eager() { [ "${EAGER_TP:-0}" = 1 ] && echo --enforce_eager; }
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
case "${1:-speed}" in
speed)
  python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  CUDA_VISIBLE_DEVICES=0 timeout 150 python -m pytest -q -m gpu -p no:cacheprovider ${GPU_TESTS:-tests/worker tests/models} 2>&1 | tail -4
  unset CUDA_VISIBLE_DEVICES
  bench probe_tp2_graphs 120 --model llama-3-8b --tp_size 2 --batch_size 1 --num_requests 2 --input_len 128 --output_len 64
  export CUDA_VISIBLE_DEVICES=0
  bench b1 120 --model llama-3-8b --batch_size 1 --num_requests 2 --input_len 128 --output_len 256
  bench t128 150 --model llama-3-8b --num_requests 1000 --input_len 128 --output_len 128
  bench t128_512 150 --model llama-3-8b --num_requests 1000 --input_len 128 --output_len 128 --max_batch_size 512
  bench t1000 200 --model llama-3-8b --num_requests 500 --input_len 1000 --output_len 1000 --max_batch_size 512
  timeout 120 python benchmarks/peer_transformers.py --batch_sizes 1 64 --input_len 128 --output_len 128 2>&1 | grep peer
  ;;
layouts)
  timeout 150 python benchmarks/tp_consistency.py --arch mixtral --layouts 1,1,1 2,1,1 2,1,2 4,1,1 4,1,4 2,2,2 --device cuda \
    --dtypes float32 > "$out/ep_consistency.json" 2> "$out/ep_consistency.err"; echo "ep consistency rc=$?"
  grep -E 'pass|vs' "$out/ep_consistency.json"
  for l in 1:1 1:2 2:1 2:2; do set -- ${l//:/ }
    E=$( [ $1 -gt 1 ] && eager )
    bench llama8b 170 --model llama-3-8b --tp_size $1 --pp_size $2 --num_requests 256 --input_len 128 --output_len 128 $E
  done
  for l in 2:1 2:2 4:1 4:4; do set -- ${l//:/ }
    bench mixtral 170 --model mixtral-8x7b --tp_size $1 --ep_size $2 --num_requests 256 --input_len 128 --output_len 128 $(eager)
  done
  ;;
big)
  bench llama70b_tp4 240 --model llama-3-70b --tp_size 4 --num_requests 1000 --input_len 128 --output_len 128 $(eager)
  bench llama70b_tp2pp2 200 --model llama-3-70b --tp_size 2 --pp_size 2 --num_requests 1000 --input_len 128 --output_len 128 $(eager)
  for mt in llama-3-70b:4 llama-3-8b:2 llama-3-8b:4; do set -- ${mt//:/ }
    bench b1_tp 120 --model $1 --tp_size $2 --batch_size 1 --num_requests 2 --input_len 128 --output_len 64 $(eager)
    SHARDLLM_PROFILE_SKIP_ALL_REDUCE=1 bench b1_tp_noar 120 --model $1 --tp_size $2 --batch_size 1 \
      --num_requests 2 --input_len 128 --output_len 64 $(eager)
  done
  ;;
peer)
  export CUDA_VISIBLE_DEVICES=0
  bench b1 120 --model llama-3-8b --batch_size 1 --num_requests 2 --input_len 128 --output_len 128
  bench t128_512 150 --model llama-3-8b --num_requests 1000 --input_len 128 --output_len 128 --max_batch_size 512
  timeout 200 python benchmarks/peer_transformers.py --batch_sizes 1 64 256 --input_len 128 --output_len 128 2>&1 | grep peer
  timeout 240 python benchmarks/peer_transformers.py --compile --batch_sizes 1 64 --input_len 128 --output_len 128 2>&1 \
    | grep peer | grep compile
  ;;
profile)
  export CUDA_VISIBLE_DEVICES=0
  for bs in 1 256; do timeout 150 python benchmarks/profile_decode.py --model llama-3-8b --batch_size $bs 2>/dev/null | tail -1; done
  ;;
pp)
  timeout 200 python -m pytest -q -m gpu -p no:cacheprovider tests/executor/test_gpu_multi.py 2>&1 | tail -3
  timeout 120 python benchmarks/tp_consistency.py --layouts 1,1,1 1,2,1 2,2,1 --device cuda --dtypes float32 \
    --async_scheduling 2>/dev/null | grep -E '"pass"|vs'
  for n in 256 1000; do
    bench pp 150 --model llama-3-8b --num_requests $n --input_len 128 --output_len 128
    bench pp 150 --model llama-3-8b --pp_size 2 --num_requests $n --input_len 128 --output_len 128 --no-async_scheduling
    bench pp 150 --model llama-3-8b --pp_size 2 --num_requests $n --input_len 128 --output_len 128 --async_scheduling
  done
  bench pp 150 --model llama-3-8b --tp_size 2 --pp_size 2 --num_requests 1000 --input_len 128 --output_len 128 --async_scheduling
  ;;
ar)
  timeout 300 python -m pytest -q -m gpu -p no:cacheprovider tests/distributed/test_fast_all_reduce.py \
    tests/executor/test_gpu_multi.py 2>&1 | tail -3
  for w in 2 4; do timeout 120 python benchmarks/all_reduce.py --world $w > "$out/all_reduce_$w.jsonl" \
    2> "$out/all_reduce_$w.err"; echo "all_reduce world=$w rc=$?"; cat "$out/all_reduce_$w.jsonl"; done
  for mt in llama-3-8b:2 llama-3-8b:4 llama-3-70b:4; do set -- ${mt//:/ }
    for ar in nccl symm_mem; do
      bench b1_ar 120 --model $1 --tp_size $2 --batch_size 1 --num_requests 2 --input_len 128 --output_len 64 --all_reduce $ar
    done
  done
  bench llama70b_tp4_ar 240 --model llama-3-70b --tp_size 4 --num_requests 1000 --input_len 128 --output_len 128 \
    --all_reduce symm_mem
  ;;
esac
