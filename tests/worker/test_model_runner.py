import dataclasses

import numpy as np
import pytest
import torch

from shardllm import LLM
from shardllm.step_io import ScheduledRequest, SchedulerOutput


@pytest.fixture(scope="module")
def runner(tiny_checkpoints):
    llm = LLM(tiny_checkpoints["llama"], device="cpu", num_kv_blocks=100, block_size=4)
    return llm.engine.executor.worker.model_runner


def test_prepare_inputs_positions_slots_and_sequence_starts(runner):
    so = SchedulerOutput(scheduled=[
        ScheduledRequest("a", [11, 12, 13], 5, [7, 3, 9], True),  # positions 5..7: block index 1
        ScheduledRequest("b", [21], 0, [2], True),
        ScheduledRequest("c", [31, 32, 33, 34, 35], 2, [4, 6], False),
    ])
    x = runner.prepare_inputs(so)
    assert x.input_ids.tolist() == [11, 12, 13, 21, 31, 32, 33, 34, 35]
    assert x.positions.tolist() == [5, 6, 7, 0, 2, 3, 4, 5, 6]
    # slot = block_table[pos // 4] * 4 + pos % 4
    assert x.meta.slot_mapping.tolist() == [3 * 4 + 1, 3 * 4 + 2, 3 * 4 + 3, 2 * 4 + 0,
                                            4 * 4 + 2, 4 * 4 + 3, 6 * 4 + 0, 6 * 4 + 1, 6 * 4 + 2]
    assert x.meta.query_start_loc.tolist() == [0, 3, 4, 9]
    assert x.meta.seq_lens.tolist() == [8, 1, 7]
    assert x.meta.max_query_len == 5 and x.meta.max_seq_len == 8
    assert x.meta.block_tables.tolist() == [[7, 3], [2, 0], [4, 6]]
    # only requests whose chunk reaches the end of their tokens sample, from their last token
    assert x.logits_indices.tolist() == [2, 3] and x.sample_req_ids == ["a", "b"]
    assert x.meta.fresh_from == 3  # "c" (start 2) is the last with cached context: none after it
    starts = {"a": 5, "b": 0, "c": 0}
    so = SchedulerOutput(scheduled=[ScheduledRequest(r, [1] * n, starts[r], [1, 2], True)
                                    for r, n in (("a", 1), ("b", 3), ("c", 2))])
    assert runner.prepare_inputs(so).meta.fresh_from == 1  # a decode, then two prompts from their start
    so = SchedulerOutput(scheduled=[ScheduledRequest("b", [1, 2], 0, [1], True)])
    assert runner.prepare_inputs(so).meta.fresh_from == 0
    so = SchedulerOutput(scheduled=[ScheduledRequest("a", [1], 5, [7, 3], True)])
    assert runner.prepare_inputs(so).meta.fresh_from is None  # decodes only


def test_reference_attention_mask_is_causal_with_cached_context(runner):
    so = SchedulerOutput(scheduled=[ScheduledRequest("a", [1, 2], 3, [1, 2], True),
                                    ScheduledRequest("b", [5], 0, [3], True)])
    ref = runner.prepare_inputs(so).meta.reference_indices()
    mask = ref["mask"][:, 0]  # (B, Tq, Tk)
    # a: queries at positions 3 and 4 see keys 0..3 and 0..4
    assert mask[0, 0].tolist() == [True] * 4 + [False]
    assert mask[0, 1].tolist() == [True] * 5
    # b: one query at position 0 sees key 0 only; its padded second row is not valid
    assert mask[1, 0].tolist() == [True, False, False, False, False]
    assert ref["q_valid"].tolist() == [[True, True], [True, False]]


@pytest.mark.parametrize("param_dtype", [torch.float8_e4m3fn, torch.bfloat16])
def test_graph_buffers_of_a_later_stage_take_the_activation_dtype(param_dtype):
    """A pipeline stage without the embedding receives activations: its static graph inputs are in the compute
    dtype, whatever dtype its first parameter has (FP8 weights broke capture at pp = 2 on the H200)."""
    from types import SimpleNamespace

    from shardllm.worker.cuda_graph import CudaGraphRunner

    stage = torch.nn.Linear(8, 8, bias=False).to(param_dtype)
    stage.is_first_stage, stage.config = False, SimpleNamespace(hidden_size=8)
    runner = CudaGraphRunner(stage, torch.device("cpu"), max_num_seqs=4, max_model_len=32, block_size=16,
                             dtype=torch.bfloat16)
    assert {t.dtype for t in runner.intermediate.values()} == {torch.bfloat16}
    assert runner.intermediate["hidden_states"].shape == (4, 8)


