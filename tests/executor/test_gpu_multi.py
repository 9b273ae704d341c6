"""On 2+ GPUs: tensor and pipeline parallel runs (NCCL or the symmetric-memory all-reduce, kernels, CUDA graphs,
async scheduling on and off) give one GPU's greedy tokens in fp32, and shutdown is quiet (no NCCL watchdog
errors about the store)."""

import pytest
import torch

from shardllm import LLM, SamplingParams

# an engine of 2 worker processes: ~10-20 s
pytestmark = [pytest.mark.gpu, pytest.mark.multi_gpu, pytest.mark.timeout(150)]
if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
    pytest.skip("needs 2 CUDA GPUs", allow_module_level=True)

PROMPTS = [[(7 * i + 3 * j) % 300 + 3 for j in range(3 + 9 * i)] for i in range(9)]
SP = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


def tokens(path, **kw):
    # num_kv_blocks: the batch needs ~60 blocks; sized from free memory a tiny model would get ~15M (slow to build)
    kw.setdefault("num_kv_blocks", 1024)
    llm = LLM(path, dtype="float32", device="cuda", max_seq_len=256, max_batch_size=32, **kw)
    try:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, SP, use_tqdm=False)]
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def one_gpu(tiny_checkpoints):
    return tokens(tiny_checkpoints["llama"])


LAYOUTS = [dict(tensor_parallel_size=2),
           dict(tensor_parallel_size=2, async_scheduling=False),
           dict(tensor_parallel_size=2, all_reduce="symm_mem"),
           dict(tensor_parallel_size=2, all_reduce="symm_mem", enforce_eager=True),
           dict(pipeline_parallel_size=2),
           dict(pipeline_parallel_size=2, async_scheduling=True)]


def test_layouts_equal_one_gpu_and_shut_down_quietly(tiny_checkpoints, one_gpu, capfd):
    """Every layout's greedy tokens equal one GPU's, and no engine's shutdown complains. The engines run three at a
    time (each its own driver thread and two worker processes; separate NCCL communicators on the same GPUs): one
    after another they took ~20 s each, most of the GPU suite's 5-minute budget."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda kw: tokens(tiny_checkpoints["llama"], **kw), LAYOUTS))
    for layout, toks in zip(LAYOUTS, got):
        assert toks == one_gpu, layout
    err = capfd.readouterr().err  # the workers' stderr too: they inherit the captured descriptor
    assert "TCPStore" not in err and "Traceback" not in err, err[-3000:]
