#!/usr/bin/env bash
# Issue 19 on a 2-GPU host (nvidia-h200-x2): the guide's scaling tables from `shardllm bench --sweep`.
# Llama-3-8B dummy weights, 1000 requests x 128 in / 128 out, layouts tp=1, tp=2, pp=2, each in its own engine;
# bf16, then fp8 (if `--dtype fp8` is not supported yet, its sweep ends with a clear error and nothing else breaks).
# Run from the repo root:  bash benchmarks/device_bench.sh [all|bf16|fp8]   (about 3 minutes a dtype)
# (MODEL=... EXTRA="--device cpu" bash benchmarks/device_bench.sh float32: the same on a CPU, for a dry run.)
# Results under $OUT (or ./bench_out): sweep_<dtype>.json (the rows), sweep_<dtype>.err (logs), table.txt,
# scaling.png (both dtypes, efficiency against the fewest GPUs that fit).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-bench_out}; mkdir -p "$out"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
dtypes=${1:-all}; [ "$dtypes" = all ] && dtypes="bf16 fp8"
done_files=()
for dt in $dtypes; do
  echo "== sweep $dt"
  python -m shardllm.entrypoints.cli bench --model ${MODEL:-llama-3-8b} --load_format dummy --dtype "$dt" ${EXTRA:-} \
    --sweep "tp=1,2" --sweep "pp=2" --num_requests ${NUM_REQUESTS:-1000} --input_len ${LEN:-128} --output_len ${LEN:-128} \
    --layout_timeout 240 --json > "$out/sweep_$dt.json" 2> "$out/sweep_$dt.err"
  echo "rc=$?"
  tr '\r' '\n' < "$out/sweep_$dt.err" | grep -E "^\[sweep|error:|Error"
  [ -s "$out/sweep_$dt.json" ] && done_files+=("$out/sweep_$dt.json")
done
if [ ${#done_files[@]} -gt 0 ]; then
  python -m shardllm.bench.plot "${done_files[@]}" -o "$out/scaling.png" | tee "$out/table.txt"
  python - "${done_files[@]}" <<'EOF'
import json, sys
for path in sys.argv[1:]:  # the figures docs/benchmarks.md records, one line per row
    for r in json.loads(open(path).read().strip().splitlines()[-1])["rows"]:
        keys = ("layout", "dtype", "status", "output_tok_s", "output_tok_s_per_gpu", "tpot_ms_p50", "ttft_ms_p50",
                "efficiency", "weights_gib_per_rank", "kv_cache_gib_per_rank", "elapsed_s", "error")
        print({k: r.get(k) for k in keys if k in r})
EOF
fi
