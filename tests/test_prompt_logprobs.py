"""SamplingParams(prompt_logprobs=k) against Hugging Face transformers' log_softmax on the same tiny checkpoint:
through chunked prefill, past a prefix-cache hit (skipped for such requests), with n > 1 and preemption."""

from __future__ import annotations

import pytest
import torch

from shardllm import LLM, SamplingParams

PROMPTS = [[(7 * i) % 300 + 3 for i in range(37)], [250, 14, 88, 19, 201, 6, 6, 6, 42, 71, 300, 12, 9], [7, 3], [99]]
K = 3


@pytest.fixture(scope="module")
def path(tiny_checkpoints):
    return tiny_checkpoints["llama"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more intra-op threads only contend on a small CI machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hf_logprobs(path) -> list[torch.Tensor]:
    """Per prompt, (T - 1, V): log_softmax of the logits at positions 0..T-2 (those predict tokens 1..T-1)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return [torch.log_softmax(model(torch.tensor([p])).logits[0, :-1].float(), dim=-1) for p in PROMPTS]


def check_against_hf(prompt_logprobs, prompt: list[int], ref: torch.Tensor, k: int = K, atol: float = 1e-4) -> None:
    assert len(prompt_logprobs) == len(prompt) and prompt_logprobs[0] is None
    for pos in range(1, len(prompt)):
        entry, row = prompt_logprobs[pos], ref[pos - 1]
        token = prompt[pos]
        assert entry[token].logprob == pytest.approx(row[token].item(), abs=atol), pos
        top_vals, top_ids = row.topk(k)
        for t, v in zip(top_ids.tolist(), top_vals.tolist()):
            assert entry[t].logprob == pytest.approx(v, abs=atol), (pos, t)
        assert set(entry) <= {*top_ids.tolist(), token}


def test_prompt_logprobs_equal_hf_through_chunked_prefill_and_prefix_cache(path, hf_logprobs):
    llm = LLM(path, device="cpu", num_kv_blocks=200, block_size=4, max_num_tokens=8)  # prompts span chunks
    warm = llm.generate(PROMPTS, SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)  # fills the cache
    assert all(o.prompt_logprobs is None for o in warm)
    params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=K)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    for out, prompt, ref in zip(outs, PROMPTS, hf_logprobs):
        check_against_hf(out.prompt_logprobs, prompt, ref)
        assert out.num_cached_tokens == 0  # the cache was skipped: its hits hold no logits
        assert out.outputs[0].token_ids == [o for o in warm if o.prompt_token_ids == prompt][0].outputs[0].token_ids
    # without prompt_logprobs the same prompt still hits the cache
    again = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)[0]
    assert again.num_cached_tokens > 0


def test_prompt_logprobs_with_n_and_preemption(path, hf_logprobs):
    # 15 usable blocks of 4 tokens; three samples of 37 + 16 tokens need 14 each (9 shared): some are preempted
    llm = LLM(path, device="cpu", num_kv_blocks=16, block_size=4, max_seq_len=56)
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=3, n=3, prompt_logprobs=0, ignore_eos=True)
    out = llm.generate([PROMPTS[0]], params, use_tqdm=False)[0]
    assert llm.engine.stats.preemptions > 0
    assert len(out.outputs) == 3
    check_against_hf(out.prompt_logprobs, PROMPTS[0], hf_logprobs[0], k=0)
    assert all(len(e) == 1 for e in out.prompt_logprobs[1:])  # k = 0: the prompt token alone


def test_prompt_logprobs_validation():
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)


@pytest.mark.gpu
@pytest.mark.timeout(90)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prompt_logprobs_on_gpu_equal_hf(path, hf_logprobs):
    """The CUDA path (Triton varlen prefill over chunks, CUDA graphs for decode) in fp32."""
    llm = LLM(path, device="cuda", dtype="float32", max_seq_len=256, max_batch_size=8, max_num_tokens=16,
              num_kv_blocks=256)  # sized from free memory: ~15M blocks of this tiny model, slow to build
    try:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=1), use_tqdm=False)
        for out, prompt, ref in zip(outs, PROMPTS, hf_logprobs):
            check_against_hf(out.prompt_logprobs, prompt, ref, k=1, atol=2e-3)
    finally:
        llm.shutdown()
