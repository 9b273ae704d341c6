"""Several API servers on one engine process (`--api_server_count`, entrypoints/openai/api_servers.py): the engine
routes each request's deltas to the front end that added it, keeps the latency histograms for all, and ends a
front end's requests when it detaches; the server's processes start, serve and end together."""

from __future__ import annotations

import asyncio
import json
import signal
import threading

import pytest

from shardllm.config import EngineConfig
from shardllm.engine.async_llm import AsyncLLM
from shardllm.engine.async_mp import ProcessAsyncLLM
from tests.entrypoints.test_async_llm import collect, greedy, wait_until

TIMEOUT = 60
KWARGS = dict(device="cpu", num_kv_blocks=64, max_seq_len=256)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    from tests.conftest import write_tiny_checkpoint

    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "llama"), "llama")


def test_two_front_ends_share_one_engine(checkpoint):
    """Two front ends (the second attached, as an API server's process attaches) run requests at once and each
    gets its own requests' tokens, those of the in-thread engine; an id in use on one front end is refused on the
    other alone; the latency histograms count both front ends' requests on each; a front end that detaches has
    its running request aborted in the engine, and the other goes on."""
    config = EngineConfig.create(model=checkpoint, **KWARGS)
    main = ProcessAsyncLLM(config, api_server_count=2)
    try:
        assert len(main.api_server_conns) == 1 and not main.attached
        other = ProcessAsyncLLM.attach(main.api_server_conns[0], config, main.engine_info)
        assert other.attached
        prompts = [[10 + i, 20 + i, 30 + i] for i in range(6)]

        async def together(pick):
            return await asyncio.gather(*(collect(pick(i), p, greedy(12), f"r-{i}") for i, p in enumerate(prompts)))

        got = asyncio.run(asyncio.wait_for(together(lambda i: main if i % 2 else other), TIMEOUT))
        ref_llm = AsyncLLM.from_kwargs(model=checkpoint, **KWARGS)
        try:
            ref = asyncio.run(asyncio.wait_for(together(lambda i: ref_llm), TIMEOUT))
        finally:
            ref_llm.shutdown()
        assert [o[-1].outputs[0].token_ids for o in got] == [o[-1].outputs[0].token_ids for o in ref]
        assert [o[-1].prompt_token_ids for o in got] == prompts
        for fe in (main, other):  # each sees all six requests
            assert wait_until(lambda fe=fe: fe.latency.e2e_request_latency.snapshot()[2] == 6)

        async def same_id():
            gen = main.generate([5, 6, 7], greedy(200), "dup")
            last = await gen.__anext__()  # running in the engine now
            with pytest.raises(ValueError, match="already in use"):
                await collect(other, [8, 9], greedy(4), "dup")
            async for out in gen:
                last = out
            return last

        last = asyncio.run(asyncio.wait_for(same_id(), TIMEOUT))
        assert last.finished and len(last.outputs[0].token_ids) == 200

        # the attached front end stops while its request runs: the engine aborts that request
        started = threading.Event()

        async def detach_while_running():
            async def run_other():
                async for _ in other.generate([3, 4, 5], greedy(200), "orphan"):
                    started.set()
            task = asyncio.ensure_future(run_other())
            while not started.is_set():
                await asyncio.sleep(0.01)
            return task

        loop = asyncio.new_event_loop()
        try:
            task = loop.run_until_complete(asyncio.wait_for(detach_while_running(), TIMEOUT))
            assert wait_until(lambda: main.snapshot.num_requests_running == 1)
            other.shutdown()  # detach (the reader ends when the engine closes its pipe)
            assert not other._reader.is_alive()
            task.cancel()
            loop.run_until_complete(asyncio.gather(task, return_exceptions=True))
        finally:
            loop.close()
        assert wait_until(lambda: main.snapshot.num_requests_running == 0 and main.snapshot.kv_cache_usage == 0)
        outs = asyncio.run(asyncio.wait_for(collect(main, [1, 2, 3], greedy(8), "after"), TIMEOUT))
        assert main.is_healthy and outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 8
    finally:
        main.shutdown()
    assert main._proc.exitcode == 0


def test_api_server_count_is_checked_before_the_model_loads(capsys, monkeypatch):
    from shardllm.entrypoints import cli

    assert cli.main(["serve", "--api_server_count", "0", "--port", "1"]) == 1
    assert "api_server_count must be an integer >= 1, got 0" in capsys.readouterr().err
    monkeypatch.setenv("SHARDLLM_ENGINE_PROCESS", "0")
    assert cli.main(["serve", "--api-server-count", "2", "--port", "1"]) == 1
    err = capsys.readouterr().err
    assert "needs the engine in a process of its own" in err and "SHARDLLM_ENGINE_PROCESS=0" in err


