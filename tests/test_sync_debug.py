"""benchmarks/sync_debug.py's bookkeeping (the CUDA sync debug mode itself needs a GPU): torch's sync warnings are
counted by the shardllm / benchmarks frames that raised them, library frames skipped; other warnings pass through,
shown as Python would show them."""

from __future__ import annotations

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def sync_debug():
    spec = importlib.util.spec_from_file_location("sync_debug", os.path.join(ROOT, "benchmarks", "sync_debug.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sync_warnings_are_counted_by_site_and_others_shown(sync_debug, capsys):
    from shardllm.layers import microbatch_overlap  # any shardllm function as the "caller"

    def torch_op():  # stands for torch's C++ warning raised inside a library call
        sync_debug._show(UserWarning("called a synchronizing CUDA operation (Triggered internally at x.cpp)"),
                         UserWarning, "x.py", 1)

    calls = []
    real = microbatch_overlap.active
    try:
        microbatch_overlap.active = lambda tp: calls.append(torch_op()) or False  # runs inside shardllm's frame
        for _ in range(3):
            microbatch_overlap.applies(None, 0, 2)
    finally:
        microbatch_overlap.active = real
    sync_debug._show(UserWarning("please synchronize your clocks"), UserWarning, "y.py", 7)
    (site, entry), = sync_debug._sites.items()
    assert entry[0] == 3 and site.startswith("shardllm/layers/microbatch_overlap.py:")
    assert "(applies)" in site and "tests/" not in site
    assert "please synchronize your clocks" in capsys.readouterr().err  # not counted, shown
    sync_debug._report()
    assert capsys.readouterr().err.startswith("sync-site      3 ")

