"""On a GPU: decode CUDA graphs holding the LM head (and at tp = 2 its vocab all-gather) give the tokens of graphs
without it (`SHARDLLM_GRAPH_LM_HEAD=0`) and of eager mode; decode steps run no eager head."""

import pytest
import torch

from shardllm import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(150)]  # up to five engines a test, ~5-10 s each
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

PROMPTS = [[(7 * i + 3 * j) % 300 + 3 for j in range(3 + 9 * i)] for i in range(11)]  # ragged, 11 rows: bucket 16
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)  # the graph's argmax stands for the sampler
LOGPROBS = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=2)  # the sampler on graph logits


def run(path, dtype, head, monkeypatch, sp=GREEDY, **kw):
    """(outputs, the graph runner, eager LM-head calls per step kind) of one engine."""
    monkeypatch.setenv("SHARDLLM_GRAPH_LM_HEAD", "1" if head else "0")
    llm = LLM(path, dtype=dtype, device="cuda", max_seq_len=256, max_batch_size=32, num_kv_blocks=1024, **kw)
    try:
        calls = []
        if kw.get("tensor_parallel_size", 1) == 1:
            model = llm.engine.executor.worker.model_runner.model
            compute_logits = model.compute_logits
            model.compute_logits = lambda h: calls.append(h.shape[0]) or compute_logits(h)
        outs = llm.generate(PROMPTS, sp, use_tqdm=False)
        worker = getattr(llm.engine.executor, "worker", None)  # in-process at tp = 1 only
        graphs = getattr(worker.model_runner, "graph_runner", None) if worker is not None else None
    finally:
        llm.shutdown()
    return [o.outputs[0] for o in outs], graphs, calls


def test_head_in_graph_equals_eager_fp32(tiny_checkpoints, monkeypatch):
    path = tiny_checkpoints["llama"]
    eager, _, _ = run(path, "float32", True, monkeypatch, enforce_eager=True)
    off, g_off, calls_off = run(path, "float32", False, monkeypatch)
    on, g_on, calls_on = run(path, "float32", True, monkeypatch)
    assert g_off is not None and g_off.graphs and not g_off.head_buckets
    assert g_on is not None and g_on.head_buckets == g_on.buckets  # tiny vocab: every bucket holds the head
    # without the head in the graphs every step runs it eagerly; with it only the prefill steps do
    assert len(calls_off) - len(calls_on) >= GREEDY.max_tokens - 1, (calls_off, calls_on)
    for e, a, b in zip(eager, off, on):
        assert a.token_ids == e.token_ids and b.token_ids == e.token_ids


def test_head_in_graph_logprobs_and_bf16_identical(tiny_checkpoints, monkeypatch):
    """The same kernels replayed: bf16 tokens and fp32 logprobs identical to graphs without the head."""
    path = tiny_checkpoints["llama"]
    off, _, _ = run(path, "bfloat16", False, monkeypatch)
    on, _, _ = run(path, "bfloat16", True, monkeypatch)
    assert [o.token_ids for o in on] == [o.token_ids for o in off]
    off, _, _ = run(path, "float32", False, monkeypatch, sp=LOGPROBS)
    on, _, _ = run(path, "float32", True, monkeypatch, sp=LOGPROBS)
    for a, b in zip(off, on):
        assert b.token_ids == a.token_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert x.keys() == y.keys() and all(abs(x[t].logprob - y[t].logprob) < 1e-5 for t in x)


@pytest.mark.multi_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_head_in_graph_tp2_equals_one_gpu(tiny_checkpoints, monkeypatch, capfd):
    """tp = 2: the vocab all-gather captured in the graph gives one GPU's greedy tokens (fp32), with every tp rank
    sampling (async scheduling) and with the output rank alone (tests/executor/test_gpu_multi.py has the rest of
    the layouts, with the head in the graph by default)."""
    path = tiny_checkpoints["llama"]
    one, _, _ = run(path, "float32", False, monkeypatch)
    capfd.readouterr()
    for kw in (dict(), dict(async_scheduling=False)):
        got, _, _ = run(path, "float32", True, monkeypatch, tensor_parallel_size=2, **kw)
        assert [o.token_ids for o in got] == [o.token_ids for o in one], kw
    err = capfd.readouterr().err  # the workers' stderr too: they inherit the captured descriptor
    assert "capture failed" not in err and err.count("LM head in batch sizes <= 32") == 2, err[-3000:]
