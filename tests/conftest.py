"""Shared fixtures: tiny random checkpoints written with transformers, one per supported architecture."""

from __future__ import annotations

import os
import time

from tests.gpu_pin import pin_worker_gpu

pin_worker_gpu(os.environ)  # GPU_SUITE_PIN: before torch starts CUDA (tests/gpu_pin.py)

import torch  # noqa: E402

if not torch.cuda.is_available():  # Triton kernels run under the interpreter on CPU (set before triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1,
            eos_token_id=2, tie_word_embeddings=False)

ARCH_CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                   rope_theta=50000.0)),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32)),
    # MoE: 8 experts, top-2; Mixtral's experts use intermediate_size, Qwen's moe_intermediate_size
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, sliding_window=None)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=32,
                       norm_topk_prob=True)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",  # no renormalisation, a sigmoid-gated shared expert
                  dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=48)),
}


def write_tiny_checkpoint(path: str, arch: str, seed: int = 0, **overrides) -> str:
    """A random HF checkpoint (safetensors) of a tiny config; returns the directory."""
    import transformers

    cfg_name, model_name, extra = ARCH_CONFIGS[arch]
    kw = {**TINY, **extra, **overrides}
    config = getattr(transformers, cfg_name)(**kw)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    with torch.no_grad():  # larger weights than the default init, so that logits are not all near zero
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.15)
    model.save_pretrained(path, safe_serialization=True)
    return path


# A GPU test that builds no engine takes seconds; those that build engines set their own (60-150 s), so that one
# hung test costs the 5-minute GPU suite (benchmarks/device_gpu_suite.sh) at most that long.
GPU_TEST_TIMEOUT_S = 60
# past its timeout + this, a GPU test stuck in C (a collective, a sync) ends the run (tests/test_gpu_guard.py sets 1)
HARD_TIMEOUT_GRACE_S = float(os.environ.get("GPU_TEST_HARD_TIMEOUT_GRACE_S", "20"))


# Epoch seconds after which GPU tests are skipped, not started (benchmarks/device_gpu_suite.sh sets it a little before
# its outer limit), so that a slow run (a cold Triton cache) still ends with pytest's counts and durations.
GPU_SUITE_DEADLINE = float(os.environ.get("GPU_SUITE_DEADLINE", "0") or 0)


def pytest_runtest_setup(item):
    if GPU_SUITE_DEADLINE and item.get_closest_marker("gpu") and time.time() > GPU_SUITE_DEADLINE:
        pytest.skip("GPU_SUITE_DEADLINE passed: the suite's time limit (not started)")


def pytest_collection_modifyitems(config, items):
    """Every GPU test has its own timeout (a hung NCCL call fails that test, not the whole run)."""
    for item in items:
        if item.get_closest_marker("gpu") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(GPU_TEST_TIMEOUT_S))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Around each GPU test (setup, call, teardown): processes it started and left running (engine workers, a
    test's subprocesses) are ended after it, whether it passed, failed or timed out, so they never hold a GPU or
    spin in a collective under the next test; and if pytest-timeout's SIGALRM cannot interrupt it (the main
    thread blocked inside a CUDA or NCCL call) a watchdog dumps the stacks, kills those processes and ends the
    run with exit code 3, instead of hanging until an outer limit kills everything without a report."""
    if not item.get_closest_marker("gpu"):
        yield
        return
    from tests.gpu_guard import HardTimeout, descendants, end_processes, release_gpu_memory

    marker = item.get_closest_marker("timeout")
    timeout = float(marker.args[0] if marker.args else marker.kwargs.get("timeout", GPU_TEST_TIMEOUT_S))
    before = descendants()
    capman = item.config.pluginmanager.getplugin("capturemanager")
    watchdog = HardTimeout(item.nodeid, timeout + HARD_TIMEOUT_GRACE_S, before, capman).start()
    try:
        yield
    finally:
        watchdog.cancel()
        end_processes(item.nodeid, descendants() - before)
        release_gpu_memory()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ckpt")
    return {arch: write_tiny_checkpoint(os.path.join(root, arch), arch) for arch in ARCH_CONFIGS}
