from shardllm.config import SchedulerConfig
from shardllm.engine.kv_cache_manager import KVCacheManager
from shardllm.engine.request import Request, RequestStatus
from shardllm.engine.scheduler import Scheduler
from shardllm.sampling_params import SamplingParams
from shardllm.step_io import ModelRunnerOutput


def make(num_blocks=64, block_size=4, budget=16, max_seqs=8, max_len=128, chunked=True):
    kv = KVCacheManager(num_blocks, block_size)
    return Scheduler(SchedulerConfig(max_seqs, budget, max_len, chunked), kv)


def req(rid, n, max_tokens=4, first=1, **kw):
    return Request(rid, list(range(first, first + n)), SamplingParams(max_tokens=max_tokens, **kw))


def run_step(s, token=7):
    out = s.schedule()
    sampled = [x.req_id for x in out.scheduled if x.do_sample]
    s.update_from_output(out, ModelRunnerOutput(sampled, [token] * len(sampled)))
    return out


def test_budget_is_respected_and_long_prompts_are_chunked():
    s = make(budget=16)
    s.add_request(req("a", 40))
    s.add_request(req("b", 5, first=100))
    out = s.schedule()
    assert [(x.req_id, len(x.token_ids), x.num_computed_tokens, x.do_sample) for x in out.scheduled] == [
        ("a", 16, 0, False)]
    assert out.num_batched_tokens == 16
    s.update_from_output(out, ModelRunnerOutput([], []))
    out = s.schedule()
    assert [(x.req_id, len(x.token_ids), x.num_computed_tokens) for x in out.scheduled] == [("a", 16, 16)]
    s.update_from_output(out, ModelRunnerOutput([], []))
    out = s.schedule()  # the last 8 of a, then b's whole prompt (5) within 16
    assert [(x.req_id, len(x.token_ids), x.do_sample) for x in out.scheduled] == [("a", 8, True), ("b", 5, True)]
    assert out.scheduled[0].token_ids == list(range(33, 41))


def test_no_chunking_waits_for_budget():
    s = make(budget=16, chunked=False)
    s.add_request(req("a", 20))
    assert s.schedule().is_empty


def test_decode_steps_and_max_tokens_finish():
    s = make()
    s.add_request(req("a", 3, max_tokens=3))
    for _ in range(3):
        out = run_step(s)
    assert out.scheduled[0].token_ids == [7] and out.scheduled[0].num_computed_tokens == 4
    assert not s.has_unfinished_requests()
    assert s.kv.num_free_blocks == s.kv.num_blocks - 1


def test_eos_and_stop_token_finish_but_not_before_min_tokens():
    s = make()
    r = req("a", 3, max_tokens=10, min_tokens=2, stop_token_ids=[9])
    s.add_request(r)
    run_step(s, token=9)  # below min_tokens: keeps going
    assert not r.is_finished
    run_step(s, token=9)
    assert r.status == RequestStatus.FINISHED_STOPPED and r.stop_reason == 9


def test_max_batch_size_limits_running_requests():
    s = make(max_seqs=2)
    for i in range(4):
        s.add_request(req(str(i), 2))
    out = s.schedule()
    assert [x.req_id for x in out.scheduled] == ["0", "1"]


def test_preemption_when_blocks_run_out_and_recompute():
    # 5 usable blocks of 4 tokens; two requests of 8 tokens each take 4 blocks, then grow.
    s = make(num_blocks=6, block_size=4, budget=64)
    a, b = req("a", 8, max_tokens=8), req("b", 8, max_tokens=8, first=100)
    s.add_request(a)
    s.add_request(b)
    run_step(s)  # both prefilled: 4 blocks, each request has 9 tokens
    out = s.schedule()  # a needs a 3rd block (1 free): ok; b needs a 3rd block: none left -> b preempted
    assert out.num_preempted == 1 and [x.req_id for x in out.scheduled] == ["a"]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert s.waiting[0] is b and b.num_preemptions == 1
    s.update_from_output(out, ModelRunnerOutput(["a"], [7]))
    # b comes back once there is room and recomputes its prompt plus the token it had generated
    while True:
        out = run_step(s)
        back = [x for x in out.scheduled if x.req_id == "b"]
        if back:
            break
    start = back[0].num_computed_tokens  # its first full block may still sit in the prefix cache
    assert start in (0, 4) and back[0].token_ids == (list(range(100, 108)) + [7])[start:]
    while s.has_unfinished_requests():
        run_step(s)
    assert a.num_output_tokens == 8 and b.num_output_tokens == 8
    assert s.kv.num_free_blocks == 5


def test_in_flight_requests_are_not_scheduled_twice():
    s = make()
    s.add_request(req("a", 3))
    s.add_request(req("b", 3))
    first = s.schedule()
    assert {x.req_id for x in first.scheduled} == {"a", "b"}
    assert s.schedule().is_empty  # both still in flight
    s.add_request(req("c", 3))
    second = s.schedule()
    assert [x.req_id for x in second.scheduled] == ["c"]
    s.update_from_output(first, ModelRunnerOutput(["a", "b"], [7, 7]))
    third = s.schedule()
    assert {x.req_id for x in third.scheduled} == {"a", "b"}


