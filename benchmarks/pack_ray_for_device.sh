#!/usr/bin/env bash
# Pack Ray for the GPU machine, whose image has no Ray and where nothing can be fetched (run here, from the
# repo root; writes the ignored folder .whl/). The 79 MB wheel is over the 64 MiB that travels with a run,
# so its Java jars, RLlib, Data, Train, Tune, Serve and LLM libraries (none of which shardllm imports) are dropped
# and the rest recompressed with xz; the dependencies the image lacks (jsonschema and its own) come as wheels.
#   bash benchmarks/pack_ray_for_device.sh        # then: carry [".whl"], see benchmarks/device_ray.sh
set -euo pipefail
RAY_VERSION=${RAY_VERSION:-2.60.0}
PYVER=${PYVER:-3.12}  # the GPU image's python3 (device KINDS.md)
PY=${PYTHON:-python3}  # a python with pip, here
case $PY in /*) ;; */*) PY=$PWD/$PY ;; esac  # the unpacking below runs in another folder
dest=.whl; mkdir -p "$dest"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
pip_dl() { "$PY" -m pip download -q --only-binary=:all: --python-version "$PYVER" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$1" "${@:2}"; }
pip_dl "$tmp/wheel" --no-deps "ray==$RAY_VERSION"
pip_dl "$dest" jsonschema  # brings referencing, rpds-py, jsonschema-specifications, attrs
(cd "$tmp" && "$PY" -m zipfile -e wheel/ray-*.whl site)
chmod +x "$tmp"/site/ray/core/src/ray/gcs/gcs_server "$tmp"/site/ray/core/src/ray/raylet/raylet  # zipfile drops modes
rm -rf "$tmp"/site/ray/{jars,rllib,data,train,tune,serve,llm}  # keep dashboard/: each node starts its agent
tar -C "$tmp/site" -cf - . | xz -6 -T0 > "$dest/ray-$RAY_VERSION-py$PYVER-slim.tar.xz"
du -ch "$dest"/* | tail -1