def test_step_tensors_start_on_16_byte_boundaries(runner):
    """Triton specializes its kernels on pointer alignment: every step tensor starts 16-byte aligned whatever the
    batch (3 sequences, 9 tokens: odd sizes that left the packed tensors at 4- and 8-byte offsets before)."""
    so = SchedulerOutput(scheduled=[
        ScheduledRequest("a", [11, 12, 13], 5, [7, 3, 9], True),
        ScheduledRequest("b", [21], 0, [2], True),
        ScheduledRequest("c", [31, 32, 33, 34, 35], 2, [4, 6], False),
    ])
    x = runner.prepare_inputs(so)
    m = x.meta
    tensors = dict(input_ids=x.input_ids, positions=x.positions, slot_mapping=m.slot_mapping,
                   logits_indices=x.logits_indices, query_start_loc=m.query_start_loc, seq_lens=m.seq_lens,
                   block_tables=m.block_tables)
    assert {k: t.data_ptr() % 16 for k, t in tensors.items()} == dict.fromkeys(tensors, 0)
    assert m.seq_lens.tolist() == [8, 1, 7] and m.block_tables.tolist() == [[7, 3], [2, 0], [4, 6]]


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float32])
def test_to_device_keeps_values_and_aligns_each_array(runner, dtype):
    arrays = [np.arange(n, dtype=np.float64) + 10 * n for n in (1, 2, 3, 0, 5, 7)]
    out = runner._to_device([a.astype(torch.empty((), dtype=dtype).numpy().dtype) for a in arrays], dtype)
    assert [t.tolist() for t in out] == [a.astype(int).tolist() for a in arrays]
    assert all(t.dtype == dtype and t.data_ptr() % 16 == 0 for t in out)


def test_prefill_tile_warm_up_runs_one_short_prompt_per_tile_size_on_the_padding_block(runner):
    from shardllm.layers.attention.triton_paged import prefill_block_q

    a = runner.attn_layers[0]
    group = a.num_heads // a.num_kv_heads
    sc = runner.config.scheduler_config
    longest = min(sc.max_num_batched_tokens, sc.max_model_len)
    first_of = {}  # tile size -> the shortest chunk (>= 2 tokens) that takes it
    for n in range(2, longest + 1):
        first_of.setdefault(prefill_block_q(n, group), n)
    assert len(first_of) > 1, "the tiny model should have short-chunk tile sizes to warm up"
    caches = [c.clone() for c in runner.kv_caches]
    assert runner.warm_up_prefill_tiles() == sorted(first_of.values())
    for before, after in zip(caches, runner.kv_caches):  # (2, blocks, block_size, nkv, D): only block 0 written
        assert torch.equal(before[:, 1:], after[:, 1:])


def test_prefill_warm_up_covers_the_transposed_v_long_chunk_launch(runner, monkeypatch):
    """A transposed V cache changes launch at V_T_LONG_FROM-token chunks: the warm-up runs that length too (else the
    first long prompt compiles it mid-run). The forwards are recorded, not run (the CPU cache is not transposed)."""
    from shardllm.layers.attention import triton_prefill as tp

    monkeypatch.setattr(tp, "PREFILL_CONFIG", None)  # the per-layout defaults, whatever the environment says
    ran = []
    monkeypatch.setattr(runner, "_dummy_forward", lambda n, **k: ran.append(n))
    for a in runner.attn_layers:
        monkeypatch.setattr(a, "v_transposed", True)
    sc = dataclasses.replace(runner.config.scheduler_config, max_num_batched_tokens=4096, max_model_len=4096)
    monkeypatch.setattr(runner, "config", dataclasses.replace(runner.config, scheduler_config=sc))
    longest = min(sc.max_num_batched_tokens, sc.max_model_len)
    assert longest >= tp.V_T_LONG_FROM
    a = runner.attn_layers[0]
    group = a.num_heads // a.num_kv_heads
    first_of = {}
    for n in range(2, longest + 1):
        c = tp.prefill_config(True, n)
        first_of.setdefault((tp.prefill_block_q(n, group, c), c), n)
    assert tp.V_T_LONG_FROM in first_of.values()
    assert runner.warm_up_prefill_tiles() == ran == sorted(first_of.values())
