"""The worker's block tables: plans send deltas; the gathered rows equal the scheduler's whole tables."""

import pickle
import random

import numpy as np
import pytest

from shardllm.step_io import ScheduledRequest, SchedulerOutput
from shardllm.worker.block_table import BlockTables


def test_deltas_rebuild_whole_tables_through_growth_cuts_and_reuse():
    rng = random.Random(0)
    bt = BlockTables(rows=2, cols=2)  # small: rows and columns must grow
    truth: dict[str, list[int]] = {}
    for _ in range(400):
        rid = f"r{rng.randrange(12)}"
        op = rng.random()
        if rid in truth and op < 0.1:  # finished: the row is reused by a later request
            bt.drop(rid)
            del truth[rid]
            continue
        if rid not in truth or op < 0.2:  # new, or back after preemption: a whole new table
            start, ids = 0, [rng.randrange(1, 999) for _ in range(rng.randrange(1, 6))]
        else:
            start = len(truth[rid])
            ids = [rng.randrange(1, 999) for _ in range(rng.choice([0, 0, 0, 1, 3]))]
        truth[rid] = truth.get(rid, [])[:start] + ids
        bt.update(rid, start, ids)
        names = sorted(truth)
        rows = np.array([bt.row_of[n] for n in names])
        width = max(len(truth[n]) for n in names) + rng.randrange(0, 3)
        got = bt.gather(rows, width)
        for n, row in zip(names, got):
            assert row.tolist() == truth[n] + [0] * (width - len(truth[n]))
            assert bt.row_ids(n) == truth[n]


def test_a_delta_for_an_unknown_request_is_an_error():
    with pytest.raises(ValueError, match="whole table first"):
        BlockTables().update("x", 3, [5])


def test_plan_pickles_as_columns_and_round_trips():
    so = SchedulerOutput(scheduled=[ScheduledRequest("a", [1, 2], 3, [7], True, 2),
                                    ScheduledRequest("b", [-1], 9, [], False)],
                         finished_req_ids=["z"], num_batched_tokens=3, num_preempted=1)
    back = pickle.loads(pickle.dumps(so))
    assert back == so and back.scheduled[0].block_start == 2 and back.scheduled[1].block_start == 0
