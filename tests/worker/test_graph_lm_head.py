"""The LM head inside the decode CUDA graph: which buckets hold it, the slicing of padded rows, when the graph's argmax
stands for the sampler, and (with the graph's replay run eagerly, as CPU cannot capture) the engine's tokens and
logprobs equal the eager head's. The real capture is tested on the GPU (test_graph_lm_head_gpu.py)."""

import pytest
import torch

from shardllm import LLM, SamplingParams
from shardllm.worker.cuda_graph import CudaGraphRunner, head_buckets, sampled_rows
from shardllm.worker.sampler import SamplingBatch, is_plain_greedy


def test_head_buckets_are_those_whose_logits_fit():
    buckets = [1, 2, 4, 8, 16, 256, 512, 576, 1024]
    v = 128256
    assert head_buckets(buckets, v, 2) == [1, 2, 4, 8, 16, 256, 512]  # 512 x 128256 x 2 B <= 128 MiB < 576 rows
    assert head_buckets(buckets, v, 4)[-1] == 256  # fp32 logits: half the rows
    assert head_buckets(buckets, v, 2, max_bytes=v * 2 * 3) == [1, 2]
    assert head_buckets(buckets, v, 2, max_bytes=0) == []


def test_sampled_rows_leave_out_padding_and_rows_that_do_not_sample():
    t = torch.arange(8 * 3).view(8, 3)  # a bucket of 8 rows
    every = sampled_rows(t[:5], torch.arange(5), 5)  # 5 real rows, all sample: the first 5, a view
    assert every.tolist() == t[:5].tolist() and every.data_ptr() == t.data_ptr()
    some = sampled_rows(t[:5], torch.tensor([0, 3, 4]), 5)  # rows 1, 2 are one-token prompt chunks
    assert some.tolist() == t[[0, 3, 4]].tolist()


def test_plain_greedy_is_only_the_raw_argmax():
    assert is_plain_greedy(SamplingBatch(all_greedy=True))
    assert not is_plain_greedy(SamplingBatch(all_greedy=False))
    assert not is_plain_greedy(SamplingBatch(all_greedy=True, max_num_logprobs=0))
    assert not is_plain_greedy(SamplingBatch(all_greedy=True, presence=torch.zeros(1)))
    assert not is_plain_greedy(SamplingBatch(all_greedy=True, banned_tokens={0: [2]}))
    assert not is_plain_greedy(SamplingBatch(all_greedy=True, logits_processors={0: ([lambda ids, x: x], [])}))
    bias = (torch.zeros(1, dtype=torch.long),) * 2 + (torch.ones(1),)
    assert not is_plain_greedy(SamplingBatch(all_greedy=True, logit_bias=bias))


class EagerGraph:
    """Stands in for a captured torch.cuda.CUDAGraph on CPU: replay reruns the bucket's work, which writes the
    static logits and argmax buffers itself; the hidden states are copied into the outputs kept at capture."""

    def __init__(self, runner: CudaGraphRunner, bs: int):
        self.runner, self.bs = runner, bs

    def replay(self) -> None:
        new, kept = self.runner.forward(self.bs), self.runner.graphs[self.bs][1]
        if isinstance(kept.hidden, dict):
            for k, v in kept.hidden.items():
                v.copy_(new.hidden[k])
        else:
            kept.hidden.copy_(new.hidden)


@torch.inference_mode()
def eager_capture(runner: CudaGraphRunner) -> None:
    runner.seq_lens.fill_(1)  # as capture(): a context of one token in the padding block
    for bs in reversed(runner.buckets):
        runner.graphs[bs] = (EagerGraph(runner, bs), runner.forward(bs))
    runner.seq_lens.zero_()


@pytest.fixture(scope="module")
def llm(tiny_checkpoints):
    llm = LLM(tiny_checkpoints["llama"], device="cpu", dtype="float32", num_kv_blocks=64, block_size=4,
              max_batch_size=8, max_seq_len=64)
    yield llm
    llm.shutdown()


