#!/usr/bin/env bash
# Twenty-fourth session, call 1 (one H200, about 9 minutes): `shardllm serve --api_server_count N` (N HTTP processes
# on one engine process) for N in $COUNTS, Llama-3-8B fp8 + fp8 KV (dummy weights, the stand-in tokenizer of
# Llama-3's size), `bench serve` with 8 client processes at 1000 x 128/128, then 500 x 1000/1000 on the last N. Each
# server first answers the same greedy request (64 prompt ids, 48 tokens) on 4 connections: the texts must be equal
# (whichever API server took each connection). After each run: CPU seconds of every process of the server.
#     bash benchmarks/pack_serve_wheels.sh   (here, first)
#     run(command="LIMIT_S=590 bash benchmarks/device_s29_a.sh", carry=[".whl_serve", ".bench_tokenizer"])
# Call 2: ROWS="new1:1::1 new2:2:: old1:1:SHARDLLM_FRONTEND_DETOKENIZE=0:" LIMIT_S=560 bash ...
# CPU dry run (PATH=.venv/bin:$PATH): SERVE_MODEL=/tmp/fe/tiny TOK="--tokenizer .bench_tokenizer" N=48 LONG=0 \
#     COUNTS="1 2" bash benchmarks/device_s29_a.sh
set -u
. benchmarks/device_rows.sh
. benchmarks/serve_rows.sh
device_start 590
export CUDA_VISIBLE_DEVICES=${GPU:-0}
serve_setup
SERVE_MODEL=${SERVE_MODEL-"llama-3-8b --load_format dummy --dtype fp8 --kv_cache_dtype fp8"}
TOK=${TOK-"--tokenizer .bench_tokenizer"}
N=${N:-1000}
COUNTS=${COUNTS:-"1 2 4"}
PORT=${PORT:-8123}; URL="http://127.0.0.1:$PORT"
cpu_tree() { { ps -o comm=,times= -p "$SERVE_PID"; ps -o comm=,times= --ppid "$SERVE_PID"; } | tr -s ' '; }
bench() {  # NAME CLIENTS NUM_PROMPTS INPUT_LEN OUTPUT_LEN; then each server process's CPU seconds during it
  local c0=$SECONDS before
  S0=$(cpu_s "$SERVE_PID"); before=$(cpu_tree)
  timeout 240 python -m shardllm.entrypoints.cli bench serve --url "$URL" --json --disable_tqdm --num_clients "$2" \
    --num_prompts "$3" --input_len "$4" --output_len "$5" > "$w/bs_$1.1.txt" 2> "$w/bserr_$1.1.txt"
  record "$1" "$SERVE_PID" $((SECONDS - c0))
  python - "$before" "$(cpu_tree)" <<'PY' | sed "s/^/$1 cpu s: /" | tee -a "$OUT/summary.txt"
import sys
def parse(t):
    return [(l.split()[0], int(l.split()[1])) for l in t.splitlines() if l.strip()]
b, a = parse(sys.argv[1]), parse(sys.argv[2])
print("  ".join(f"{n} {s1 - s0}" for (n, s0), (_, s1) in zip(b, a)))
PY
}
greedy4() {  # NAME: the same greedy completion on 4 connections, into $w/greedy_NAME.txt (one line each)
  python - "$URL" > "$w/greedy_$1.txt" 2>&1 <<'PY'
import json, sys, urllib.request as u
url = sys.argv[1]
model = json.load(u.urlopen(url + "/v1/models"))["data"][0]["id"]
body = {"model": model, "prompt": list(range(1000, 1064)), "max_tokens": 48, "temperature": 0, "ignore_eos": True}
for _ in range(4):
    req = u.Request(url + "/v1/completions", json.dumps(body).encode(), {"content-type": "application/json"})
    print(json.dumps(json.load(u.urlopen(req))["choices"][0]["text"]))
PY
  if [ "$(sort -u "$w/greedy_$1.txt" | wc -l)" = 1 ]; then say "$1 greedy: 4 connections, one text"
  else say "$1 greedy: DIFFERENT: $(head -c 400 "$w/greedy_$1.txt" | tr '\n' '|')"; fi
}
# ROWS: NAME:COUNT:ENV:LONG ... (ENV: one VAR=VALUE or empty; LONG 1: also 500 x 1000/1000); default from COUNTS
ROWS=${ROWS:-$(for n in $COUNTS; do printf 'api%s:%s::%s ' "$n" "$n" "$([ "$n" = "${COUNTS##* }" ] && echo 1)"; done)}
for spec in $ROWS; do
  IFS=: read -r name n envs long <<< "$spec"
  [ "$(left)" -ge 100 ] || { say "$name: skipped (time)"; continue; }
  SAVED=$SERVE_MODEL; SERVE_MODEL="$SERVE_MODEL --api_server_count $n"
  serve_up "$name" "$envs" "" || { SERVE_MODEL=$SAVED; continue; }
  SERVE_MODEL=$SAVED
  greedy4 "$name"
  bench "${name}_c8_128" 8 "$N" 128 128
  if [ "$long" = 1 ] && [ "${LONG:-1}" = 1 ] && [ "$(left)" -ge 80 ]; then
    bench "${name}_c8_1000" 8 $((N / 2)) 1000 1000
  fi
  serve_down
done
say "total: $((SECONDS - t0)) s"; pack
rm -rf "$w"
