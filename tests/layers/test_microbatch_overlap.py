"""Two-micro-batch overlap (shardllm/layers/microbatch_overlap.py): splitting a decode batch in two halves, or a step
with prompt chunks at a sequence boundary, and interleaving their layers gives the tokens and logprobs of the whole
batch, on one process and at tp = 2 (gloo)."""

from __future__ import annotations

import pytest
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


def test_sm_carveout_holds_inside_the_overlap_only(tiny_checkpoints, monkeypatch):
    """SHARDLLM_TP_OVERLAP_SM_CARVEOUT: every layer block of the two halves runs under the carveout (what cuBLAS
    reads when a GEMM is set up), the steps outside the overlap (prefill) and after it do not, and the tokens stay
    the whole batch's."""
    from shardllm.models.llama import LlamaDecoderLayer

    llm = LLM(tiny_checkpoints["llama"], device="cpu", num_kv_blocks=200, block_size=4, dtype="float32")
    try:
        ref_tokens, _ = _run(llm)
        seen = []
        for name in ("attention_block", "mlp_block"):
            real = getattr(LlamaDecoderLayer, name)
            monkeypatch.setattr(LlamaDecoderLayer, name, lambda self, *a, _r=real, _n=name: (
                seen.append((_n, a[-1].max_query_len if _n == "attention_block" else None,
                             torch._C._get_sm_carveout_experimental())), _r(self, *a))[1])
        monkeypatch.setattr(microbatch_overlap, "applies", lambda meta, n, tp: meta.max_query_len == 1 and n >= 2)
        monkeypatch.setattr(microbatch_overlap, "SM_CARVEOUT", 8)
        tokens, _ = _run(llm)
    finally:
        llm.shutdown()
    assert tokens == ref_tokens
    decode = [c for n, q, c in seen if n == "attention_block" and q == 1]
    prefill = [c for n, q, c in seen if n == "attention_block" and q is not None and q > 1]
    assert decode and set(decode) == {8} and prefill and set(prefill) == {None}
    # every block in between ran under it: the MLPs of split steps too (as many as their attention blocks)
    mlp = [c for n, q, c in seen if n == "mlp_block"]
    assert mlp.count(8) == len(decode) and set(mlp) <= {8, None}
    assert torch._C._get_sm_carveout_experimental() is None


def test_sm_carveout_restores_and_rejects():
    before = torch._C._get_sm_carveout_experimental()
    with microbatch_overlap.sm_carveout(0, torch.device("cpu")):
        assert torch._C._get_sm_carveout_experimental() == before
    with microbatch_overlap.sm_carveout(4, torch.device("cpu")):
        assert torch._C._get_sm_carveout_experimental() == 4
        with pytest.raises(RuntimeError):
            with microbatch_overlap.sm_carveout(6, torch.device("cpu")):
                assert torch._C._get_sm_carveout_experimental() == 6
                raise RuntimeError("inner")
        assert torch._C._get_sm_carveout_experimental() == 4
    assert torch._C._get_sm_carveout_experimental() == before


@pytest.mark.gpu
@pytest.mark.timeout(60)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sm_carveout_leaving_no_sm_is_refused():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    with pytest.raises(ValueError, match="leaves the GEMMs no SM"):
        with microbatch_overlap.sm_carveout(sms, torch.device("cuda", 0)):
            pass