def _stream(url: str, model: str, prompt: list[int], max_tokens: int) -> str:
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.Client() as client:  # a connection of its own: the kernel picks its API server
        with client.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    return "".join(c["choices"][0]["text"] for c in chunks)


def _server_processes(server):
    """(engine processes, other API servers) of a RemoteServer, once its second API server listens."""
    import psutil

    assert wait_until(lambda: "[api_server 1] shardllm: serving on" in server.log_tail(10**6), timeout=TIMEOUT)
    children = psutil.Process(server.proc.pid).children()
    return ([p for p in children if p.name() == "shardllm-engine"],
            [p for p in children if p.name().startswith("shardllm-api-")])


def test_two_api_servers_serve_one_engine_and_stop_together(tmp_path):
    """`shardllm serve --api_server_count 2`: an engine process and a second API server; concurrent streams on
    separate connections land on both (their access lines say which) with the greedy text of the offline engine;
    /metrics on any connection (6 in a row, each its own) counts every request, where a process counting only
    its own would fall short; SIGTERM to the main process stops both (exit code 0)."""
    pytest.importorskip("fastapi")
    import httpx
    import psutil

    from shardllm import LLM, SamplingParams
    from shardllm.model_loader.default_model import default_model_path
    from tests.entrypoints.conftest import RemoteServer
    from tests.helpers import write_text_checkpoint

    path = write_text_checkpoint(str(tmp_path / "llama"), max_position_embeddings=1024)
    prompts = [[100 + 7 * i + j for j in range(12 + i % 5)] for i in range(24)]
    server = RemoteServer([path, "--tokenizer", default_model_path(), "--api_server_count", "2", "--log_level", "info"])
    try:
        engines, others = _server_processes(server)
        assert len(engines) == 1 and [p.name() for p in others] == ["shardllm-api-1"]
        texts = [None] * len(prompts)

        def run(i: int) -> None:
            texts[i] = _stream(server.base_url, path, prompts[i], 16)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        key = ("shardllm_e2e_request_latency_seconds_count", ())
        assert wait_until(lambda: all(server.metrics()[key] == len(prompts) for _ in range(6)), timeout=TIMEOUT)
        log = server.log_tail(10**7)
        for i in (0, 1):
            assert f'[api_server {i}] 127.0.0.1' in log and "POST /v1/completions" in log
        served = [sum(f"[api_server {i}]" in line and "POST /v1/completions" in line for line in log.splitlines())
                  for i in (0, 1)]
        assert sum(served) == len(prompts) and min(served) > 0, served
        assert httpx.get(server.url("/health"), timeout=10).status_code == 200
    finally:
        code = server.stop(signal.SIGTERM, keep_log=True)
        log = server.log_tail(10**6)
    assert code == 0, log
    assert "[api_server 1] signal 15: shutting down" in log  # the main process passed the SIGTERM on
    gone, alive = psutil.wait_procs(engines + others, timeout=30)
    assert not alive

    llm = LLM(path, tokenizer=default_model_path(), device="cpu", num_kv_blocks=64, max_seq_len=256)
    try:
        ref = [o.outputs[0].text for o in llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0,
                                                                                   ignore_eos=True), use_tqdm=False)]
    finally:
        llm.shutdown()
    assert texts == ref


@pytest.mark.parametrize("victim", ["api_server", "engine"])
def test_a_dead_api_server_or_engine_stops_the_whole_server_with_exit_code_1(tmp_path, victim):
    """SIGKILL of the second API server, or of the engine: the main process stops (exit code 1, for an
    orchestrator to restart it) and no process of the server is left."""
    pytest.importorskip("fastapi")
    import psutil

    from tests.conftest import write_tiny_checkpoint
    from tests.entrypoints.conftest import RemoteServer

    path = write_tiny_checkpoint(str(tmp_path / "llama"), "llama")
    server = RemoteServer([path, "--api_server_count", "2", "--log_level", "info", "--max_seq_len", "256"])
    try:
        engines, others = _server_processes(server)
        assert len(engines) == 1 and len(others) == 1
        (engines if victim == "engine" else others)[0].kill()
        server.proc.wait(60)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    assert server.proc.returncode == 1, server.log_tail()
    message = "API server shardllm-api-1 exited (killed by SIGKILL)" if victim == "api_server" else "engine is dead"
    assert message in server.log_tail(10**6)
    gone, alive = psutil.wait_procs(engines + others, timeout=30)
    assert not alive
