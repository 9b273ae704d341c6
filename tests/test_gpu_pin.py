"""The GPU suite's per-worker GPU pinning (tests/gpu_pin.py) and the multi_gpu marker on tests that need two GPUs."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.gpu_pin import pin_worker_gpu


@pytest.mark.parametrize("worker, visible, want", [
    ("gw0", None, "0"), ("gw1", None, "1"), ("gw2", None, "0"), ("gw3", "2,3", "3"), ("gw0", "5, 7", "5")])
def test_xdist_workers_spread_round_robin_over_the_visible_gpus(worker, visible, want):
    env = {"PYTEST_XDIST_WORKER": worker, "GPU_SUITE_PIN": "2"}
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    assert pin_worker_gpu(env) == want and env["CUDA_VISIBLE_DEVICES"] == want


@pytest.mark.parametrize("env", [{"PYTEST_XDIST_WORKER": "gw1"}, {"GPU_SUITE_PIN": "2"},
                                 {"PYTEST_XDIST_WORKER": "master", "GPU_SUITE_PIN": "2"}])
def test_no_pinning_outside_a_pinned_xdist_worker(env):
    before = dict(env)
    assert pin_worker_gpu(env) is None and env == before


@pytest.mark.parametrize("pin, visible, words", [("two", None, "number of GPUs"), ("0", None, "number of GPUs"),
                                                 ("2", "0", "lists 1 GPUs"), ("1", "", "no GPU visible")])
def test_a_bad_pin_is_refused_naming_the_fix(pin, visible, words):
    env = {"PYTEST_XDIST_WORKER": "gw0", "GPU_SUITE_PIN": pin}
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    with pytest.raises(ValueError, match=words):
        pin_worker_gpu(env)


def multi_gpu_in_source(path: str, function: str | None = None) -> bool:
    """Whether `function`'s decorators (else the module's pytestmark) name pytest.mark.multi_gpu: for modules that
    skip themselves whole without CUDA, whose tests this machine cannot collect."""
    tree = ast.parse(open(path).read())
    for node in tree.body:
        if function is None and isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            return "pytest.mark.multi_gpu" in ast.unparse(node.value)
        if function is not None and isinstance(node, ast.FunctionDef) and node.name == function:
            return any("pytest.mark.multi_gpu" in ast.unparse(d) for d in node.decorator_list)
    return False


def test_the_two_gpu_tests_carry_the_multi_gpu_marker():
    """What the suite's serial pass selects (`-m "gpu and multi_gpu"`), collected on this machine; modules that skip
    themselves whole without CUDA are read instead."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "-m", "gpu and multi_gpu", "tests/distributed/test_fast_all_reduce.py",
                          "tests/layers/test_pdl.py", "tests/engine/test_request_faults.py"],
                         capture_output=True, text=True, timeout=120)
    ids = {line.split("::", 1)[1] for line in out.stdout.splitlines() if "::" in line}
    assert ids == {"test_symm_mem_all_reduce_equals_nccl_on_gpus", "test_fault_isolation_and_logit_bias_on_gpus",
                   "test_gpu_tokens_equal_with_pdl_on_and_off[bf16-tp2]"}, out.stdout[-2000:] + out.stderr[-2000:]
    assert multi_gpu_in_source("tests/executor/test_gpu_multi.py")
    assert multi_gpu_in_source("tests/executor/test_ray_gpu.py")
    assert multi_gpu_in_source("tests/worker/test_graph_lm_head_gpu.py", "test_head_in_graph_tp2_equals_one_gpu")
    assert not multi_gpu_in_source("tests/worker/test_graph_lm_head_gpu.py", "test_head_in_graph_equals_eager_fp32")