@pytest.mark.parametrize("arch,ep", [("llama", 1), ("mixtral", 2)], ids=["llama-tp2", "mixtral-tp2-ep2"])
def test_tp2_overlap_equals_one_rank(tiny_checkpoints, monkeypatch, capfd, arch, ep):
    """Both splits on two gloo ranks; with Mixtral at ep 2 the halves' expert collectives interleave too."""
    llm = LLM(tiny_checkpoints[arch], device="cpu", num_kv_blocks=200, block_size=4, dtype="float32")
    try:
        ref_tokens, _ = _run(llm)
    finally:
        llm.shutdown()
    monkeypatch.setenv("SHARDLLM_TP_OVERLAP", "1")  # read by the worker processes at start-up
    monkeypatch.setenv("SHARDLLM_TP_OVERLAP_MIN_TOKENS", "2")
    monkeypatch.setenv("SHARDLLM_TP_OVERLAP_PREFILL", "1")  # the first step (22 prompt tokens) splits 14 | 8
    monkeypatch.setenv("SHARDLLM_TP_OVERLAP_PREFILL_MIN_TOKENS", "4")
    llm = LLM(tiny_checkpoints[arch], device="cpu", num_kv_blocks=200, block_size=4, dtype="float32",
              tensor_parallel_size=2, expert_parallel_size=ep)
    try:
        tokens, _ = _run(llm)
    finally:
        llm.shutdown()
    assert tokens == ref_tokens
    # the workers split their decode batches (they inherit the captured stderr and say so once each)
    err = capfd.readouterr().err
    assert err.count("two-micro-batch overlap on (decode batches of 2+ rows, steps with prompt chunks of 4+ "
                     "tokens)") == 2
    # and the first step (22 prompt tokens) did split on both ranks, at the same boundary
    assert err.count("two-micro-batch overlap split a step with prompt chunks: sequences [0, 3) and [3, 5), "
                     "14 | 8 tokens") == 2


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


def _step_meta(q_lens, starts, nd=None):
    """A step's metadata as the runner builds it (host query_start_loc and fresh_from too), 4-token pages."""
    import numpy as np

    q_lens, starts = np.array(q_lens), np.array(starts)
    with_context = np.flatnonzero(starts > 0)
    qsl = np.concatenate([[0], np.cumsum(q_lens)])
    seq_lens = starts + q_lens
    n, b = int(qsl[-1]), len(q_lens)
    tables = torch.arange(b * 8, dtype=torch.int32).view(b, 8)
    return AttentionMetadata(torch.arange(n) * 7, torch.tensor(qsl, dtype=torch.int32),
                             torch.tensor(seq_lens, dtype=torch.int32), tables, max_query_len=int(q_lens.max()),
                             max_seq_len=int(seq_lens.max()), block_size=4,
                             num_decodes=(int(np.argmax(q_lens != 1)) if q_lens.max() > 1 else 0) if nd is None
                             else nd, host_query_start_loc=qsl,
                             fresh_from=(int(with_context[-1]) + 1 if len(with_context) else 0) if q_lens.max() > 1
                             else None)


def test_prefill_split_picks_the_boundary_nearest_half_and_keeps_chunks_whole(monkeypatch):
    monkeypatch.setattr(microbatch_overlap, "ENABLED", True)
    monkeypatch.setattr(microbatch_overlap, "PREFILL", True)
    monkeypatch.setattr(microbatch_overlap, "PREFILL_MIN_TOKENS", 8)
    mixed = _step_meta([1, 1, 1, 6, 5, 9, 4], [10, 3, 7, 0, 20, 0, 2])  # 27 tokens: boundaries 1 2 3 9 14 23
    assert microbatch_overlap.prefill_split(mixed, 27, 2) == 5  # 5 sequences, 14 tokens | 13
    monkeypatch.setattr(microbatch_overlap, "AT_TP1", True)
    assert microbatch_overlap.prefill_split(mixed, 27, 1) is None  # never at tp 1: no all-reduce to hide
    one_chunk = _step_meta([1, 30, 2], [5, 0, 0])  # every boundary leaves a side under a quarter
    assert microbatch_overlap.prefill_split(one_chunk, 33, 2) is None
    assert microbatch_overlap.prefill_split(_step_meta([1] * 40, [5] * 40), 40, 2) is None  # decodes: `applies`
    no_host = _step_meta([6, 5, 9, 4], [0, 0, 0, 0])
    no_host.host_query_start_loc = None
    assert microbatch_overlap.prefill_split(no_host, 24, 2) is None
    monkeypatch.setattr(microbatch_overlap, "PREFILL_MIN_TOKENS", 28)
    assert microbatch_overlap.prefill_split(mixed, 27, 2) is None  # under the step size floor
    monkeypatch.setattr(microbatch_overlap, "PREFILL", False)
    monkeypatch.setattr(microbatch_overlap, "PREFILL_MIN_TOKENS", 8)
    assert microbatch_overlap.prefill_split(mixed, 27, 2) is None
    monkeypatch.setattr(microbatch_overlap, "PREFILL", True)
    with microbatch_overlap.suspended():
        assert microbatch_overlap.prefill_split(mixed, 27, 2) is None


