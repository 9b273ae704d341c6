#!/usr/bin/env bash
# Issue 13's prompt_logprobs on one GPU (nvidia-h200): the gpu-marked test (Triton prefill over chunks, fp32,
# against HF transformers), then what prompt logprobs cost on a 1000-token prefill of Llama-3-8B-shaped dummy
# weights (the LM head runs over every prompt position). Run from the repo root: bash benchmarks/device_output.sh
# (~2 min, most of it start-up)
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-bench_out}; mkdir -p "$out"
timeout 300 python -m pytest -q -m gpu -p no:cacheprovider tests/test_prompt_logprobs.py 2>&1 | tee "$out/gpu_prompt_logprobs.txt"

echo "== a 1000-token prefill of Llama-3-8B dummy weights (bf16) with and without prompt_logprobs"
timeout 240 python - <<'PY' | tee "$out/prompt_logprobs_cost.txt"
import time
import torch
from shardllm import LLM, SamplingParams
llm = LLM("llama-3-8b", load_format="dummy", dtype="bf16", max_seq_len=2048)
for k in (None, None, 5, 5):
    prompt = [int(x) for x in torch.randint(100, 120000, (1000,))]  # a new one each time: no prefix-cache hit
    torch.cuda.synchronize(); t = time.perf_counter()
    out = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=k), use_tqdm=False)[0]
    torch.cuda.synchronize()
    n = len(out.prompt_logprobs) if out.prompt_logprobs else 0
    print(f"prompt_logprobs={k}: {1e3 * (time.perf_counter() - t):.1f} ms for 1000 prompt tokens ({n} entries)")
PY
