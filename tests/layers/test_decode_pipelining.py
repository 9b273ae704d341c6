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


def compiled(cache: str, cfg: DecodeConfig, block_size: int = 16, v_transposed: bool = False,
             new_kv: bool = False) -> dict:
    """kernel_ir.py's JSON line for this launch."""
    """benchmarks/kernel_ir.py in a process of its own: the tests run Triton's interpreter (TRITON_INTERPRET=1),
    whose kernels cannot be compiled."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if v != getattr(DecodeConfig(), k)}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_ir.py"), "--cache", cache, "--config",
                        json.dumps(fields), "--block_size", str(block_size)] + ["--v_transposed"] * v_transposed
                       + ["--new_kv"] * new_kv,
                       capture_output=True, text=True, env=env, timeout=240)
    if r.returncode != 0:
        tail = r.stderr.strip().splitlines()[-1:]
        if any("needs Triton with its NVIDIA backend" in line or "ptxas" in line for line in tail):
            pytest.skip(f"cannot compile for sm90 here: {tail}")  # no usable CUDA backend on this machine
        raise AssertionError(f"kernel_ir.py failed: {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def tiles_in_flight(cache: str, cfg: DecodeConfig, block_size: int = 16) -> int:
    return compiled(cache, cfg, block_size)["tiles_in_flight"]


def test_page_chunk_multi_buffers_the_tma_page_loads():
    assert tiles_in_flight("fp8", DecodeConfig(tma=True, num_warps=2, num_stages=4)) == 1
    assert tiles_in_flight("fp8", DecodeConfig(tma=True, num_warps=2, num_stages=4, page_chunk=16)) == 3


def test_page_ids_an_iteration_ahead_multi_buffer_the_tma_page_loads():
    """prefetch_pages on the TMA kernel (the 64-token FP8-cache table entries): num_stages - 1 pages in flight."""
    for stages in (3, 4):
        cfg = DecodeConfig(tma=True, num_warps=2, num_stages=stages, prefetch_pages=True)
        assert tiles_in_flight("fp8", cfg, block_size=64) == stages - 1
    assert tiles_in_flight("fp8", DecodeConfig(tma=True, num_warps=2, num_stages=3), block_size=64) == 1


def test_a_transposed_v_cache_keeps_the_converted_page_out_of_shared_memory():
    """The TMA kernel over V stored (num_blocks, nkv, D, block_size): V reaches the P.V dot as K reaches the scores,
    so the 16 KB fp16 copy of a 64-token page that the standard layout stages in shared memory is gone (38,944
    against 55,328 bytes at 3 stages with Triton 3.9), at the same pipeline depth."""
    cfg = DecodeConfig(tma=True, num_warps=2, num_stages=3, prefetch_pages=True)
    standard, transposed = compiled("fp8", cfg, 64), compiled("fp8", cfg, 64, v_transposed=True)
    assert transposed["tiles_in_flight"] == standard["tiles_in_flight"] == 2
    assert transposed["shared_bytes"] <= standard["shared_bytes"] - 64 * 128 * 2


def test_the_pointer_kernel_pipelines_its_tiles_only_with_page_ids_a_tile_ahead():
    """prefetch_pages: num_stages - 1 tiles in flight; without it the tile's page ids are loaded in the iteration
    that uses them and one tile is in flight (the fp8 batch-1 entry, {"block_n": 32}, is such a launch)."""
    assert tiles_in_flight("fp8", DecodeConfig(block_n=32, early_v=True, prefetch_pages=True, num_stages=4)) == 3
    assert tiles_in_flight("fp8", DecodeConfig(block_n=32, num_stages=4)) == 1


def test_the_fused_rotary_and_kv_write_compile_for_sm90_at_the_same_pipeline_depth():
    """SHARDLLM_DECODE_FUSED_ROTARY's kernel (NEW_KV) at the engine's FP8 launch: it compiles for sm90, keeps the
    page loop's two pages in flight and adds no shared memory (142 against 128 registers with Triton 3.9)."""
    cfg = DecodeConfig(tma=True, num_warps=2, num_stages=3, prefetch_pages=True)
    plain, fused = compiled("fp8", cfg, 64, v_transposed=True), compiled("fp8", cfg, 64, v_transposed=True,
                                                                          new_kv=True)
    assert fused["tiles_in_flight"] == plain["tiles_in_flight"] == 2
    assert fused["shared_bytes"] == plain["shared_bytes"] and fused["registers"] <= 168
