#!/usr/bin/env bash
# Issue 13, grouped FP8 MoE on one H200 (kind nvidia-h200): the FP8 MoE GPU tests (fast backend per format, the MoE
# layer captured in a CUDA graph against eager, a tiny block-FP8 Mixtral with and without graphs), one Mixtral-8x7B
# MoE layer per weight format (grouped in a CUDA graph beside bf16 and the old per-expert loop), the block kernel's
# tile choices, and Mixtral-8x7B fp8 dummy 1000 x 128/128 (online per-channel weights). About 3 minutes.
#   bash benchmarks/device_moe_fp8.sh            tests + layer + Mixtral online fp8
#   bash benchmarks/device_moe_fp8.sh all        + Mixtral with dummy block-FP8 (128x128) and per-tensor static
#                                                  checkpoints (a config.json with a quantization_config, dummy
#                                                  weights): about 2 more minutes
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-bench_out}; mkdir -p "$out"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader; date -u
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 150 python -m pytest -q -m gpu -p no:cacheprovider tests/layers/test_fp8_moe_gpu.py \
  "tests/layers/test_fp8_gpu.py::test_fp8_experts_grouped_gemm_equals_the_expert_loop" 2>&1 | tail -15
timeout 120 python benchmarks/fp8_moe_layer.py 2>&1 | grep -v Warning | tee "$out/moe_layer.jsonl"
timeout 90 python benchmarks/fp8_moe_layer.py --sweep_block --tokens 1,64,2048 2>&1 | grep -v Warning \
  | tee "$out/block_tiles.jsonl"
b() {  # one throughput run; the JSON line to stdout and $out/mixtral.jsonl
  timeout ${T:-150} python -m shardllm.bench.throughput --load_format dummy --num_requests 1000 --input_len 128 \
    --output_len 128 --json "$@" 2> "$out/err_$RANDOM.txt" | tail -1 | tee -a "$out/mixtral.jsonl" | cut -c1-700
}
b --model mixtral-8x7b --dtype fp8
if [ "${1:-}" = all ]; then
  for fmt in block static; do  # dummy pre-quantized checkpoints: the shipped config plus a quantization_config
    dir=$(mktemp -d)
    python - "$dir" "$fmt" <<'EOF'
import json, sys
cfg = json.load(open("shardllm/model_loader/configs/mixtral-8x7b.json"))
cfg["quantization_config"] = ({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
                              if sys.argv[2] == "block" else {"quant_method": "fp8", "activation_scheme": "static"})
json.dump(cfg, open(sys.argv[1] + "/config.json", "w"))
EOF
    b --model "$dir"
  done
fi
grep -h -i -E "error|Traceback|fail|warn.*(grouped|Triton|graph)" "$out"/err_*.txt | sort | uniq -c | head -12