def test_prefix_hit_skips_cached_tokens():
    s = make(block_size=4)
    s.add_request(req("a", 10, max_tokens=1))
    run_step(s)
    s.add_request(req("b", 10, max_tokens=1))
    out = s.schedule()
    assert out.scheduled[0].num_computed_tokens == 8 and len(out.scheduled[0].token_ids) == 2
    assert s.requests["b"].num_cached_tokens == 8


def test_abort_frees_blocks_and_tells_workers():
    s = make()
    s.add_request(req("a", 10))
    run_step(s)
    s.finish_request("a", RequestStatus.FINISHED_ABORTED)
    assert s.kv.num_free_blocks == s.kv.num_blocks - 1
    assert s.schedule().finished_req_ids == ["a"]


def test_pipeline_splits_requests_over_microbatches():
    kv = KVCacheManager(64, 4)
    s = Scheduler(SchedulerConfig(8, 64, 128, True, num_microbatches=2), kv)
    for i in range(4):
        s.add_request(req(str(i), 2, first=10 * i + 1))
    first, second = s.schedule(), s.schedule()
    assert [x.req_id for x in first.scheduled] == ["0", "1"]
    assert [x.req_id for x in second.scheduled] == ["2", "3"]
    assert s.schedule().is_empty  # both batches in flight


def test_each_pipeline_microbatch_holds_max_num_seqs():
    """With pp = 2 each batch in flight takes up to max_num_seqs requests, so both stages see full batches."""
    s = Scheduler(SchedulerConfig(2, 64, 128, True, num_microbatches=2), KVCacheManager(64, 4))
    for i in range(5):
        s.add_request(req(str(i), 2, first=10 * i + 1))
    first, second = s.schedule(), s.schedule()
    assert [x.req_id for x in first.scheduled] == ["0", "1"]
    assert [x.req_id for x in second.scheduled] == ["2", "3"]  # 4 running: 2 per micro-batch
    assert len(s.running) == 4 and [r.request_id for r in s.waiting] == ["4"]


def test_a_step_orders_decodes_then_chunks_over_context_then_new_prompts():
    """With a pipeline's async scheduling, an in-flight request's next chunk is chosen after the new prompts, but
    the step lists it before them: a step's prompts from their start are its tail (AttentionMetadata.fresh_from)."""
    s = Scheduler(SchedulerConfig(8, 24, 128, True, num_microbatches=2, async_scheduling=True), KVCacheManager(64, 4))
    for r, n, f in (("a", 40, 1), ("b", 3, 100), ("c", 3, 200), ("d", 3, 300)):
        s.add_request(req(r, n, first=f))
    assert [(x.req_id, x.num_computed_tokens) for x in s.schedule().scheduled] == [("a", 0)]
    assert [x.req_id for x in s.schedule().scheduled] == ["b", "c"]
    third = s.schedule().scheduled  # d chosen first (not in flight), then a's next chunk ahead
    assert [(x.req_id, x.num_computed_tokens, len(x.token_ids)) for x in third] == [("a", 24, 16), ("d", 0, 3)]


def test_shared_running_cap_when_asked():
    """max_num_running_seqs (SHARDLLM_PP_SHARED_MAX_SEQS=1: the earlier behaviour) caps all batches together."""
    cfg = SchedulerConfig(2, 64, 128, True, num_microbatches=2, max_num_running_seqs=2)
    s = Scheduler(cfg, KVCacheManager(64, 4))
    for i in range(4):
        s.add_request(req(str(i), 2, first=10 * i + 1))
    first, second = s.schedule(), s.schedule()
    assert [x.req_id for x in first.scheduled] == ["0", "1"] and second.is_empty
    assert len(s.running) == 2


def test_pipeline_settings(monkeypatch, tiny_checkpoints):
    """pp = 2: max_num_seqs per stage, and one batch more in flight than stages when synchronous."""
    from shardllm.config import EngineConfig

    def sc(**kw):
        return EngineConfig.create(model=tiny_checkpoints["llama"], max_batch_size=4, pipeline_parallel_size=2,
                                   device="cpu", **kw).scheduler_config

    assert (sc().max_num_running_seqs, sc().num_microbatches, sc().async_scheduling) == (8, 3, False)
    assert sc(async_scheduling=True).num_microbatches == 2  # async keeps its own extra step in flight
    monkeypatch.setenv("SHARDLLM_PP_EXTRA_MICROBATCH", "0")
    assert sc().num_microbatches == 2
    monkeypatch.setenv("SHARDLLM_PP_SHARED_MAX_SEQS", "1")
    assert sc().max_num_running_seqs == 4
