"""How many K/V tiles the decode kernels keep in flight, read from the IR Triton compiles for an H100/H200 (sm90)
on this CPU machine (benchmarks/kernel_ir.py): the TMA kernel with page ids in chunks (page_chunk) keeps
num_stages - 1 pages in flight where the plain page loop keeps one (why page_chunk exists), and so does the page loop
with page ids an iteration ahead (prefetch_pages); the pointer kernel keeps
num_stages - 1 tiles with prefetch_pages, one without."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia.compiler")

from shardllm.layers.attention.decode_configs import DecodeConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def tiles_in_flight(cache: str, cfg: DecodeConfig, block_size: int = 16) -> int:
    """benchmarks/kernel_ir.py in a process of its own: the tests run Triton's interpreter (TRITON_INTERPRET=1),
    whose kernels cannot be compiled."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if v != getattr(DecodeConfig(), k)}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_ir.py"), "--cache", cache, "--config",
                        json.dumps(fields), "--block_size", str(block_size)],
                       capture_output=True, text=True, env=env, timeout=240)
    if r.returncode != 0:  # a Triton without a usable CUDA backend (ptxas) on this machine
        pytest.skip(f"cannot compile for sm90 here: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["tiles_in_flight"]


def test_page_chunk_multi_buffers_the_tma_page_loads():
    assert tiles_in_flight("fp8", DecodeConfig(tma=True, num_warps=2, num_stages=4)) == 1
    assert tiles_in_flight("fp8", DecodeConfig(tma=True, num_warps=2, num_stages=4, page_chunk=16)) == 3


def test_page_ids_an_iteration_ahead_multi_buffer_the_tma_page_loads():
    """prefetch_pages on the TMA kernel (the 64-token FP8-cache table entries): num_stages - 1 pages in flight."""
    for stages in (3, 4):
        cfg = DecodeConfig(tma=True, num_warps=2, num_stages=stages, prefetch_pages=True)
        assert tiles_in_flight("fp8", cfg, block_size=64) == stages - 1
    assert tiles_in_flight("fp8", DecodeConfig(tma=True, num_warps=2, num_stages=3), block_size=64) == 1


def test_the_pointer_kernel_pipelines_its_tiles_only_with_page_ids_a_tile_ahead():
    """prefetch_pages: num_stages - 1 tiles in flight; without it the tile's page ids are loaded in the iteration
    that uses them and one tile is in flight (the fp8 batch-1 entry, {"block_n": 32}, is such a launch)."""
    assert tiles_in_flight("fp8", DecodeConfig(block_n=32, early_v=True, prefetch_pages=True, num_stages=4)) == 3
    assert tiles_in_flight("fp8", DecodeConfig(block_n=32, num_stages=4)) == 1
