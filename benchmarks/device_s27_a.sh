#!/usr/bin/env bash
# Twenty-second session (one H200, about 9 minutes): the OpenAI server at the GPU's rate. Llama-3-8B fp8 + fp8 KV
# (dummy weights) offline (`bench`) and behind `shardllm serve` under `shardllm bench serve` (streamed, every request
# at once), same engine settings, in one call: what the HTTP path (uvicorn, the event loop, detokenization, SSE)
# costs at ~28k output tok/s. Server rows: with a stand-in tokenizer of Llama-3's size (detokenizes every token),
# and without one (token ids only: the detokenizer's share). The server's and the client's CPU seconds per run.
# Needs `bash benchmarks/pack_serve_wheels.sh` here first:
#     run(command="LIMIT_S=560 bash benchmarks/device_s27_a.sh", carry=[".whl_serve", ".bench_tokenizer"])
# CPU dry run with the embedded default model (PATH=.venv/bin:$PATH): SERVE_MODEL= TOK= OFFLINE=0 N128=40 N1K=8 OUT1K=64 bash ...
set -u
. benchmarks/device_rows.sh
device_start 560
export CUDA_VISIBLE_DEVICES=${GPU:-0}
python -c "import fastapi, uvicorn" 2>/dev/null \
  || python -m pip install -q --no-index --find-links .whl_serve fastapi uvicorn httpx 2>&1 | tail -2
SERVE_MODEL=${SERVE_MODEL-"llama-3-8b --load_format dummy --dtype fp8 --kv_cache_dtype fp8"}
TOK=${TOK-"--tokenizer .bench_tokenizer"}
N128=${N128:-1000}; N1K=${N1K:-500}; OUT1K=${OUT1K:-1000}
PORT=${PORT:-8123}; URL="http://127.0.0.1:$PORT"
if [ "${OFFLINE:-1}" = 1 ]; then
  MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8 --max_num_tokens 16384"
  row 150 offline_128 "" --num_requests "$N128" --input_len 128 --output_len 128
  row 150 offline_1k "" --num_requests "$N1K" --input_len 1000 --output_len "$OUT1K"
fi
. benchmarks/serve_rows.sh  # cpu_s
bench_serve() {  # NAME PID FLAGS...: one `bench serve` run, its JSON line into rows.jsonl with CPU seconds
  local name=$1 pid=$2; shift 2
  local s0; s0=$(cpu_s "$pid"); local c0=$SECONDS
  TIMEFORMAT="%U %S"; { time timeout 240 python -m shardllm.entrypoints.cli bench serve --url "$URL" --json \
    --disable_tqdm "$@" > "$w/bs_$name.txt" 2> "$w/bs_err_$name.txt"; } 2> "$w/time_$name.txt"
  python - "$name" "$w" "$s0" "$(cpu_s "$pid")" "$((SECONDS - c0))" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
name, w, s0, s1, wall = sys.argv[1:]
lines = [l for l in open(f"{w}/bs_{name}.txt") if l.startswith("{")]
d = json.loads(lines[-1]) if lines else {"error": open(f"{w}/bs_err_{name}.txt").read()[-400:]}
u, s = open(f"{w}/time_{name}.txt").read().split()[-2:]
d.update(row=name, server_cpu_s=int(s1 or 0) - int(s0 or 0), client_cpu_s=round(float(u) + float(s), 1), wall_s=int(wall))
open(f"{w}/rows.jsonl", "a").write(json.dumps(d) + "\n")
keys = ("completed", "failed", "output_throughput", "request_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms",
        "median_itl_ms", "median_e2el_ms", "server_cpu_s", "client_cpu_s", "wall_s", "error")
print(name, {k: d.get(k) for k in keys if k in d})
PY
}
serve_rows() {  # NAME "SERVE FLAGS": start the server, warm it, run the two shapes, stop it (SIGINT)
  local name=$1 sflags=$2
  [ "$(left)" -ge 150 ] || { say "$name: skipped (time)"; return; }
  python -m shardllm.entrypoints.cli serve $SERVE_MODEL $sflags --port "$PORT" > "$w/serve_$name.log" 2>&1 &
  local pid=$! t=0
  until python -c "import urllib.request as u; u.urlopen('$URL/health', timeout=2)" 2>/dev/null; do
    kill -0 $pid 2>/dev/null && [ $t -lt 300 ] || { say "$name: not up: $(tail -3 "$w/serve_$name.log" | tr '\n' ' ')"; kill -9 $pid 2>/dev/null; return; }
    sleep 1; t=$((t + 1))
  done
  say "$name: up after $t s"
  bench_serve "${name}_warm" $pid --num_prompts 64 --input_len 128 --output_len 32
  bench_serve "${name}_128" $pid --num_prompts "$N128" --input_len 128 --output_len 128
  [ "$(left)" -ge 90 ] && bench_serve "${name}_1k" $pid --num_prompts "$N1K" --input_len 1000 --output_len "$OUT1K"
  python -c "import urllib.request as u; print(u.urlopen('$URL/metrics').read().decode())" > "$w/metrics_$name.txt" 2>&1
  kill -INT $pid; wait $pid; say "$name: server exit $?"
  pack
}
serve_rows tok "$TOK --max_num_tokens 16384"
serve_rows notok "--max_num_tokens 16384"
phase_rows
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
