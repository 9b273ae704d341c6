"""The embedded default model (SmolLM2-135M-Instruct) at dtype="fp8" on CPU: still answers "Paris", its greedy
chat answers are fp32's top tokens at most positions, and its perplexity on the fixed text stays close to fp32's;
with an e4m3 KV cache too (scales computed on the first step), it follows the unquantized cache's answers."""

from __future__ import annotations

import os
import sys

import pytest

from shardllm import LLM, SamplingParams
from tests.test_default_model import CHATS

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from accuracy import compare, reference_text, score  # noqa: E402

SCORED_TOKENS = 384  # the first tokens of the text (benchmarks/accuracy.py scores all ~2,230)


@pytest.fixture(scope="module")
def llms():
    pair = {dt: LLM(device="cpu", dtype=dt, max_seq_len=1024) for dt in ("float32", "fp8")}
    yield pair
    for llm in pair.values():
        llm.shutdown()


def test_fp8_layers_hold_fp8_weights(llms):
    model = llms["fp8"].engine.executor.worker.model_runner.model
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert str(qkv.weight.dtype) == "torch.float8_e4m3fn" and qkv.weight_scale.dtype.is_floating_point
    assert model.lm_head.weight.dtype == model.model.embed_tokens.weight.dtype  # the LM head is never quantized


def test_fp8_still_answers_paris(llms):
    out = llms["fp8"].chat(CHATS[0], SamplingParams(max_tokens=32, temperature=0), use_tqdm=False)[0].outputs[0]
    assert "Paris" in out.text and out.finish_reason == "stop"


def test_fp8_greedy_chat_follows_fp32_token_by_token(llms):
    """fp32's greedy answers to several chats, fed to the fp8 model (teacher forcing): fp8's top token equals
    fp32's at most positions. (Free-running greedy texts part at the first near-tie and never meet again, so
    their common prefix measures luck more than accuracy.)"""
    sp = SamplingParams(max_tokens=24, temperature=0)
    ref = llms["float32"].chat(CHATS, sp, use_tqdm=False)
    seqs = [o.prompt_token_ids + o.outputs[0].token_ids for o in ref]
    outs = llms["fp8"].generate(seqs, SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    same = total = 0
    for o, seq, r in zip(outs, seqs, ref):
        start = len(r.prompt_token_ids)
        for pos in range(start, len(seq)):
            d = o.prompt_logprobs[pos]
            same += max(d, key=lambda t: d[t].logprob) == seq[pos]
            total += 1
    assert same / total >= 0.8  # 0.93 measured (67 of 72 positions)


def test_fp8_perplexity_close_to_fp32(llms):
    """Also the benchmark's lower-noise measures: KL from fp32's next-token distributions and top-1 agreement (the
    captured distributions are checked against the engine's own prompt logprobs inside `score`)."""
    ids = llms["fp8"].get_tokenizer().encode(reference_text(), add_special_tokens=False)[:SCORED_TOKENS]
    ref, fp8 = (score(llms[dt], ids, SCORED_TOKENS, True) for dt in ("float32", "fp8"))
    c = compare(ref, fp8)
    # whole text (benchmarks/accuracy.py --device cpu --dtypes float32 fp8 --kl --weight_redraws 8): 1.032, KL 0.057;
    # 8 re-drawn weight roundings of equal error: 1.015-1.060 (mean 1.033, sd 0.014), KL 0.049-0.056: the issue's
    # 1.03 is met by some roundings, not on average
    assert 0.97 <= c["ppl_vs_first"] <= 1.05, c  # 1.0002 on these 384 tokens
    assert 0.0 < c["kl_vs_first"] < 0.15 and c["top1_vs_first"] >= 0.8, c  # KL 0.063, top-1 0.90 measured
    assert compare(ref, ref)["kl_vs_first"] == 0.0


@pytest.fixture(scope="module")
def fp8_kv_llm():
    llm = LLM(device="cpu", dtype="fp8", kv_cache_dtype="fp8_e4m3", max_seq_len=1024)
    yield llm
    llm.shutdown()


def test_e4m3_cache_follows_the_unquantized_cache_and_says_paris(llms, fp8_kv_llm):
    """fp8 weights: greedy chat answers with the fp32 cache, fed to the same weights over an e4m3 cache (teacher
    forcing): the e4m3 model's top token is the reference's at most positions, and " Paris" where it says Paris.

    Not asserted: that its own free-running greedy answer to the France chat starts like the reference. In fp32 that
    chat's first answer token is a near-tie ("The" -1.88 vs "L" -1.97 nats); FP8 rounding noise moves that margin by
    +-0.5 nats, so which of the two wins is a coin toss (measured: docs/benchmarks.md, "CPU: FP8 accuracy")."""
    sp = SamplingParams(max_tokens=24, temperature=0)
    ref = llms["fp8"].chat(CHATS, sp, use_tqdm=False)
    seqs = [o.prompt_token_ids + o.outputs[0].token_ids for o in ref]
    outs = fp8_kv_llm.generate(seqs, SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    paris = fp8_kv_llm.get_tokenizer().encode(" Paris", add_special_tokens=False)
    assert "Paris" in ref[0].outputs[0].text and len(paris) == 1
    same = total = 0
    for i, (o, seq, r) in enumerate(zip(outs, seqs, ref)):
        for pos in range(len(r.prompt_token_ids), len(seq)):
            d = o.prompt_logprobs[pos]
            top = max(d, key=lambda t: d[t].logprob)
            same += top == seq[pos]
            total += 1
            if i == 0 and seq[pos] == paris[0]:
                assert top == paris[0]
    assert same / total >= 0.75  # 0.83 measured; 0.83-0.93 over 6 re-draws of the FP8 rounding (benchmarks.md)
    runner = fp8_kv_llm.engine.executor.worker.model_runner
    assert str(runner.kv_caches[0].dtype) == "torch.float8_e4m3fn"
    assert all(float(a.k_scale) != 1.0 for a in runner.attn_layers)  # computed on the first step
