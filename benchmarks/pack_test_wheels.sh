#!/usr/bin/env bash
# Wheels the GPU suite's parallel mode needs and the GPU image lacks (pytest-xdist and execnet), into the ignored
# folder .whl_test/ (run here, from the repo root; PYVER: the image's python). Then on the device:
#   run(command="GPU_SUITE_WORKERS=2 bash benchmarks/device_gpu_suite.sh", carry=[".whl_test"])
set -euo pipefail
PYVER=${PYVER:-3.12}
PY=${PYTHON:-python3}
mkdir -p .whl_test
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --platform any -d .whl_test \
  pytest-xdist execnet
ls .whl_test
