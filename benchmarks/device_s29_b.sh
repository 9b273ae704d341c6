#!/usr/bin/env bash
# Twenty-fourth session, call 4 (one H200, ~4 minutes): does Llama-3-8B fp8 + fp8 KV (dummy weights, seeded) give
# the same greedy tokens from one engine start to the next, and does the KV cache's size change them? Three
# processes: the default twice, then --kv_cache_free_gpu_memory_fraction 0.5; each prints a digest of the tokens of
# 4 prompts x 24 greedy tokens (batched) and of the first prompt alone, and its KV block count.
#     run(command="LIMIT_S=280 bash benchmarks/device_s29_b.sh")
set -u
. benchmarks/device_rows.sh
device_start 280
export CUDA_VISIBLE_DEVICES=${GPU:-0}
one() {  # NAME EXTRA_KWARGS
  [ "$(left)" -ge 70 ] || { say "$1: skipped (time)"; return; }
  timeout $(( $(left) - 10 )) python - "$2" <<'PY' 2>"$w/err_$1.txt" | sed "s/^/$1 /" | tee -a "$OUT/summary.txt"
import hashlib, json, sys
from shardllm import LLM, SamplingParams
extra = json.loads(sys.argv[1] or "{}")
llm = LLM("llama-3-8b", load_format="dummy", dtype="fp8", kv_cache_dtype="fp8", max_batch_size=16, **extra)
sp = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
prompts = [list(range(1000 + 97 * i, 1064 + 97 * i)) for i in range(4)]
batch = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
alone = llm.generate(prompts[:1], sp, use_tqdm=False)[0].outputs[0].token_ids
d = lambda x: hashlib.sha1(json.dumps(x).encode()).hexdigest()[:12]
print(f"blocks {llm.engine.num_blocks} batch {d(batch)} alone {d(alone)} first5 {batch[0][:5]} "
      f"alone==batch[0] {alone == batch[0]}")
PY
  pack
}
one default1 ""
one default2 ""
one kvhalf '{"kv_cache_free_gpu_memory_fraction": 0.5}'
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
