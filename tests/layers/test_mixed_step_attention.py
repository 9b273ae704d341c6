"""A step that mixes decodes with prefill chunks: its leading one-token rows (AttentionMetadata.num_decodes) go to the
decode kernel and the rest to the prefill kernel, with the torch reference's output; the scheduler puts one-token
rows first and the runner counts them. CPU under the interpreter (Attention's kernel choice patched), CUDA (gpu)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from shardllm.layers.attention import Attention, triton_paged  # noqa: E402
from shardllm.layers.attention import attention as attention_mod  # noqa: E402
from tests.layers.test_attention_rotary import spy  # noqa: E402
from tests.layers.test_fp8_kv_kernel_scales import FP8, attention_case, exact_fp8_casts  # noqa: E402, F401
from tests.layers.test_fused_ops import cpu, gpu  # noqa: E402
from tests.layers.test_triton_attention import make_case  # noqa: E402

# decodes (contexts across page boundaries, one of a single token), then chunks: a prompt, a chunk over cached
# context, a later one-token row (not leading: the prefill kernel's), another chunk
MIXED = ([1, 1, 1, 1, 6, 5, 1, 9], [37, 1, 16, 70, 6, 29, 23, 40])
NUM_DECODES = 4


@pytest.fixture
def attention_kernels_on_cpu(monkeypatch):
    monkeypatch.setattr(Attention, "uses_triton_kernels", lambda self, q: self.use_triton)


@pytest.fixture
def calls(monkeypatch) -> dict[str, int]:
    """Calls of the two attention kernels' launchers, by name (cleared by each run_mixed)."""
    return spy(monkeypatch, (triton_paged, "paged_decode_attention"), (triton_paged, "paged_prefill_attention"))


def run_mixed(monkeypatch, calls, q_lens, seq_lens, num_decodes: int, split: bool, device: str, dtype: torch.dtype,
              use_triton: bool = True, fp8=None):
    """Attention.forward of one step (no rotary) with the metadata's num_decodes; returns (out, kernel calls).
    fp8: an FP8 cache (stored divided by scales 0.5 / 4.0, attention_case's) instead of make_case's."""
    monkeypatch.setattr(attention_mod, "MIXED_STEP_DECODE_KERNEL", split)
    calls.clear()
    if fp8 is None:
        q, k_cache, v_cache, meta = make_case(q_lens, seq_lens, 2, 3, 32, dtype, device, seed=3)
        attn = Attention(6, 32, 2).to(device)
        attn.use_triton = use_triton
        attn.kv_cache = torch.stack([k_cache, v_cache])
        k = torch.randn(sum(q_lens), 2 * 32, generator=torch.Generator().manual_seed(4)).to(device, dtype)
        v = -k
        q = q.reshape(q.shape[0], -1)
        args = (q, k, v)
    else:
        attn, (q, k, v, meta, _, _) = attention_case(fp8, use_triton, q_lens, seq_lens, (0.5, 4.0), device, dtype)
        args = (q, k, v)
    meta = dataclasses.replace(meta, num_decodes=num_decodes)
    out = attn(*args, meta)
    return out, dict(calls)


def check_mixed(monkeypatch, calls, device: str, dtype: torch.dtype, fp8=None, tol=None) -> None:
    q_lens, seq_lens = MIXED
    ref, ref_calls = run_mixed(monkeypatch, calls, q_lens, seq_lens, NUM_DECODES, True, device, dtype, False, fp8)
    split, split_calls = run_mixed(monkeypatch, calls, q_lens, seq_lens, NUM_DECODES, True, device, dtype, True, fp8)
    whole, whole_calls = run_mixed(monkeypatch, calls, q_lens, seq_lens, NUM_DECODES, False, device, dtype, True, fp8)
    none, none_calls = run_mixed(monkeypatch, calls, q_lens, seq_lens, 0, True, device, dtype, True, fp8)
    assert ref_calls == {}
    assert split_calls == {"paged_decode_attention": 1, "paged_prefill_attention": 1}
    assert whole_calls == none_calls == {"paged_prefill_attention": 1}  # the switch off, or no leading decodes
    tol = tol or (dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2))
    for out in (split, whole, none):
        torch.testing.assert_close(out.float(), ref.float(), **tol)


@cpu
def test_mixed_step_sends_its_leading_decodes_to_the_decode_kernel(monkeypatch, calls, attention_kernels_on_cpu):
    check_mixed(monkeypatch, calls, "cpu", torch.float32)


@cpu
@pytest.mark.usefixtures("exact_fp8_casts")  # the interpreter's own fp8 cast rounds wrongly (see the fixture)
@pytest.mark.parametrize("fp8", FP8, ids=["e4m3", "e5m2"])
def test_mixed_step_over_an_fp8_cache_with_scales(monkeypatch, calls, attention_kernels_on_cpu, fp8):
    check_mixed(monkeypatch, calls, "cpu", torch.float32, fp8)


