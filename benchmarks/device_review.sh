#!/usr/bin/env bash
# The review fixes that meet real GPUs (nvidia-h200 or nvidia-h200-x2): what NVML says the NVLinks lead to and the
# compute capability (doctor's multicast advice rests on them), the NVLink links-active gauge now polled, and
# `shardllm doctor`'s settings finding on this host. Run from the repo root: bash benchmarks/device_review.sh (~1 min)
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-bench_out}; mkdir -p "$out"
nvidia-smi --query-gpu=index,name,compute_cap,driver_version --format=csv | tee "$out/review_gpus.csv"
nvidia-smi nvlink --status | head -24 | tee "$out/review_nvlink_status.txt"

echo "== GPU test: inspect_host (nvswitch, compute capability) and the polled links gauge"
timeout 120 python -m pytest -q -m gpu -p no:cacheprovider -s tests/metrics/test_gpu_nvml.py \
  -k "what_nvlink_leads_to or memory_gauges" 2>&1 | grep -E '^\{|passed|failed|Error|assert' | tee "$out/review_gpu_tests.txt"

echo "== shardllm doctor (the multicast variables are set here, as on every machine of this workplace)"
timeout 60 python -m shardllm.entrypoints.cli doctor --json > "$out/review_doctor.json"; echo "doctor rc=$?"
python - "$out/review_doctor.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
for f in report["findings"]:
    if f["check"] in ("settings", "topology", "nvlink", "gpus"):
        print(f"[{f['severity']}] {f['check']}: {f['seen']}" + (f" -- {f['why']}" if f["why"] else ""))
PY
