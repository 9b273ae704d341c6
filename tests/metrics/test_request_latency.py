"""The latency histograms of a request with n > 1 sequences: its end is its last sequence's, not its first's."""

from __future__ import annotations

import time

from shardllm import LLM, SamplingParams
from shardllm.metrics import LatencyHistograms


def test_n_gt_1_request_ends_with_its_last_sequence(tiny_checkpoints):
    """Two sequences sampled with different seeds stop at different steps (a stop token); the request's
    RequestOutput.metrics, and so the e2e and per-token histograms, must end when the second one does. They used
    the first sequence's timestamps alone, so a request whose first sequence stopped early looked that short."""
    engine = LLM(tiny_checkpoints["llama"], device="cpu", num_kv_blocks=64).engine
    stop_ids = list(range(3, 40))  # ~12% of the tiny vocabulary: sequences stop after a few tokens, not together
    for seed in range(200):
        params = SamplingParams(n=2, max_tokens=12, temperature=1.0, seed=seed, stop_token_ids=stop_ids)
        engine.add_request(f"r{seed}", [5, 6, 7, 8], params)
        done_at: dict[int, float] = {}  # sequence index -> time its last step began
        final = None
        while engine.has_unfinished_requests():
            began = time.time()
            for out in engine.step():
                for o in out.outputs:
                    if o.finish_reason is not None:
                        done_at.setdefault(o.index, began)
                if out.finished:
                    final = out
        lens = [len(o.token_ids) for o in final.outputs]
        if lens[0] + 2 <= lens[1]:  # the first sequence ended at least two steps before the second
            break
    else:
        raise AssertionError("no seed made the first sequence end before the second")
    m = final.metrics
    assert m.finished_time >= done_at[1] > done_at[0]  # the last sequence's end, not the first's
    latency = LatencyHistograms()
    latency.observe(final)
    _, e2e, count = latency.e2e_request_latency.snapshot()
    assert count == 1 and e2e == m.finished_time - m.arrival_time >= done_at[1] - m.arrival_time
    _, tpot, count = latency.time_per_output_token.snapshot()
    assert count == 1 and tpot == (m.finished_time - m.first_token_time) / (max(lens) - 1)
