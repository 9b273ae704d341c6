"""Stop strings and min_tokens in the engine: streamed text only grows and ends as the final text, for random
stop strings (in the output, longer than it, never matching); no stop condition ends a sequence before
min_tokens. A tiny random model with the default model's tokenizer (random text, split characters included)."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from shardllm import LLM, SamplingParams
from shardllm.engine.async_llm import AsyncLLM
from shardllm.engine.detokenizer import find_stop_string, num_held_back
from shardllm.engine.request import Request
from shardllm.model_loader.default_model import default_model_path
from tests.helpers import write_text_checkpoint

VOCAB = 49152  # the default model's tokenizer


ENGINE_ARGS = dict(device="cpu", num_kv_blocks=128, max_seq_len=256)


@pytest.fixture(scope="module")
def path(tmp_path_factory) -> str:
    return write_text_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "llama"), VOCAB)


@pytest.fixture(scope="module")
def llm(path) -> LLM:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matmuls of a 64-wide model: more threads only contend on a small CI machine
    llm = LLM(path, tokenizer=default_model_path(), **ENGINE_ARGS)
    yield llm
    llm.shutdown()
    torch.set_num_threads(threads)


def test_num_held_back():
    assert num_held_back("abc DEF", ["DEFGH"]) == 3
    assert num_held_back("abc DEF", ["XYZ"]) == 0
    assert num_held_back("abc D", ["DEFGH", " DX"]) == 2  # the longest tail that starts a stop string
    assert num_held_back("ab", ["abcdef"]) == 2  # shorter than the stop string: all of it
    assert num_held_back("abcDEFGH", ["DEFGH"]) == 0  # a whole stop string is no prefix: the engine cut it
    assert num_held_back("", ["x"]) == 0


def test_num_held_back_equals_its_definition():
    """Random texts and stop strings over a small alphabet (many partial matches): the longest tail of the text
    that is a proper prefix of a stop string, as the definition's brute force finds it."""
    def definition(text, stops):
        return max([n for s in stops for n in range(1, min(len(s) - 1, len(text)) + 1) if text.endswith(s[:n])],
                   default=0)

    rng = random.Random(0)
    for _ in range(20000):
        text = "".join(rng.choice("ab") for _ in range(rng.randint(0, 12)))
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 8))) for _ in range(rng.randint(1, 3))]
        assert num_held_back(text, stops) == definition(text, stops), (text, stops)


@pytest.mark.parametrize("stops, new_chars, text, stop", [
    (["BC", "AB"], 3, "xyz", "AB"),  # both in one step's new text "ABC": the one that ends first
    (["ABC", "B"], 3, "xyzA", "B"),
    (["C", "ABC"], 3, "xyz", "ABC"),  # the same end: the longer (it started first)
    (["A"], 2, "xyzABC", None),  # an "A" that ended before this step's text ("BC") is not looked for again
])
def test_find_stop_string_takes_the_first_to_end(stops, new_chars, text, stop):
    req = Request("r", [1, 2], SamplingParams(stop=stops))
    req.append_token(3)
    req.output_text = "xyzABC"
    assert find_stop_string(req, new_chars) == stop
    assert req.output_text == text


def stop_candidates(text: str, rng: random.Random) -> list[list[str]]:
    """Stop strings from the text (random substrings, alone and in pairs), longer than it, never matching."""
    cands = [[text + "!"], ["\x00never\x00"], [text], [text[-1:]]] if text else [["x"]]
    subs = []
    for _ in range(8):
        if len(text) < 2:
            break
        i = rng.randrange(len(text) - 1)
        subs.append(text[i:i + rng.randint(1, 6)])
    cands += [[s] for s in subs] + [[a, b] for a, b in zip(subs[::2], subs[1::2])]
    return cands


def expected(text: str, stops: list[str]) -> tuple[str, str]:
    """The text cut before the stop string that ends first (the longer at a tie), and the finish reason."""
    found = [(i + len(s), i) for s in stops if (i := text.find(s)) >= 0]
    return (text[:min(found)[1]], "stop") if found else (text, "length")


