"""On 2 GPUs (benchmarks/device_ray.sh): tp = 2 over Ray actors gives one GPU's greedy tokens in fp32, and each
actor sees both of the engine's GPUs (CUDA_VISIBLE_DEVICES set before torch touched CUDA) with its own device."""

import pytest

ray = pytest.importorskip("ray")
from tests.executor.test_gpu_multi import PROMPTS, SP, tokens  # noqa: E402 - skips this module without 2 GPUs

pytestmark = [pytest.mark.gpu, pytest.mark.multi_gpu, pytest.mark.timeout(150)]


def test_tp2_over_ray_equals_one_gpu(tiny_checkpoints):
    path = tiny_checkpoints["llama"]
    expected = tokens(path)
    from shardllm import LLM

    llm = LLM(path, dtype="float32", device="cuda", max_seq_len=256, max_batch_size=32, tensor_parallel_size=2,
              distributed_executor_backend="ray", num_kv_blocks=1024)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, SP, use_tqdm=False)]
        placement, cvd = llm.engine.executor.placement, llm.engine.executor.worker_env("CUDA_VISIBLE_DEVICES")
    finally:
        llm.shutdown()
    assert got == expected
    gpus = sorted(p.gpu_ids[0] for p in placement)
    assert len(set(gpus)) == 2  # one GPU each
    assert cvd == [",".join(map(str, gpus))] * 2  # both see the engine's two GPUs, in numeric order
    if ray.is_initialized():
        ray.shutdown()