def test_split_step_meta_halves():
    meta = _step_meta([1, 1, 1, 6, 5, 9, 4], [10, 3, 7, 0, 20, 0, 2])
    t, a, b = microbatch_overlap.split_step_meta(meta, 5)
    assert t == 14 and a.slot_mapping.tolist() == (torch.arange(14) * 7).tolist()
    assert b.slot_mapping.tolist() == (torch.arange(14, 27) * 7).tolist()
    assert a.query_start_loc.tolist() == [0, 1, 2, 3, 9, 14] and list(a.host_query_start_loc) == [0, 1, 2, 3, 9, 14]
    assert b.query_start_loc.tolist() == [0, 9, 13] and list(b.host_query_start_loc) == [0, 9, 13]
    assert a.seq_lens.tolist() == [11, 4, 8, 6, 25] and b.seq_lens.tolist() == [9, 6]
    assert torch.equal(b.block_tables, meta.block_tables[5:])
    assert (a.num_decodes, a.max_query_len, b.num_decodes, b.max_query_len) == (3, 6, 0, 9)
    assert meta.fresh_from == 7 and (a.fresh_from, b.fresh_from) == (5, 2)  # the last sequence (start 2) has context
    t, a, b = microbatch_overlap.split_step_meta(meta, 2)  # decodes on both sides
    assert (t, a.num_decodes, a.max_query_len, b.num_decodes, b.max_query_len) == (2, 0, 1, 1, 9)
    assert (a.fresh_from, b.fresh_from) == (None, 5)  # a: decodes only
    meta = _step_meta([1, 1, 6, 5, 9, 4], [10, 3, 7, 0, 0, 0])  # fresh from sequence 3 on
    for k, want in ((1, (None, 2)), (3, (3, 0)), (4, (3, 0)), (5, (3, 0))):
        t, a, b = microbatch_overlap.split_step_meta(meta, k)
        assert (a.fresh_from, b.fresh_from) == want, k


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_prefill_split_equals_whole_steps(tiny_checkpoints, monkeypatch, kernels):
    """Prompts long enough for chunked prefill and mixed steps (16-token step budget): every step with prompt
    chunks that can be split is split (as at tp 2: the split never applies at tp 1); the tokens and logprobs are the
    unsplit run's, with the torch reference attention and with the Triton kernels (interpreter: each half's decode
    rows to the decode kernel, its chunks to the prefill kernel, by its own num_decodes)."""
    if kernels == "triton":
        from shardllm.layers.attention import triton_paged
        from shardllm.layers.attention.attention import Attention

        if not triton_paged.HAS_TRITON:
            pytest.skip("no Triton")
        monkeypatch.setattr(Attention, "uses_triton_kernels", lambda self, q: self.use_triton)
    prompts = [[(7 * i + j) % 250 + 3 for j in range(n)] for i, n in enumerate([9, 14, 5, 11, 7])]
    llm = LLM(tiny_checkpoints["llama"], device="cpu", num_kv_blocks=200, block_size=4, dtype="float32",
              max_num_tokens=16, enable_prefix_caching=False)  # the second run prefills all of it again
    try:
        want = llm.generate(prompts, GREEDY)
        splits = []
        real, real_split = microbatch_overlap.split_step_meta, microbatch_overlap.prefill_split
        monkeypatch.setattr(microbatch_overlap, "split_step_meta", lambda m, k: splits.append(k) or real(m, k))
        monkeypatch.setattr(microbatch_overlap, "prefill_split", lambda m, n, tp: real_split(m, n, 2))
        monkeypatch.setattr(microbatch_overlap, "ENABLED", True)
        monkeypatch.setattr(microbatch_overlap, "PREFILL", True)
        monkeypatch.setattr(microbatch_overlap, "PREFILL_MIN_TOKENS", 4)
        monkeypatch.setattr(microbatch_overlap, "MIN_TOKENS", 10**6)  # decode steps whole: only the prefill split
        got = llm.generate(prompts, GREEDY)
    finally:
        llm.shutdown()
    assert len(splits) >= 2
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for x, y in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            assert x.keys() == y.keys() and all(abs(x[t].logprob - y[t].logprob) < 1e-4 for t in x)