def run_engine(llm: LLM, prompt: list[int], params: list[SamplingParams]) -> list[list]:
    """Run requests together; per request, every output the engine gave (the stream)."""
    eng = llm.engine
    ids = [eng.add_request(None, prompt, p) for p in params]
    outs = {rid: [] for rid in ids}
    while eng.has_unfinished_requests():
        for o in eng.step():
            outs[o.request_id].append(o)
    return [outs[rid] for rid in ids]


def assert_append_only(texts: list[str], final: str) -> None:
    for a, b in zip(texts, texts[1:]):
        assert b.startswith(a), (a, b)
    assert texts[-1] == final


def test_stream_is_append_only_and_equals_the_final_text(llm):
    rng = random.Random(0)
    for _ in range(3):
        prompt = [rng.randrange(20, VOCAB) for _ in range(5)]
        base = dict(temperature=0, max_tokens=16, ignore_eos=True)
        ref = llm.generate([prompt], SamplingParams(**base), use_tqdm=False)[0].outputs[0]
        assert len(ref.token_ids) == 16
        stops = stop_candidates(ref.text, rng)
        for stop, outs in zip(stops, run_engine(llm, prompt, [SamplingParams(**base, stop=s) for s in stops])):
            final = outs[-1].outputs[0]
            assert (final.text, final.finish_reason) == expected(ref.text, stop), stop
            assert_append_only([o.outputs[0].text for o in outs], final.text)
            if final.finish_reason == "stop":
                assert final.stop_reason in stop


def test_async_llm_stream_is_append_only(llm, path):
    """The same through AsyncLLM (the server's front end), several requests at once."""
    rng = random.Random(1)
    prompt = [rng.randrange(20, VOCAB) for _ in range(5)]
    base = dict(temperature=0, max_tokens=16, ignore_eos=True)
    ref = llm.generate([prompt], SamplingParams(**base), use_tqdm=False)[0].outputs[0]
    stops = stop_candidates(ref.text, rng)
    alloc = AsyncLLM.from_kwargs(model=path, tokenizer=default_model_path(), **ENGINE_ARGS)

    async def one(i: int, stop: list[str]) -> list[str]:
        return [o.outputs[0].text async for o in alloc.generate(prompt, SamplingParams(**base, stop=stop), f"r{i}")]

    async def main():
        return await asyncio.gather(*(one(i, s) for i, s in enumerate(stops)))

    try:
        results = asyncio.run(main())
    finally:
        alloc.shutdown()
    for stop, texts in zip(stops, results):
        assert_append_only(texts, expected(ref.text, stop)[0])


def test_min_tokens_holds_back_every_stop_condition(llm):
    rng = random.Random(2)
    prompt = [rng.randrange(20, VOCAB) for _ in range(5)]
    base = dict(temperature=0, max_tokens=12, ignore_eos=True)
    ref = llm.generate([prompt], SamplingParams(**base), use_tqdm=False)[0].outputs[0]
    first_char = ref.text[:1]
    # a stop string in the first token's text: without min_tokens it ends at once
    early = llm.generate([prompt], SamplingParams(**base, stop=[first_char]), use_tqdm=False)[0].outputs[0]
    assert early.finish_reason == "stop" and len(early.token_ids) == 1 and early.text == ""
    held = llm.generate([prompt], SamplingParams(**base, stop=[first_char], min_tokens=6), use_tqdm=False)
    out = held[0].outputs[0]
    assert len(out.token_ids) >= 6 and out.text.startswith(first_char)
    assert out.token_ids[:6] == ref.token_ids[:6]  # stop strings never change which tokens are sampled
    # stop_token_ids and EOS: banned before min_tokens, allowed after
    stop_ids = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[ref.token_ids[0]], min_tokens=4)
    out = llm.generate([prompt], stop_ids, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= 4 and ref.token_ids[0] not in out.token_ids[:4]
    eos = llm.engine.eos_token_ids[0]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, min_tokens=8,
                                                stop_token_ids=[], ignore_eos=False), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 8 and eos not in out.token_ids
