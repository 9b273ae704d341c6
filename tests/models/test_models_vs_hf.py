"""Our forward against Hugging Face transformers on the same tiny random checkpoints (fp32, CPU)."""

import pytest
import torch
import transformers

from shardllm import LLM, SamplingParams
from tests.helpers import chunked_logits

ARCHS = ["llama", "llama_tied", "mistral", "qwen2", "qwen3"]
PROMPTS = [[1, 17, 33, 5, 9, 101, 7], [3, 4], [250, 14, 88, 19, 201, 6, 6, 6, 42, 71, 300, 12, 9]]


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers_prefill_chunked_and_decode(tiny_checkpoints, arch):
    path = tiny_checkpoints[arch]
    llm = LLM(path, device="cpu", num_kv_blocks=100, block_size=4)
    runner = llm.engine.executor.worker.model_runner
    hf = hf_model(path)
    with torch.no_grad():
        ref = [hf(torch.tensor([p])).logits[0] for p in PROMPTS]
    for chunk in (64, 3, 1):  # whole prompt, chunked prefill across block edges, token by token
        ours = chunked_logits(runner, PROMPTS, chunk)
        for o, r in zip(ours, ref):
            torch.testing.assert_close(o, r, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_equal_transformers_for_a_ragged_batch(tiny_checkpoints, arch):
    path = tiny_checkpoints[arch]
    llm = LLM(path, device="cpu", num_kv_blocks=100, block_size=4)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)
    hf = hf_model(path)
    for p, o in zip(PROMPTS, outs):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(p):].tolist()
        assert o.outputs[0].token_ids == ref
        assert o.outputs[0].finish_reason == "length"
