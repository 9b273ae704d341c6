"""AsyncLLM in-process on a tiny random checkpoint: streaming, cancellation frees blocks at once, bad input
fails one request only, an engine exception fails every request and marks the engine unhealthy."""

from __future__ import annotations

import asyncio
import time

import pytest

from shardllm.engine.async_llm import AsyncLLM, EngineDeadError, RequestAbortedError
from shardllm.sampling_params import SamplingParams
from tests.conftest import write_tiny_checkpoint

TIMEOUT = 60


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "llama"), "llama")


def make_llm(checkpoint: str) -> AsyncLLM:
    return AsyncLLM.from_kwargs(model=checkpoint, device="cpu", num_kv_blocks=64, max_seq_len=256)


@pytest.fixture(scope="module")
def llm(checkpoint):
    llm = make_llm(checkpoint)
    yield llm
    llm.shutdown()


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


async def collect(llm: AsyncLLM, prompt: list[int], params: SamplingParams, rid: str) -> list:
    return [out async for out in llm.generate(prompt, params, rid)]


def wait_until(predicate, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_generate_streams_to_a_finished_output(llm):
    outs = asyncio.run(asyncio.wait_for(collect(llm, [5, 6, 7], greedy(12), "a"), TIMEOUT))
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    assert len(outs[-1].outputs[0].token_ids) == 12 and outs[-1].outputs[0].finish_reason == "length"
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    assert lengths == sorted(lengths)
    assert wait_until(lambda: llm.latency.e2e_request_latency.snapshot()[2] >= 1)


def test_a_lagging_reader_costs_no_outputs_and_loses_no_text(llm, monkeypatch):
    """The engine builds no output for a request whose reader has not taken the last one (each carries the whole
    text so far): a reader that pauses gets the same tokens and text, and the engine built a few outputs for it,
    not one a step; a reader that keeps up gets about one a step."""
    built: dict[str, int] = {}
    make_output = llm.engine._make_output

    def counting(parent_id):
        built[parent_id] = built.get(parent_id, 0) + 1
        return make_output(parent_id)

    monkeypatch.setattr(llm.engine, "_make_output", counting)

    async def read(rid: str, pause: float) -> list:
        outs = []
        async for out in llm.generate([5, 6, 7], greedy(24), rid):
            outs.append(out)
            if len(outs) == 1:
                await asyncio.sleep(pause)  # the loop runs on: the engine's outputs reach the queue unread
        return outs

    fast = asyncio.run(asyncio.wait_for(read("keeps-up", 0.0), TIMEOUT))
    slow = asyncio.run(asyncio.wait_for(read("pauses", 1.0), TIMEOUT))
    assert slow[-1].outputs[0].token_ids == fast[-1].outputs[0].token_ids and len(fast[-1].outputs[0].token_ids) == 24
    assert slow[-1].outputs[0].text == fast[-1].outputs[0].text and slow[-1].finished
    assert len(fast) >= 12 and built["keeps-up"] >= len(fast)  # one a step, but for a step the reader fell behind
    assert built["pauses"] <= 6, built


def test_concurrent_requests_match_one_at_a_time(llm):
    prompts = [[10 + i, 20 + i, 30 + i] for i in range(6)]
    alone = [asyncio.run(collect(llm, p, greedy(8), f"alone-{i}"))[-1] for i, p in enumerate(prompts)]

    async def together():
        return await asyncio.gather(*(collect(llm, p, greedy(8), f"together-{i}") for i, p in enumerate(prompts)))

    batched = [outs[-1] for outs in asyncio.run(asyncio.wait_for(together(), TIMEOUT))]
    assert [o.outputs[0].token_ids for o in batched] == [o.outputs[0].token_ids for o in alone]


def test_cancel_aborts_and_frees_blocks(llm):
    aborted_before = llm.snapshot.finished.get("abort", 0)

    async def cancel_after_two():
        seen = []

        async def consume():
            async for out in llm.generate([1, 2, 3], greedy(200), "long"):
                seen.append(out)

        task = asyncio.ensure_future(consume())
        while len(seen) < 2:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return len(seen)

    assert asyncio.run(asyncio.wait_for(cancel_after_two(), TIMEOUT)) < 200
    assert wait_until(lambda: llm.snapshot.finished.get("abort", 0) == aborted_before + 1)
    s = llm.snapshot
    assert s.num_requests_running == 0 and s.num_requests_waiting == 0 and s.kv_cache_usage == 0


def test_bad_input_fails_only_that_request(llm):
    async def run():
        bad = collect(llm, [1, 10**6], greedy(4), "bad")
        good = collect(llm, [1, 2], greedy(4), "good")
        return await asyncio.gather(bad, good, return_exceptions=True)

    bad, good = asyncio.run(asyncio.wait_for(run(), TIMEOUT))
    assert isinstance(bad, ValueError) and "vocabulary" in str(bad)
    assert good[-1].finished and llm.is_healthy


def test_duplicate_request_id_is_refused(llm):
    async def run():
        gen = llm.generate([1, 2], greedy(50), "dup")
        first = await gen.__anext__()
        with pytest.raises(ValueError, match="already in use"):
            await llm.generate([1, 2], greedy(2), "dup").__anext__()
        await gen.aclose()
        return first

    assert not asyncio.run(asyncio.wait_for(run(), TIMEOUT)).finished


def test_abort_wakes_a_waiting_consumer(llm):
    async def run():
        gen = llm.generate([3, 4], greedy(200), "to-abort")
        await gen.__anext__()
        llm.abort("to-abort", "stop it")
        with pytest.raises(RequestAbortedError, match="stop it"):
            async for _ in gen:
                pass

    asyncio.run(asyncio.wait_for(run(), TIMEOUT))
    assert wait_until(lambda: llm.snapshot.kv_cache_usage == 0)


def test_engine_failure_fails_every_request_and_marks_unhealthy(checkpoint):
    llm = make_llm(checkpoint)
    try:
        real_step = llm.engine.step
        calls = []

        def failing_step(**kwargs):
            calls.append(1)
            if len(calls) > 3:
                raise RuntimeError("boom")
            return real_step(**kwargs)

        llm.engine.step = failing_step

        async def run():
            jobs = [collect(llm, [1, 2, 3 + i], greedy(100), f"r{i}") for i in range(3)]
            return await asyncio.gather(*jobs, return_exceptions=True)

        results = asyncio.run(asyncio.wait_for(run(), TIMEOUT))
        assert all(isinstance(r, EngineDeadError) and "boom" in str(r) for r in results), results
        assert not llm.is_healthy and not llm.snapshot.is_healthy
        with pytest.raises(EngineDeadError):
            asyncio.run(asyncio.wait_for(collect(llm, [1], greedy(2), "after"), TIMEOUT))
    finally:
        llm.shutdown()


def shut_down_with_a_request_in_flight(llm) -> None:
    """Shut `llm` down while a request runs: its reader gets EngineDeadError("... shutting down")."""
    async def run():
        gen = llm.generate([1, 2], greedy(200), "x")
        await gen.__anext__()
        await asyncio.to_thread(llm.shutdown)
        with pytest.raises(EngineDeadError, match="shutting down"):
            async for _ in gen:
                pass

    asyncio.run(asyncio.wait_for(run(), TIMEOUT))
    assert not llm.is_healthy


def test_shutdown_fails_requests_in_flight(checkpoint):
    shut_down_with_a_request_in_flight(make_llm(checkpoint))


def test_server_answers_503_once_the_engine_died(checkpoint):
    import httpx

    from shardllm.entrypoints.openai.server import OpenAIServer

    llm = make_llm(checkpoint)
    server = OpenAIServer(llm, "tiny")
    body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 3, "ignore_eos": True}

    async def post(client):
        return await client.post("/v1/completions", json=body)

    async def run():
        transport = httpx.ASGITransport(app=server.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            ok = await post(client)
            assert ok.status_code == 200 and ok.json()["usage"] == {
                "prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
            assert (await client.get("/health")).status_code == 200

            def boom(**kwargs):
                raise RuntimeError("device lost")

            llm.engine.step = boom
            failed = await post(client)
            assert failed.status_code == 503 and "device lost" in failed.json()["error"]["message"]
            health = await client.get("/health")
            assert health.status_code == 503 and set(health.json()["error"]) == {"message", "type", "param", "code"}
            again = await post(client)
            assert again.status_code == 503 and again.json()["error"]["type"] == "service_unavailable"
            metrics = (await client.get("/metrics")).text
            assert 'shardllm_engine_healthy{model_name="tiny"} 0.0' in metrics

    try:
        asyncio.run(asyncio.wait_for(run(), TIMEOUT))
    finally:
        llm.shutdown()


def test_engine_core_does_not_import_server_packages():
    import subprocess
    import sys

    code = ("import sys, shardllm, shardllm.engine.async_llm, shardllm.metrics; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'fastapi', 'uvicorn', 'starlette', 'pydantic', 'prometheus_client', 'httpx'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
