#!/usr/bin/env bash
# Twenty-third session, call 2 (one H200, about 7 minutes): do the engine-process server (SHARDLLM_ENGINE_PROCESS=1)
# and the default one give the same greedy tokens on the GPU? Call 1's two texts from Llama-3-8B's random (dummy)
# weights parted after the first token. Here each server answers one greedy request (64 prompt ids, 48 tokens,
# top-2 logprobs) before and after a warm-up, on (a) a tiny random Llama whose LM head is scaled so that its top two
# logits are far apart (tests/helpers.write_text_checkpoint, bf16), (b) Llama-3-8B fp8 dummy. The comparison names the
# first token where two answers part and the gap between the top two logprobs there in each.
#     run(command="LIMIT_S=500 bash benchmarks/device_s28_b.sh", carry=[".whl_serve", ".bench_tokenizer"])
# Call 3: the 8B alone, each mode's server started twice (is a difference the mode's or one server start's?):
#     run(command="MODELS=8b STARTS=2 LIMIT_S=560 bash benchmarks/device_s28_b.sh", carry=[...as above])
set -u
. benchmarks/device_rows.sh
. benchmarks/serve_rows.sh
device_start 500
export CUDA_VISIBLE_DEVICES=${GPU:-0}
serve_setup
TOK="--tokenizer .bench_tokenizer"
PORT=${PORT:-8123}; URL="http://127.0.0.1:$PORT"
python -c "from tests.helpers import write_text_checkpoint as w; w('/tmp/tiny', 128256, max_position_embeddings=4096)"
greedy() {  # FILE: one greedy completion with top-2 logprobs, its JSON choice appended to FILE
  python - "$URL" >> "$1" 2>&1 <<'PY'
import json, sys, urllib.request as u
url = sys.argv[1]
model = json.load(u.urlopen(url + "/v1/models"))["data"][0]["id"]
body = {"model": model, "prompt": list(range(1000, 1064)), "max_tokens": 48, "temperature": 0, "ignore_eos": True,
        "logprobs": 2}
req = u.Request(url + "/v1/completions", json.dumps(body).encode(), {"content-type": "application/json"})
print(json.dumps(json.load(u.urlopen(req))["choices"][0]))
PY
}
pair() {  # NAME "ENV": start (serve_up warms after its health check), greedy, warm again, greedy, stop
  [ "$(left)" -ge 60 ] || { say "$1: skipped (time)"; return; }
  serve_up "$1" "$2" "" || return
  greedy "$w/g_$1.jsonl"
  timeout 60 python -m shardllm.entrypoints.cli bench serve --url "$URL" --json --disable_tqdm --num_prompts 256 \
    --input_len 128 --output_len 64 > /dev/null 2>&1
  greedy "$w/g_$1.jsonl"
  serve_down
}
for model in ${MODELS:-tiny 8b}; do
  [ $model = tiny ] && SERVE_MODEL="/tmp/tiny --dtype bfloat16" \
    || SERVE_MODEL="llama-3-8b --load_format dummy --dtype fp8 --kv_cache_dtype fp8 --max_batch_size 64"
  for k in $(seq ${STARTS:-1}); do
    pair ${model}_process SHARDLLM_ENGINE_PROCESS=1
    pair ${model}_thread ""
  done
done
python - "$w" <<'PY' | tee -a "$OUT/summary.txt"
import itertools, json, sys
w = sys.argv[1]
def load(name):
    try:
        return [json.loads(l) for l in open(f"{w}/g_{name}.jsonl") if l.startswith("{")]
    except FileNotFoundError:
        return []
def gap(c, i):
    top = sorted(c["logprobs"]["top_logprobs"][i].values(), reverse=True)
    return round(top[0] - top[1], 4) if len(top) > 1 else None
for model in ("tiny", "8b"):
    # each server start appends two answers (before and after its warm-up): #0 #1 the first start's, #2 #3 the next
    answers = [(f"{m}#{k}", c) for m in ("process", "thread") for k, c in enumerate(load(f"{model}_{m}"))]
    for (na, a), (nb, b) in itertools.combinations(answers, 2):
        ta, tb = a["logprobs"]["tokens"], b["logprobs"]["tokens"]
        i = next((k for k, (x, y) in enumerate(zip(ta, tb)) if x != y), None)
        n = len(ta) if i is None else i + 1  # through the first token where they part
        lp = max(abs(x - y) for x, y in zip(a["logprobs"]["token_logprobs"][:n], b["logprobs"]["token_logprobs"][:n]))
        where = "equal" if i is None else f"part at token {i} (top-2 gaps {gap(a, i)} / {gap(b, i)})"
        print(f"{model}: {na} vs {nb}: {where}; max |logprob diff| up to there {lp:.2e}")
PY
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
