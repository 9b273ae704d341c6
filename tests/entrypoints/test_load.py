"""Load, disconnects and metrics: 128 concurrent streams all complete, clients that drop leave nothing
running and no KV block held, /metrics parses and its counters move. The server stops on SIGINT, exit 0."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import openai
import pytest

from tests.entrypoints.conftest import MODEL, RemoteServer, wait_idle

FINISHED = "shardllm_request_success_total"


@pytest.fixture(scope="module")
def server():
    srv = RemoteServer()
    yield srv
    rc = srv.stop(signal.SIGINT)
    assert rc == 0, f"server exited {rc} on SIGINT:\n{srv.log_tail()}"


def finished(m: dict, reason: str) -> float:
    return m[(FINISHED, (("finish_reason", reason),))]


def test_metrics_parse_and_counters_move(server):
    before = server.metrics()
    for name in ("shardllm_num_requests_running", "shardllm_num_requests_waiting", "shardllm_kv_cache_usage_ratio",
                 "shardllm_prompt_tokens_total", "shardllm_generation_tokens_total",
                 "shardllm_num_preemptions_total", "shardllm_time_to_first_token_seconds_count",
                 "shardllm_time_per_output_token_seconds_count", "shardllm_e2e_request_latency_seconds_count",
                 "shardllm_request_queue_time_seconds_count"):
        assert (name, ()) in before, name
    assert ("shardllm_gpu_memory_used_bytes", (("rank", "0"),)) in before
    assert before[("shardllm_gpu_memory_used_bytes", (("rank", "0"),))] > 0

    client = openai.OpenAI(base_url=server.url("/v1"), api_key="x", max_retries=0)
    out = client.completions.create(model=MODEL, prompt="Count: one, two,", max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True})
    after = wait_idle(server)
    assert after[("shardllm_prompt_tokens_total", ())] - before[("shardllm_prompt_tokens_total", ())] \
        == out.usage.prompt_tokens
    assert after[("shardllm_generation_tokens_total", ())] - before[("shardllm_generation_tokens_total", ())] == 5
    assert finished(after, "length") == finished(before, "length") + 1
    for h in ("time_to_first_token", "time_per_output_token", "e2e_request_latency", "request_queue_time"):
        name = f"shardllm_{h}_seconds"
        assert after[(name + "_count", ())] == before[(name + "_count", ())] + 1, h
        assert after[(name + "_bucket", (("le", "+Inf"),))] == after[(name + "_count", ())]
        assert after[(name + "_sum", ())] >= before[(name + "_sum", ())]


def test_128_concurrent_streams(server):
    """Every stream completes with exactly max_tokens tokens; the KV cache is empty afterwards."""
    num, max_tokens = 128, 6
    before = server.metrics()

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[int, str | None, int]:
        stream = await client.completions.create(
            model=MODEL, prompt=f"Request {i}: the weather today is", max_tokens=max_tokens, temperature=0.7,
            seed=i, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        chunks = [c async for c in stream]
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        return chunks[-1].usage.completion_tokens, reasons[-1] if reasons else None, len(reasons)

    async def run():
        http = httpx.AsyncClient(limits=httpx.Limits(max_connections=256, max_keepalive_connections=256),
                                 timeout=httpx.Timeout(240))
        async with openai.AsyncOpenAI(base_url=server.url("/v1"), api_key="x", max_retries=0,
                                      http_client=http) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(num))), timeout=240)

    results = asyncio.run(run())
    assert len(results) == num
    assert all(r == (max_tokens, "length", 1) for r in results), [r for r in results if r != (max_tokens, "length", 1)]
    after = wait_idle(server)
    assert after[("shardllm_kv_cache_usage_ratio", ())] == 0
    assert after[("shardllm_num_requests_running", ())] == 0
    assert finished(after, "length") - finished(before, "length") == num
    assert after[("shardllm_generation_tokens_total", ())] - before[("shardllm_generation_tokens_total", ())] \
        == num * max_tokens


def test_streaming_clients_that_disconnect_are_aborted(server):
    before = server.metrics()
    num = 8
    body = {"model": MODEL, "prompt": "Write a very long story:", "max_tokens": 500, "stream": True,
            "ignore_eos": True}

    async def drop_after_two_chunks(client: httpx.AsyncClient):
        async with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= 2:
                    break  # leaving the block closes the connection mid-stream

    async def run():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
            await asyncio.gather(*(drop_after_two_chunks(client) for _ in range(num)))

    asyncio.run(run())
    after = wait_idle(server)
    assert after[("shardllm_num_requests_running", ())] == 0
    assert after[("shardllm_num_requests_waiting", ())] == 0
    assert after[("shardllm_kv_cache_usage_ratio", ())] == 0
    assert finished(after, "abort") - finished(before, "abort") == num
    # far fewer tokens than 8 x 500 were generated: the aborts took effect at once
    assert after[("shardllm_generation_tokens_total", ())] - before[("shardllm_generation_tokens_total", ())] < 200


def test_non_streaming_client_that_disconnects_is_aborted(server):
    before = server.metrics()
    body = {"model": MODEL, "prompt": "Write a very long story:", "max_tokens": 500, "ignore_eos": True}
    start = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url("/v1/completions"), json=body, timeout=httpx.Timeout(60, read=1.5))
    after = wait_idle(server)
    assert time.monotonic() - start < 30
    assert after[("shardllm_kv_cache_usage_ratio", ())] == 0
    assert finished(after, "abort") - finished(before, "abort") == 1


def test_server_still_serves_after_disconnects(server):
    client = openai.OpenAI(base_url=server.url("/v1"), api_key="x", max_retries=0)
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert out.usage.completion_tokens >= 1
