"""Pipeline parallelism: same tokens as one rank (CPU, gloo), batches in flight, validation."""

import pytest
import torch

from shardllm import LLM, SamplingParams
from shardllm.config import EngineConfig
from shardllm.engine.llm_engine import LLMEngine
from shardllm.executor.base import Executor
from shardllm.step_io import ModelRunnerOutput
from tests.conftest import write_tiny_checkpoint

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
PROMPTS = [[1, 5, 7, 9], [3, 4], [8] * 9, [2, 3, 4, 5, 6, 7, 8], [100] * 20, [41, 42]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("pp") / "l5"), "llama", num_hidden_layers=5)


@pytest.fixture(scope="module")
def reference(ckpt):
    llm = LLM(ckpt, device="cpu", num_kv_blocks=100)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


PROMPT_LOGPROBS = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1)


@pytest.fixture(scope="module")
def reference_prompt_logprobs(ckpt):
    return LLM(ckpt, device="cpu", num_kv_blocks=100).generate(PROMPTS[4], PROMPT_LOGPROBS, use_tqdm=False)[0]


def staggered(engine, prompts, every: int = 2) -> list[list[int]]:
    """Add one request every `every` steps, so that batches of different make-up meet in the pipeline."""
    results, pending, step = {}, list(enumerate(prompts)), 0
    while pending or engine.has_unfinished_requests():
        if pending and step % every == 0:
            i, p = pending.pop(0)
            engine.add_request(str(i), p, GREEDY)
        for out in engine.step():
            if out.finished:
                results[int(out.request_id)] = out.outputs[0].token_ids
        step += 1
    return [results[i] for i in range(len(prompts))]


@pytest.mark.parametrize("tp, pp, partition", [(1, 2, None), (1, 3, [1, 3, 1]), (2, 2, None)])
def test_pipeline_equals_one_rank(ckpt, reference, reference_prompt_logprobs, tp, pp, partition):
    llm = LLM(ckpt, device="cpu", num_kv_blocks=100, tensor_parallel_size=tp, pipeline_parallel_size=pp,
              pp_partition=partition, max_num_tokens=16)
    try:
        assert staggered(llm.engine, PROMPTS) == reference
        assert llm.engine.kv_cache_manager.usage == 0.0
        # prompt logprobs come from the last stage, over chunks of 16 tokens
        got = llm.generate(PROMPTS[4], PROMPT_LOGPROBS, use_tqdm=False)[0].prompt_logprobs
        ref = reference_prompt_logprobs.prompt_logprobs
        assert len(got) == len(ref) == len(PROMPTS[4]) and got[0] is None
        for g, r in zip(got[1:], ref[1:]):
            assert sorted(g) == sorted(r) and max(abs(g[t].logprob - r[t].logprob) for t in r) <= 1e-4
    finally:
        llm.shutdown()


def test_default_model_tp3_pp2_equals_one_rank():
    sp = SamplingParams(max_tokens=12, temperature=0)
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "user", "content": "Count from one to five."}]]
    ref = LLM(device="cpu", cpu_kv_cache_gb=0.25, max_seq_len=2048).chat(chats, sp, use_tqdm=False)
    llm = LLM(device="cpu", cpu_kv_cache_gb=0.25, max_seq_len=2048, tensor_parallel_size=3, pipeline_parallel_size=2)
    try:  # the default model ties its embeddings: the last stage reads the embedding as its LM head
        outs = llm.chat(chats, sp, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == [r.outputs[0].token_ids for r in ref]
    finally:
        llm.shutdown()


class RecordingExecutor(Executor):
    """Stands in for the workers: answers every sampling request with token 7, records the pipeline."""

    def initialize(self) -> int:
        self.queue, self.in_flight_at_submit, self.overlaps = [], [], []
        return 200

    def submit(self, so) -> None:
        ids = {s.req_id for s in so.scheduled}
        for earlier in self.queue:
            self.overlaps.append(ids & {s.req_id for s in earlier.scheduled})
        self.queue.append(so)
        self.in_flight_at_submit.append(len(self.queue))

    def collect(self) -> ModelRunnerOutput:
        so = self.queue.pop(0)
        ids = [s.req_id for s in so.scheduled if s.do_sample]
        return ModelRunnerOutput(ids, [7] * len(ids))

    def memory_in_use(self):
        return [0]


@pytest.mark.parametrize("pp", [2, 4])
def test_pp_batches_in_flight_keep_every_stage_busy(ckpt, monkeypatch, pp):
    monkeypatch.setattr(Executor, "create", staticmethod(lambda config: RecordingExecutor(config)))
    monkeypatch.setattr("shardllm.config._check_parallel", lambda *a: None)
    config = EngineConfig.create(ckpt, device="cpu", pipeline_parallel_size=pp, max_batch_size=64,
                                 max_num_tokens=64, num_kv_blocks=200)
    engine = LLMEngine(config)
    for i in range(32):
        engine.add_request(str(i), [5 + i % 7] * (3 + i % 5), SamplingParams(max_tokens=16, ignore_eos=True))
    done = 0
    while engine.has_unfinished_requests():
        done += sum(o.finished for o in engine.step())
    ex = engine.executor
    assert done == 32
    # a request is never in two batches of the pipeline at once
    assert all(not o for o in ex.overlaps)
    # in steady state every submit finds pp batches ahead of it (a synchronous pipeline keeps pp + 1 in flight:
    # the first stage has the extra one to compute while the driver plans the oldest batch's next step)
    nmb = config.scheduler_config.num_microbatches
    assert nmb == pp + 1
    steady = ex.in_flight_at_submit[nmb:-nmb]
    assert steady and sum(n == nmb for n in steady) / len(steady) > 0.9


def test_pp_validation_errors(ckpt, monkeypatch):
    with pytest.raises(ValueError, match="exceeds the model's 5 layers"):
        EngineConfig.create(ckpt, device="cpu", pipeline_parallel_size=6)
    with pytest.raises(ValueError, match="pp_partition=\\[2, 2\\] must .* summing to the model's 5 layers"):
        EngineConfig.create(ckpt, device="cpu", pipeline_parallel_size=2, pp_partition=[2, 2])
    with pytest.raises(ValueError, match="at least 1 layer"):
        EngineConfig.create(ckpt, device="cpu", pipeline_parallel_size=2, pp_partition=[5, 0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="2 GPUs visible, tp_size=2 x pp_size=2 needs 4: lower tp_size"):
        EngineConfig.create(ckpt, device="cuda", tensor_parallel_size=2, pipeline_parallel_size=2)