def with_graphs(llm, lm_head: bool, max_logits_bytes: int = 1 << 30) -> CudaGraphRunner:
    mr = llm.engine.executor.worker.model_runner
    sc = llm.engine.config.scheduler_config
    g = CudaGraphRunner(mr.model, mr.device, sc.max_num_seqs, sc.max_model_len, mr.block_size,
                        mr.model_config.dtype, lm_head=lm_head, max_logits_bytes=max_logits_bytes)
    eager_capture(g)
    mr.graph_runner = g
    return g


PROMPTS = [[(7 * i + 3 * j) % 300 + 3 for j in range(2 + 5 * i)] for i in range(5)]  # 5 rows: bucket 8, 3 padded


def generate(llm, sp):
    return [o.outputs[0] for o in llm.generate(PROMPTS, sp, use_tqdm=False)]


@pytest.mark.parametrize("sp", [
    SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),  # plain greedy: the graph's argmax
    SamplingParams(max_tokens=6, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True, logprobs=2),  # the sampler
])
def test_tokens_and_logprobs_equal_the_eager_head(llm, sp):
    mr = llm.engine.executor.worker.model_runner
    mr.graph_runner = None
    ref = generate(llm, sp)
    try:
        without = with_graphs(llm, lm_head=False)
        assert not without.head_buckets
        plain = generate(llm, sp)
        g = with_graphs(llm, lm_head=True)
        assert g.head_buckets == g.buckets and g.logits.shape == (8, 320)
        calls, sampled = [], []
        compute_logits, sampler = mr.model.compute_logits, mr.sampler
        mr.model.compute_logits = lambda h: calls.append(h.shape[0]) or compute_logits(h)  # the head's uses
        mr.sampler = lambda logits, *a: sampled.append(logits.shape[0]) or sampler(logits, *a)
        try:
            headed = generate(llm, sp)
        finally:
            del mr.model.compute_logits
            mr.sampler = sampler
    finally:
        mr.graph_runner = None
    # the prefill step runs the head eagerly on its 5 sampling rows; the 5 decode steps' replays run it on the
    # padded bucket of 8 inside the "graph", and the runner takes those logits (no eager head after them)
    assert calls == [5] + [8] * 5
    # a plain greedy batch takes the graph's argmax: the sampler runs at the prefill step only
    assert sampled == ([5] if sp.temperature == 0 else [5] * 6)
    for r, a, b in zip(ref, plain, headed):
        assert a.token_ids == r.token_ids and b.token_ids == r.token_ids
        if sp.logprobs:
            for x, y in zip(r.logprobs, b.logprobs):
                assert x.keys() == y.keys()
                assert all(abs(x[t].logprob - y[t].logprob) < 1e-4 for t in x)


def test_buckets_past_the_logits_budget_run_the_head_eagerly(llm):
    g = with_graphs(llm, lm_head=True, max_logits_bytes=2 * 320 * 4)  # room for 2 rows of fp32 logits
    llm.engine.executor.worker.model_runner.graph_runner = None
    assert g.head_buckets == [1, 2] and g.logits.shape == (2, 320)
    with torch.inference_mode():
        g.seq_lens.fill_(1)
        assert g.forward(4).logits is None
        out = g.forward(2)
        g.seq_lens.zero_()
        ref = g.model.compute_logits(out.hidden)
    assert torch.equal(out.logits, ref) and torch.equal(out.greedy, ref.argmax(-1))


def test_only_the_last_pipeline_stage_holds_a_head():
    from types import SimpleNamespace

    stage = torch.nn.Linear(8, 8, bias=False)
    stage.is_first_stage, stage.is_last_stage = False, False
    stage.config = SimpleNamespace(hidden_size=8, vocab_size=32)
    g = CudaGraphRunner(stage, torch.device("cpu"), max_num_seqs=4, max_model_len=32, block_size=16,
                        dtype=torch.float32, lm_head=True)
    assert g.head_buckets == [] and g.logits is None
    stage.is_last_stage = True
    g = CudaGraphRunner(stage, torch.device("cpu"), max_num_seqs=4, max_model_len=32, block_size=16,
                        dtype=torch.bfloat16, lm_head=True)
    assert g.head_buckets == [1, 2, 4] and g.logits.shape == (4, 32) and g.logits.dtype == torch.bfloat16
