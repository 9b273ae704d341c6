#!/usr/bin/env bash
# Issue 16 on a 2-GPU host (nvidia-h200-x2): the topology as nvidia-smi and `shardllm doctor` see it, the NVML GPU
# tests (memory gauges vs CUDA, NVLink tx vs a 1 GiB all-reduce, doctor finds NVLink, planner vs measured memory for
# Llama-3-8B dummy at tp 1 and 2, with the engine's start-up summary), `shardllm plan` on the local GPUs, and one
# /metrics exposition of the real GPUs. Run from the repo root: bash benchmarks/device_ops.sh (~4 min)
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-bench_out}; mkdir -p "$out"
nvidia-smi --query-gpu=index,name,uuid,pci.bus_id,memory.total,driver_version --format=csv | tee "$out/gpus.csv"
nvidia-smi topo -m | tee "$out/topo.txt"
nvidia-smi nvlink --status | head -24 | tee "$out/nvlink_status.txt"
python -c "import pynvml, torch; print('nvidia-ml-py', pynvml.__version__ if hasattr(pynvml, '__version__') else '?', 'torch', torch.__version__)"

echo "== shardllm doctor"
timeout 60 python -m shardllm.entrypoints.cli doctor | tee "$out/doctor.txt"; echo "doctor rc=${PIPESTATUS[0]}"
timeout 60 python -m shardllm.entrypoints.cli doctor --json > "$out/doctor.json"

echo "== GPU tests (figures printed as JSON lines; start-up summaries from the shardllm.startup logger)"
timeout 420 python -m pytest -q -m gpu -p no:cacheprovider -s -o log_cli=true --log-cli-level=INFO \
  tests/metrics/test_gpu_nvml.py 2>&1 | grep -E '^\{|shardllm.startup|passed|failed|Error|assert' | tee "$out/gpu_tests.txt"

echo "== shardllm plan on the local GPUs"
timeout 60 python -m shardllm.entrypoints.cli plan llama-3-8b --input_len 128 --output_len 128 | tee "$out/plan_8b.txt"
timeout 60 python -m shardllm.entrypoints.cli plan llama-3-70b --dtype fp8 | head -6 | tee "$out/plan_70b_fp8.txt"

echo "== /metrics of the real GPUs (NVML)"
timeout 60 python - <<'PY' | tee "$out/metrics_gpu.txt"
import time
from shardllm.metrics import EngineSnapshot, LatencyHistograms
from shardllm.metrics.gpu_monitor import GPUMonitor, RankDevice
from shardllm.metrics.prometheus import make_registry, render
import torch
n = torch.cuda.device_count()
mon = GPUMonitor([RankDevice(r, r, 0, r) for r in range(n)], interval_s=0.5).start()
time.sleep(1.2)
text = render(make_registry(lambda: EngineSnapshot(), LatencyHistograms(), "ops", gpu_monitor=mon)).decode()
print("\n".join(l for l in text.splitlines() if l.startswith("shardllm_gpu")))
t = time.perf_counter(); [render(make_registry(lambda: EngineSnapshot(), LatencyHistograms(), "ops", gpu_monitor=mon)) for _ in range(100)]
print(f"scrape: {(time.perf_counter() - t) * 10:.2f} ms each (cache only, no NVML call)")
mon.stop()
PY
