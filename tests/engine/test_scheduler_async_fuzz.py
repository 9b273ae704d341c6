"""Randomised runs of the scheduler with batches in flight (async scheduling, pipelines), against a fake
model whose token at each position is a fixed function of (request, position).

Requests arrive, get aborted, run out of KV blocks and get preempted at random. Whatever happens: every
placeholder stands for exactly the token later sampled at its position, every request's output is the
fake model's sequence cut by its max_tokens or its stop token, nothing is computed past a length limit and
at most one token past a stop, no request is in a batch twice, every block is free at the end, and a
worker's block tables, rebuilt from the plans' deltas, equal the scheduler's tables.
"""

import random
from collections import deque

import pytest

from shardllm.config import SchedulerConfig
from shardllm.engine.kv_cache_manager import KVCacheManager
from shardllm.engine.request import Request, RequestStatus
from shardllm.engine.scheduler import Scheduler
from shardllm.sampling_params import SamplingParams
from shardllm.step_io import PLACEHOLDER, ModelRunnerOutput
from shardllm.worker.block_table import BlockTables

STOP = 13


def model_token(req_id: str, pos: int) -> int:
    """The fake model: the token it samples for position `pos` of request `req_id`."""
    return (hash((req_id, pos)) % 50) + 14  # never STOP, unless a request plants it


def expected_output(req: Request, stop_at: int | None) -> list[int]:
    out = []
    for k in range(req.sampling_params.max_tokens):
        pos = req.num_prompt_tokens + k
        t = STOP if stop_at == pos else model_token(req.request_id, pos)
        out.append(t)
        if t == STOP:
            break
    return out


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("pp,overlap", [(1, True), (2, True), (3, True), (1, False), (2, False)])
def test_random_runs_keep_every_invariant(seed, pp, overlap):
    rng = random.Random(seed * 31 + pp)
    kv = KVCacheManager(num_blocks=rng.choice([14, 20, 60]), block_size=4, enable_prefix_caching=rng.random() < .5)
    cfg = SchedulerConfig(max_num_seqs=rng.choice([2, 4, 8]), max_num_batched_tokens=rng.choice([8, 16, 40]),
                          max_model_len=48, num_microbatches=pp, async_scheduling=overlap)
    s = Scheduler(cfg, kv)
    max_in_flight = pp + overlap
    reqs: dict[str, Request] = {}
    stop_at: dict[str, int | None] = {}
    computed: dict[str, int] = {}  # tokens each request's chunks covered, over its whole life
    placeholders: dict[tuple[str, int], int] = {}  # (request, position) fed as a placeholder, per occurrence
    in_flight: deque = deque()
    aborted: set[str] = set()
    worker_tables = BlockTables(rows=2, cols=2)  # what every worker rebuilds from the plans, in plan order
    n_added, steps = 0, 0

    def add():
        nonlocal n_added
        rid = f"r{n_added}"
        n_added += 1
        prompt = [rng.randrange(14, 64) for _ in range(rng.randrange(1, 20))]
        params = SamplingParams(max_tokens=rng.randrange(1, 12), ignore_eos=False).clone(eos_token_ids=(STOP,))
        if rng.random() < .3:  # a few requests use penalties: never scheduled ahead of their tokens
            params = params.clone(presence_penalty=0.5)
        r = Request(rid, prompt, params)
        reqs[rid], computed[rid] = r, 0
        stop_at[rid] = len(prompt) + rng.randrange(0, 12) if rng.random() < .4 else None
        s.add_request(r)

    for _ in range(rng.randrange(3, 8)):
        add()
    while n_added < 40 or s.has_unfinished_requests() or in_flight:
        steps += 1
        assert steps < 5000, "no progress"
        if n_added < 40 and (rng.random() < .2 or not s.has_unfinished_requests()):
            add()
        if rng.random() < .03 and s.running:
            victim = rng.choice(s.running).request_id
            s.finish_request(victim, RequestStatus.FINISHED_ABORTED)
            aborted.add(victim)
        submitted = False
        if len(in_flight) < max_in_flight:
            so = s.schedule()
            if not so.is_empty:
                ids = [x.req_id for x in so.scheduled]
                assert len(ids) == len(set(ids)), "a request twice in one batch"
                for rid in so.finished_req_ids:
                    worker_tables.drop(rid)
                for x in so.scheduled:
                    worker_tables.update(x.req_id, x.block_start, x.block_ids)
                    assert worker_tables.row_ids(x.req_id) == kv.get_block_ids(x.req_id)
                for x in so.scheduled:
                    computed[x.req_id] += len(x.token_ids)
                    assert PLACEHOLDER not in x.token_ids[:-1]  # only the last token may be unknown
                    if x.token_ids[-1] == PLACEHOLDER:
                        assert overlap
                        assert not reqs[x.req_id].sampling_params.needs_penalties
                        placeholders[(x.req_id, x.num_computed_tokens + len(x.token_ids) - 1)] = 1
                in_flight.append(so)
                submitted = True
        if in_flight and (not submitted or len(in_flight) >= max_in_flight or not s.has_schedulable()):
            so = in_flight.popleft()
            sampled, tokens = [], []
            for x in so.scheduled:
                if x.do_sample:
                    pos = x.num_computed_tokens + len(x.token_ids)  # the new token's position
                    sampled.append(x.req_id)
                    tokens.append(STOP if stop_at[x.req_id] == pos else model_token(x.req_id, pos))
            s.update_from_output(so, ModelRunnerOutput(sampled, tokens))
        for r in s.running:
            assert r.num_computed_tokens <= r.num_tokens + r.num_pending - (r.num_pending > 0)
            assert r.num_pending <= r.num_in_flight <= (2 if overlap else 1)

    assert n_added > 0 and kv.usage == 0.0 and not kv.req_to_blocks
    assert bool(placeholders) == overlap  # the runs did run ahead (and only with async scheduling)
    print(f"steps={steps} requests={n_added} placeholders={len(placeholders)} "
          f"preemptions={s.num_preemptions_total} aborted={len(aborted)}")
    for rid, r in reqs.items():
        if rid in aborted:
            continue
        out = r.output_token_ids
        assert out == expected_output(r, stop_at[rid]), rid
        for (pid, pos) in placeholders:
            if pid == rid and pos < r.num_tokens:
                assert r.token_ids[pos] == (STOP if stop_at[rid] == pos else model_token(rid, pos))
        if r.num_preemptions == 0:  # nothing computed past a length limit, at most one token past a stop
            assert computed[rid] <= r.num_tokens - 1 + (r.status == RequestStatus.FINISHED_STOPPED)
            assert computed[rid] >= r.num_tokens - 1
