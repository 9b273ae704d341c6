"""Two-micro-batch overlap (shardllm/layers/microbatch_overlap.py): splitting a decode batch in two halves and
interleaving their layers gives the tokens and logprobs of the whole batch, on one process and at tp = 2 (gloo)."""

from __future__ import annotations

import torch

from shardllm import LLM, SamplingParams
from shardllm.layers import microbatch_overlap
from shardllm.layers.attention import AttentionMetadata

PROMPTS = [[5, 9, 13, 200, 17], [7, 3], [250, 14, 88, 19, 201, 6, 6], [11] * 5, [99, 98, 97]]
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=2)


def _run(llm: LLM):
    outs = llm.generate(PROMPTS, GREEDY)
    return [o.outputs[0].token_ids for o in outs], [o.outputs[0].logprobs for o in outs]


def test_split_decode_meta_rows():
    n, m = 5, 2
    meta = AttentionMetadata(torch.arange(n) * 3, torch.arange(n + 1, dtype=torch.int32), torch.arange(1, n + 1),
                             torch.arange(n * 4).view(n, 4), max_query_len=1, max_seq_len=9, block_size=4)
    a, b = microbatch_overlap.split_decode_meta(meta, m)
    assert a.slot_mapping.tolist() == [0, 3] and b.slot_mapping.tolist() == [6, 9, 12]
    assert a.query_start_loc.tolist() == [0, 1, 2] and b.query_start_loc.tolist() == [0, 1, 2, 3]
    assert b.seq_lens.tolist() == [3, 4, 5] and b.block_tables[0].tolist() == [8, 9, 10, 11]


def test_overlapped_decode_equals_whole_batch(tiny_checkpoints, monkeypatch):
    llm = LLM(tiny_checkpoints["llama"], device="cpu", num_kv_blocks=200, block_size=4, dtype="float32")
    try:
        ref_tokens, ref_lp = _run(llm)
        calls = []
        real = microbatch_overlap.run_layers

        def counted(*a, **k):
            calls.append(a[1].shape[0])
            return real(*a, **k)

        # one process (tp = 1): force the split for every decode step of 2 rows or more
        monkeypatch.setattr(microbatch_overlap, "applies", lambda meta, n, tp: meta.max_query_len == 1 and n >= 2)
        monkeypatch.setattr(microbatch_overlap, "run_layers", counted)
        tokens, lp = _run(llm)
    finally:
        llm.shutdown()
    assert calls and max(calls) == len(PROMPTS)  # the split path ran, on the whole decode batch
    assert tokens == ref_tokens
    for a, b in zip(lp, ref_lp):
        for x, y in zip(a, b):
            assert x.keys() == y.keys()
            for t in x:
                assert abs(x[t].logprob - y[t].logprob) < 1e-4


def test_tp2_overlap_equals_one_rank(tiny_checkpoints, monkeypatch, capfd):
    llm = LLM(tiny_checkpoints["llama"], device="cpu", num_kv_blocks=200, block_size=4, dtype="float32")
    try:
        ref_tokens, _ = _run(llm)
    finally:
        llm.shutdown()
    monkeypatch.setenv("SHARDLLM_TP_OVERLAP", "1")  # read by the worker processes at start-up
    monkeypatch.setenv("SHARDLLM_TP_OVERLAP_MIN_TOKENS", "2")
    llm = LLM(tiny_checkpoints["llama"], device="cpu", num_kv_blocks=200, block_size=4, dtype="float32",
              tensor_parallel_size=2)
    try:
        tokens, _ = _run(llm)
    finally:
        llm.shutdown()
    assert tokens == ref_tokens
    # the workers split their decode batches (they inherit the captured stderr and say so once each)
    assert capfd.readouterr().err.count("two-micro-batch overlap on") == 2


def test_no_split_while_kv_scales_are_computed():
    meta = AttentionMetadata(torch.zeros(128, dtype=torch.long), torch.arange(129, dtype=torch.int32),
                             torch.ones(128, dtype=torch.int32), torch.zeros(128, 1, dtype=torch.int32),
                             max_query_len=1, max_seq_len=1, block_size=4)
    enabled = microbatch_overlap.ENABLED
    microbatch_overlap.ENABLED = True
    try:
        assert microbatch_overlap.applies(meta, 128, 2)
        with microbatch_overlap.suspended():
            assert not microbatch_overlap.applies(meta, 128, 2)
        assert microbatch_overlap.applies(meta, 128, 2)
    finally:
        microbatch_overlap.ENABLED = enabled


def test_tp1_split_only_with_its_switch(monkeypatch):
    meta = AttentionMetadata(torch.zeros(128, dtype=torch.long), torch.arange(129, dtype=torch.int32),
                             torch.ones(128, dtype=torch.int32), torch.zeros(128, 1, dtype=torch.int32),
                             max_query_len=1, max_seq_len=1, block_size=4)
    monkeypatch.setattr(microbatch_overlap, "ENABLED", True)
    monkeypatch.setattr(microbatch_overlap, "AT_TP1", False)
    assert not microbatch_overlap.applies(meta, 128, 1) and microbatch_overlap.applies(meta, 128, 2)
    monkeypatch.setattr(microbatch_overlap, "AT_TP1", True)
    assert microbatch_overlap.applies(meta, 128, 1)
    assert not microbatch_overlap.applies(meta, microbatch_overlap.MIN_TOKENS - 1, 1)  # small batches stay whole
    monkeypatch.setattr(microbatch_overlap, "ENABLED", False)
    assert not microbatch_overlap.applies(meta, 128, 1)  # the tp-1 switch alone does nothing
