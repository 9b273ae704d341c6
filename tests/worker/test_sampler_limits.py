"""Sampling at the edges of its ranges: the most likely token always survives, logit_bias moves logits as
OpenAI's does, and values that round to nothing in float32 do not turn into infinities."""

from __future__ import annotations

import pytest
import torch

from shardllm.worker.sampler import Sampler, SamplingBatch, apply_top_k_top_p

V = 8


def _random_batch(b: int, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, seed: int = 0) -> SamplingBatch:
    gens = {}
    for row in range(b):
        g = torch.Generator()
        g.manual_seed(seed + row)
        gens[row] = g
    return SamplingBatch(all_greedy=False, temperature=torch.full((b,), 1.0), top_p=torch.full((b,), top_p),
                         top_k=torch.full((b,), top_k, dtype=torch.long), min_p=torch.full((b,), min_p),
                         any_top_k_top_p=top_p < 1.0 or top_k > 0, any_min_p=min_p > 0, generators=gens)


@pytest.mark.parametrize("top_p,top_k,min_p", [(1e-46, 0, 0.0), (1e-30, 0, 0.0), (float(torch.finfo().tiny), 0, 0.0),
                                               (1.0, 1, 0.0), (1e-46, 1, 0.0), (1.0, 0, 1.0), (1e-46, 0, 1.0)])
def test_the_most_likely_token_always_survives(top_p, top_k, min_p):
    torch.manual_seed(0)
    logits = torch.randn(64, V) * 3  # (B, V)
    out = Sampler()(logits, _random_batch(64, top_p, top_k, min_p))
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()


def test_top_p_that_rounds_to_zero_keeps_exactly_the_top_token():
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0]])
    kept = apply_top_k_top_p(logits, torch.tensor([0]), torch.tensor([1e-46]))  # float32: top_p == 0
    assert torch.isfinite(kept).tolist() == [[False, True, False, False]]


def test_repetition_penalty_that_underflows_keeps_the_order_of_seen_tokens():
    # token 0 (a special token in the prompt) and token 3 were seen; 3 is the more likely of the two
    logits = torch.tensor([[5.0, 1.0, 0.5, 8.0, -1.0, 0.0, 0.0, 0.0]])
    batch = SamplingBatch(all_greedy=True, presence=torch.zeros(1), frequency=torch.zeros(1),
                          repetition=torch.tensor([1e-46]),  # 0.0 in float32
                          prompt_token_ids=[[0, 3]], output_token_ids=[[]])
    out = Sampler()(logits, batch)
    assert out.token_ids.tolist() == [3]


@pytest.mark.parametrize("greedy", [True, False])
def test_logit_bias_forces_and_bans_tokens(greedy):
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0]] * 3)
    # row 0: +100 on token 6 wins; row 1: -100 on the top token leaves token 3; row 2 has no bias
    rows, ids, bias = torch.tensor([0, 1]), torch.tensor([6, 1]), torch.tensor([100.0, -100.0])
    batch = _random_batch(3, top_k=1) if not greedy else SamplingBatch(all_greedy=True)
    batch.logit_bias = (rows, ids, bias)
    out = Sampler()(logits, batch)
    assert out.token_ids.tolist() == [6, 3, 1]


def test_logits_processor_runs_per_row_and_leaves_the_callers_logits_alone():
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0]] * 2)
    before = logits.clone()
    seen = []

    def only_token_7(output_ids, row_logits):
        seen.append(list(output_ids))
        out = torch.full_like(row_logits, float("-inf"))
        out[7] = 0.0
        return out

    batch = SamplingBatch(all_greedy=True, logits_processors={1: ([only_token_7], [4, 5])})
    assert Sampler()(logits, batch).token_ids.tolist() == [1, 7]
    assert seen == [[4, 5]] and torch.equal(logits, before)


@pytest.mark.gpu
@pytest.mark.timeout(60)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_edges_on_the_gpu():
    """The same edges on CUDA: tiny top_p and an underflowing repetition penalty keep the top token; logit_bias."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    logits = (torch.randn(64, 1000) * 3).to(dev)
    batch = _random_batch(64, top_p=1e-46)
    for name in ("temperature", "top_p", "top_k", "min_p"):
        setattr(batch, name, getattr(batch, name).to(dev))
    batch.generators = {}
    assert Sampler()(logits, batch).token_ids.tolist() == logits.argmax(-1).tolist()
    seen = SamplingBatch(all_greedy=True, presence=torch.zeros(1, device=dev), frequency=torch.zeros(1, device=dev),
                         repetition=torch.tensor([1e-46], device=dev), prompt_token_ids=[[0, 3]],
                         output_token_ids=[[]])
    row = torch.tensor([[5.0, 1.0, 0.5, 8.0] + [0.0] * 996], device=dev)
    assert Sampler()(row, seen).token_ids.tolist() == [3]
    biased = SamplingBatch(all_greedy=True, logit_bias=(torch.tensor([0], device=dev), torch.tensor([999], device=dev),
                                                        torch.tensor([100.0], device=dev)))
    assert Sampler()(row, biased).token_ids.tolist() == [999]


def test_plain_greedy_takes_the_arg_max_of_the_logits_as_they_are(monkeypatch):
    """All greedy with nothing else asked: no fp32 copy of the (B, V) logits (argmax over bf16 orders as over its exact
    fp32 widening, first index on ties); greedy with logprobs still gets them, from the fp32 path."""
    torch.manual_seed(1)
    logits = (torch.randn(16, 300) * 4).to(torch.bfloat16)
    logits[3, [7, 250]] = 50.0  # a tie: the first index wins
    want = logits.float().argmax(-1)
    widened = []
    real_float = torch.Tensor.float
    monkeypatch.setattr(torch.Tensor, "float", lambda self: widened.append(self.shape) or real_float(self))
    out = Sampler()(logits, SamplingBatch(all_greedy=True))
    assert torch.equal(out.token_ids, want) and int(out.token_ids[3]) == 7
    assert widened == [] and out.logprobs is None
    out = Sampler()(logits, SamplingBatch(all_greedy=True, max_num_logprobs=2), [2] * 16)
    assert torch.equal(out.token_ids, want) and widened == [(16, 300)] and len(out.logprobs) == 16
