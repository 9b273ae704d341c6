"""The offline LLM after a failed or interrupted step serves the next call with the tokens a fresh engine gives
(a request left behind once broke every later call); prompt dicts, chat message shapes and engine settings of the
wrong type get errors naming the fix; a shut-down LLM says so."""

from __future__ import annotations

import pytest

from shardllm import LLM, SamplingParams
from shardllm.model_loader.default_model import default_model_path
from tests.helpers import write_text_checkpoint

ARGS = dict(device="cpu", num_kv_blocks=64, max_seq_len=128)
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]


@pytest.fixture(scope="module")
def path(tmp_path_factory) -> str:
    return write_text_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "llama"))


@pytest.fixture(scope="module")
def llm(path):
    llm = LLM(path, tokenizer=default_model_path(), **ARGS)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def llm_sync(path):
    llm = LLM(path, tokenizer=default_model_path(), async_scheduling=False, **ARGS)
    yield llm
    llm.shutdown()


def _tokens(outs) -> list:
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.timeout(120)  # without the recovery the next call hangs
@pytest.mark.parametrize("error", [RuntimeError("a worker failed"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
@pytest.mark.parametrize("after", [0, 2], ids=["first-step", "third-step"])
@pytest.mark.parametrize("engine", ["llm", "llm_sync"], ids=["async-scheduling", "synchronous"])
def test_a_failed_step_leaves_the_engine_serving(request, monkeypatch, error, after, engine):
    """The failure comes before the real collect, so the worker's result is still owed (as when Ctrl-C lands while
    a multi-rank driver waits on its socket): the recovery collects it."""
    llm = request.getfixturevalue(engine)
    ref = _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    collect, calls = llm.engine.executor.collect, []

    def failing():
        calls.append(1)
        if len(calls) == after + 1:
            raise error
        return collect()

    monkeypatch.setattr(llm.engine.executor, "collect", failing)
    with pytest.raises(type(error)):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    monkeypatch.setattr(llm.engine.executor, "collect", collect)
    assert not llm.engine.has_unfinished_requests()
    assert not llm.engine.executor._pending  # every result the worker owed was collected (none left one behind)
    assert _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == ref
    assert _tokens(llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)) == ref[:1]


def test_prompt_dicts_as_vllm_takes_them(llm):
    ref = _tokens(llm.generate(["hello there", PROMPTS[0]], GREEDY, use_tqdm=False))
    outs = llm.generate([{"prompt": "hello there"}, {"prompt_token_ids": PROMPTS[0]}], GREEDY, use_tqdm=False)
    assert _tokens(outs) == ref
    assert _tokens(llm.generate({"prompt": "hello there"}, GREEDY, use_tqdm=False)) == ref[:1]
    both = {"prompt": "ignored", "prompt_token_ids": PROMPTS[0]}  # the ids win, as in vLLM
    assert _tokens(llm.generate(both, GREEDY, use_tqdm=False)) == ref[1:]
    with pytest.raises(TypeError, match="'prompt' .* or 'prompt_token_ids'"):
        llm.generate({"text": "hi"}, GREEDY)


@pytest.mark.parametrize("params, match", [(5, "SamplingParams or a list"),
                                           ({"max_tokens": 3}, "SamplingParams\\(\\*\\*d\\)"),
                                           ([GREEDY, "x"], "SamplingParams or a list")])
def test_sampling_params_of_the_wrong_type(llm, params, match):
    with pytest.raises(TypeError, match=match):
        llm.generate(["a", "b"] if isinstance(params, list) else "a", params)


def test_chat_message_shapes(llm):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]
    as_text = [{"role": "user", "content": "Hi\nthere"}]  # parts joined by newlines, as vLLM joins them
    assert _tokens(llm.chat(parts, GREEDY, use_tqdm=False)) == _tokens(llm.chat(as_text, GREEDY, use_tqdm=False))
    llm.chat([{"role": "system"}, {"role": "user", "content": None}], GREEDY, use_tqdm=False)  # content: ""
    for bad, exc, match in [(None, TypeError, "non-empty list"), ({"role": "user", "content": "hi"}, TypeError,
                                                                   "wrap the message in a list"),
                            ([{"role": "user", "content": 5}], TypeError, "string or a list of text parts"),
                            ([{"role": "user", "content": [{"type": "image_url"}]}], TypeError, "text"),
                            ([{"role": "wizard", "content": "x"}], ValueError, "'role' is one of")]:
        with pytest.raises(exc, match=match):
            llm.chat(bad, GREEDY)
    with pytest.raises(ValueError, match="chat template failed"):
        llm.chat(as_text, GREEDY, chat_template="{% if %}")
    with pytest.raises(TypeError, match="chat_template must be"):
        llm.chat(as_text, GREEDY, chat_template=5)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(seed="abc"), ValueError, "seed must be an integer"),
    (dict(seed=1.5), ValueError, "seed must be an integer"),
    (dict(seed=2**70), ValueError, "seed must be an integer"),
    (dict(cpu_kv_cache_gb=0), ValueError, "cpu_kv_cache_gb must be > 0"),
    (dict(kv_cache_free_gpu_memory_fraction="0.5"), ValueError, "kv_cache_free_gpu_memory_fraction must be a"),
    (dict(cpu_kv_cache_gb=float("inf")), ValueError, "cpu_kv_cache_gb must be a finite"),
    (dict(cpu_kv_cache_gb="1"), ValueError, "cpu_kv_cache_gb must be a finite"),
    (dict(num_kv_blocks=-1), ValueError, "num_kv_blocks must be an integer >= 1"),
    (dict(num_kv_blocks=1.5), ValueError, "num_kv_blocks must be an integer >= 1"),
    (dict(tokenizer=5), TypeError, "tokenizer must be a path"),
    (dict(enable_prefix_caching="no"), TypeError, "enable_prefix_caching must be True or False"),
    (dict(enforce_eager=0), TypeError, "enforce_eager must be True or False"),
    (dict(async_scheduling="no"), TypeError, "async_scheduling must be True or False"),
    (dict(pp_partition="1,1", pipeline_parallel_size=2), TypeError, "pp_partition must be a list"),
])
def test_engine_settings_of_the_wrong_type(path, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        LLM(path, **{**ARGS, "num_kv_blocks": kwargs.pop("num_kv_blocks", 64), **kwargs})


def test_numpy_settings_are_numbers(path):
    import numpy as np

    llm = LLM(path, **{**ARGS, "seed": np.int64(3), "kv_cache_free_gpu_memory_fraction": np.float32(0.5),
                       "enforce_eager": np.False_})
    llm.shutdown()


def test_a_shut_down_llm_says_so(path):
    llm = LLM(path, **ARGS)
    llm.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate(PROMPTS[:1], GREEDY)
