#!/usr/bin/env bash
# What serving on the GPU machine needs and its image lacks, into ignored folders (run here, from the repo root):
# the server's wheels (fastapi, uvicorn, pydantic and what they need, uvloop for an A/B; PYVER: the image's python)
# into .whl_serve/,
# and a stand-in tokenizer of Llama-3's vocabulary size (benchmarks/make_bench_tokenizer.py) into
# .bench_tokenizer/. Then on the device, e.g.:
#   run(command="LIMIT_S=560 bash benchmarks/device_s27_a.sh", carry=[".whl_serve", ".bench_tokenizer"])
set -euo pipefail
PYVER=${PYVER:-3.12}
PY=${PYTHON:-python3}
mkdir -p .whl_serve
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform any -d .whl_serve \
  fastapi starlette pydantic pydantic-core annotated-types typing-inspection typing-extensions uvicorn h11 click \
  httpx httpcore anyio sniffio certifi idna annotated-doc opentelemetry-api uvloop
[ -f .bench_tokenizer/tokenizer.json ] || "$PY" benchmarks/make_bench_tokenizer.py .bench_tokenizer
ls .whl_serve .bench_tokenizer
du -sh .whl_serve .bench_tokenizer
