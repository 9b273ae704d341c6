#!/usr/bin/env bash
# Twenty-second session, call 4 (one H200, about 7 minutes): the server's rate with the client no longer the bound
# (call 3: one client process parsed ~9,000 events/s and was). Llama-3-8B fp8 + fp8 KV (dummy, the stand-in
# tokenizer), `bench serve --num_clients 1 / 4 / 8` at 1000 x 128/128 and 8 clients at 500 x 1000/1000, beside
# `bench` offline; the Python detokenizer (SHARDLLM_DECODE_STREAM=0) with 8 clients; one 8-client run under the
# stack sampler.
#     run(command="LIMIT_S=480 bash benchmarks/device_s27_c.sh", carry=[".whl_serve", ".bench_tokenizer"])
# Call 5 (after the chunk-envelope and lagging-reader changes): OFFLINE=0 ROWS=short LIMIT_S=100 bash ...
set -u
. benchmarks/device_rows.sh
device_start 480
export CUDA_VISIBLE_DEVICES=${GPU:-0}
python -c "import fastapi, uvicorn" 2>/dev/null \
  || python -m pip install -q --no-index --find-links .whl_serve fastapi uvicorn httpx 2>&1 | tail -2
SERVE_MODEL=${SERVE_MODEL-"llama-3-8b --load_format dummy --dtype fp8 --kv_cache_dtype fp8"}
TOK=${TOK-"--tokenizer .bench_tokenizer"}
N=${N:-1000}
PORT=${PORT:-8123}; URL="http://127.0.0.1:$PORT"
if [ "${OFFLINE:-1}" = 1 ]; then
  MODEL_FLAGS="--model llama-3-8b --dtype fp8 --kv_cache_dtype fp8 --max_num_tokens 16384"
  row 150 offline_128 "" --num_requests "$N" --input_len 128 --output_len 128
  row 150 offline_1k "" --num_requests $((N / 2)) --input_len 1000 --output_len 1000
fi
cpu_s() { ps -o times= -p "$1" 2>/dev/null | tr -d ' '; }
record() {  # NAME PID WALL: the JSON lines of bs_NAME*.txt (one per client) summed into one row
  python - "$1" "$w" "$3" "$(cpu_s "$2")" "${S0:-0}" <<'PY' | tee -a "$OUT/summary.txt"
import glob, json, sys
name, w, wall, s1, s0 = sys.argv[1:]
rows = []
for path in sorted(glob.glob(f"{w}/bs_{name}.*txt")):
    lines = [l for l in open(path) if l.startswith("{")]
    rows.append(json.loads(lines[-1]) if lines else {"error": open(path.replace("bs_", "bserr_")).read()[-300:]})
d = dict(rows[0]) if rows else {"error": "no client output"}
if len(rows) > 1:
    d["output_throughput"] = round(sum(r.get("output_throughput", 0) for r in rows), 2)
    d["completed"] = sum(r.get("completed", 0) for r in rows)
    d["clients"] = len(rows)
d.update(row=name, server_cpu_s=int(s1 or 0) - int(s0 or 0), wall_s=int(wall))
open(f"{w}/rows.jsonl", "a").write(json.dumps(d) + "\n")
keys = ("completed", "failed", "output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "median_itl_ms",
        "clients", "server_cpu_s", "wall_s", "error")
print(name, {k: d.get(k) for k in keys if k in d})
PY
}
bench() {  # NAME PID CLIENTS NUM_PROMPTS INPUT_LEN OUTPUT_LEN: CLIENTS processes of one `bench serve --num_clients`
  local name=$1 pid=$2 clients=$3 n=$4 in=$5 out=$6 c0=$SECONDS
  S0=$(cpu_s "$pid")
  timeout 240 python -m shardllm.entrypoints.cli bench serve --url "$URL" --json --disable_tqdm --num_clients "$clients" \
    --num_prompts "$n" --input_len "$in" --output_len "$out" > "$w/bs_$name.1.txt" 2> "$w/bserr_$name.1.txt"
  record "$name" "$pid" $((SECONDS - c0))
}
serve_row() {  # NAME "ENV" "WRAPPER FLAGS" RUNS...: start, warm, each run (CLIENTS:N:IN:OUT), stop
  local name=$1 envs=$2 wrap=$3; shift 3
  [ "$(left)" -ge 75 ] || { say "$name: skipped (time)"; return; }
  env $envs python benchmarks/serve_profiled.py $wrap -- $SERVE_MODEL $TOK --max_num_tokens 16384 --port "$PORT" \
    > "$w/serve_$name.log" 2>&1 &
  local pid=$! t=0 run c n i o
  until python -c "import urllib.request as u; u.urlopen('$URL/health', timeout=2)" 2>/dev/null; do
    kill -0 $pid 2>/dev/null && [ $t -lt 240 ] || { say "$name: not up: $(tail -3 "$w/serve_$name.log" | tr '\n' ' ')"; kill -9 $pid 2>/dev/null; return; }
    sleep 1; t=$((t + 1))
  done
  timeout 60 python -m shardllm.entrypoints.cli bench serve --url "$URL" --json --disable_tqdm --num_prompts 64 \
    --input_len 128 --output_len 32 > /dev/null 2>&1
  for run in "$@"; do
    IFS=: read -r c n i o <<< "$run"
    [ "$(left)" -ge 45 ] || { say "${name}_c${c}_${i}: skipped (time)"; continue; }
    bench "${name}_c${c}_${i}" $pid "$c" "$n" "$i" "$o"
  done
  kill -INT $pid; wait $pid; pack
}
# ROWS=short (call 5): only the default server with 8 clients at 128/128
serve_row stream "" "" $([ "${ROWS:-}" = short ] && echo "8:$N:128:128" || echo "1:$N:128:128 4:$N:128:128 8:$N:128:128 8:$((N / 2)):1000:1000")
[ "${ROWS:-}" = short ] || serve_row py_detok "SHARDLLM_DECODE_STREAM=0" "" "8:$N:128:128"
[ "${ROWS:-}" = short ] || serve_row sampled "" "--sample_out $w/stacks.txt --sample_ms 2" "8:$N:128:128"
[ -f "$w/stacks.txt" ] && cp "$w/stacks.txt" "$OUT/stacks.txt"
phase_rows
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
