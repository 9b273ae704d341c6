#!/usr/bin/env bash
# Issue 14 on the GPU machine: tp = 2 over Ray beside the multiproc executor on two H200s (kind nvidia-h200-x2).
# The image has no Ray: pack it here first (bash benchmarks/pack_ray_for_device.sh), then run with carry [".whl"]:
#   bash benchmarks/device_ray.sh            # ~4 min: GPU tests of the Ray executor, Llama-3-8B tp 2 mp vs ray
# Results: JSON lines under $OUT (or ./bench_out); the script prints whether the greedy tokens agree and the
# throughput ratio ray / mp.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 RAY_TMPDIR=/tmp/rayd HOME=/tmp/rayd
out=${OUT:-bench_out}; mkdir -p "$out" /tmp/rayd /tmp/rayslim
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
tar -C /tmp/rayslim -xJf .whl/ray-*-slim.tar.xz || { echo "no packed Ray under .whl/"; exit 1; }
chmod +x /tmp/rayslim/ray/core/src/ray/gcs/gcs_server /tmp/rayslim/ray/core/src/ray/raylet/raylet  # older packs lack the modes
python3 -m pip install -q --no-index --find-links .whl jsonschema 2>&1 | tail -2
export PYTHONPATH=/tmp/rayslim:.
python3 -c "import ray, torch; print('ray', ray.__version__, 'torch', torch.__version__, torch.cuda.device_count(), 'GPUs')"
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/executor/test_ray_gpu.py 2>&1 | tail -5
for b in mp ray; do
  echo "== llama-3-8b tp 2, $b"
  timeout 240 python3 benchmarks/ray_vs_mp.py --backend $b --tp 2 > "$out/ray_vs_mp_$b.json" 2> "$out/ray_vs_mp_$b.err"
  echo "rc=$?"; grep -h -E "Error|error:|Traceback" "$out/ray_vs_mp_$b.err" | tail -3
done
python3 - "$out" <<'PY'
import json, sys
r = {b: json.loads(open(f"{sys.argv[1]}/ray_vs_mp_{b}.json").read().splitlines()[-1]) for b in ("mp", "ray")}
for b, x in r.items():
    print(b, {k: v for k, v in x.items() if k != "greedy_tokens"})
print("greedy tokens equal:", r["mp"]["greedy_tokens"] == r["ray"]["greedy_tokens"])
print("throughput ray / mp: %.3f" % (r["ray"]["output_tok_per_s"] / r["mp"]["output_tok_per_s"]))
PY