@cpu
def test_a_step_of_decodes_only_or_chunks_only_takes_one_kernel(monkeypatch, calls, attention_kernels_on_cpu):
    _, got = run_mixed(monkeypatch, calls, [1, 1, 1], [5, 9, 33], 0, True, "cpu", torch.float32)
    assert got == {"paged_decode_attention": 1}
    _, got = run_mixed(monkeypatch, calls, [3, 4], [3, 20], 0, True, "cpu", torch.float32)
    assert got == {"paged_prefill_attention": 1}


def test_chunks_query_start_loc_counts_from_the_first_chunk():
    _, _, _, meta = make_case(*MIXED, 2, 3, 32)
    meta = dataclasses.replace(meta, num_decodes=NUM_DECODES)
    qsl = meta.chunks_query_start_loc()
    assert qsl.tolist() == np.concatenate([[0], np.cumsum(MIXED[0][NUM_DECODES:])]).tolist()
    assert meta.chunks_query_start_loc() is qsl  # once a step, shared by the layers


def test_scheduler_puts_one_token_rows_first():
    """Whatever the running order (an async pipeline runs its in-flight requests last), the plan lists the
    one-token rows first, in their order, then the chunks."""
    from tests.engine.test_scheduler import make, req, run_step

    s = make(budget=16)
    s.add_request(req("a", 3, max_tokens=8))
    s.add_request(req("b", 4, max_tokens=8, first=50))
    run_step(s)  # both prompts
    s.add_request(req("c", 25, max_tokens=8, first=100))
    out = run_step(s)
    assert [(x.req_id, len(x.token_ids)) for x in out.scheduled] == [("a", 1), ("b", 1), ("c", 14)]
    assert [r.request_id for r in s.running] == ["a", "b", "c"]
    s.running.insert(0, s.running.pop())  # c (14 of its 25 done) ahead of the decodes
    out = s.schedule()
    assert [(x.req_id, len(x.token_ids)) for x in out.scheduled] == [("a", 1), ("b", 1), ("c", 11)]


def test_runner_counts_the_leading_decodes(tiny_checkpoints):
    from shardllm import LLM
    from shardllm.step_io import ScheduledRequest, SchedulerOutput

    llm = LLM(tiny_checkpoints["llama"], device="cpu", num_kv_blocks=100, block_size=4)
    runner = llm.engine.executor.worker.model_runner

    def num_decodes(rows):  # rows: (request, tokens, computed); four blocks each
        return runner.prepare_inputs(SchedulerOutput(scheduled=[
            ScheduledRequest(r, t, c, list(range(1 + 4 * i, 5 + 4 * i)), True) for i, (r, t, c) in enumerate(rows)
        ])).meta.num_decodes

    assert num_decodes([("a", [5, 6, 7], 0), ("b", [8], 0)]) == 0  # a chunk first: none leading
    assert num_decodes([("c", [9], 4), ("d", [3], 2), ("e", [1, 2, 3, 4], 0), ("f", [5], 7)]) == 2
    assert num_decodes([("g", [9], 4), ("h", [3], 2)]) == 0  # decodes only: the decode kernel anyway


# ---- CUDA -----------------------------------------------------------------------------------------------------------


@gpu
@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_mixed_step_equals_the_torch_reference(monkeypatch, calls, dtype):
    check_mixed(monkeypatch, calls, "cuda", dtype)


@gpu
@pytest.mark.timeout(60)
@pytest.mark.parametrize("fp8", FP8, ids=["e4m3", "e5m2"])
def test_gpu_mixed_step_over_an_fp8_cache(monkeypatch, calls, fp8):
    check_mixed(monkeypatch, calls, "cuda", torch.bfloat16, fp8, dict(atol=3e-2, rtol=3e-2))


@gpu
@pytest.mark.timeout(90)
def test_gpu_prefill_kernel_compiles_once_for_block_tables_and_seq_lens_at_any_alignment(monkeypatch, calls):
    """A mixed step passes seq_lens[nd:] and block_tables[nd:] (4-byte steps): one compiled kernel serves every nd,
    where Triton's pointer specialization compiled a variant per 16-byte alignment in the middle of a run."""
    knobs = pytest.importorskip("triton").knobs
    q_lens, seq_lens = MIXED
    q, k_cache, v_cache, meta = make_case(q_lens, seq_lens, 2, 3, 32, torch.bfloat16, "cuda", seed=5)
    misses = []
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", lambda *, repr, **_: misses.append(repr) and False)
    outs = {}
    for nd in range(4):  # the first nd sequences left out, as the split leaves out its decodes
        qsl = meta.query_start_loc[nd:] - meta.query_start_loc[nd]
        rows = int(meta.query_start_loc[nd])
        outs[nd] = triton_paged.paged_prefill_attention(
            q[rows:], k_cache, v_cache, qsl, meta.seq_lens[nd:], meta.block_tables[nd:], meta.max_query_len,
            32**-0.5)
    assert len([m for m in misses if m.startswith("_prefill_kernel")]) <= 1  # the first call's, if not yet built
    for nd in range(1, 4):  # and each gives the rows of the whole step's call
        torch.testing.assert_close(outs[nd], outs[0][int(meta.query_start_loc[nd]):], atol=2e-2, rtol=2e-2)
