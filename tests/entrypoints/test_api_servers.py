"""Several API servers on one engine process (`--api_server_count`, entrypoints/openai/api_servers.py): the engine
routes each request's deltas to the front end that added it, keeps the latency histograms for all, and ends a
front end's requests when it detaches; the server's processes start, serve and end together."""

from __future__ import annotations

import asyncio
import json
import os
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
        seen_by_other: set[str] = set()  # the request ids of every delta the attached front end receives
        apply = other._apply

        def recording_apply(deltas):
            seen_by_other.update(d[0] if type(d) is tuple else d.request_id for d in deltas)
            apply(deltas)

        other._apply = recording_apply
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
        assert seen_by_other == {"r-0", "r-2", "r-4"}  # its own requests' deltas, none of the other's

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


class _Stream(threading.Thread):
    """One streamed completion on a connection of its own: `port` its client port (the access log names it, so
    the API server that took it is known), `end` (the last chunk's finish_reason, whether [DONE] came); `hang_up`
    closes the connection early."""

    def __init__(self, url: str, model: str, prompt: list[int], max_tokens: int):
        super().__init__(daemon=True)
        self.body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                     "ignore_eos": True, "stream": True}
        self.url, self.port, self.end = url, None, None
        self.hang_up, self.connected = threading.Event(), threading.Event()

    def run(self) -> None:
        import httpx

        with httpx.Client() as client, client.stream("POST", self.url + "/v1/completions", json=self.body,
                                                     timeout=120) as r:
            self.port = r.extensions["network_stream"].get_extra_info("client_addr")[1]
            self.connected.set()
            lines = []
            for x in r.iter_lines():
                if self.hang_up.is_set():
                    return
                if x.startswith("data: "):
                    lines.append(x)
        chunks = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        self.end = (chunks[-1]["choices"][0].get("finish_reason") if chunks else None, lines[-1:] == ["data: [DONE]"])


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
    its own would fall short; SIGTERM to the main process alone, while long streams run on both, lets every stream
    finish whole and stops both (exit code 0)."""
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
        # long streams; those on API server 0 hang up, then SIGTERM to the main process alone: API server 0 has
        # nothing left to drain, and must still wait for API server 1's streams, which end whole
        streams = [_Stream(server.base_url, path, prompts[i], 400) for i in range(12)]
        for st in streams:
            st.start()
        assert all(st.connected.wait(TIMEOUT) for st in streams)

        def server_of(port: int) -> int | None:
            for line in server.log_tail(10**7).splitlines():
                if f"127.0.0.1:{port} - \"POST /v1/completions" in line:
                    return 0 if "[api_server 0]" in line else 1
            return None

        assert wait_until(lambda: all(server_of(st.port) is not None for st in streams), timeout=TIMEOUT)
        on = [server_of(st.port) for st in streams]
        assert 0 in on and 1 in on, on
        for st, i in zip(streams, on):
            if i == 0:
                st.hang_up.set()
        server.proc.send_signal(signal.SIGTERM)
        for st in streams:
            st.join(TIMEOUT)
        assert [st.end for st, i in zip(streams, on) if i == 1] == [("length", True)] * on.count(1)
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


@pytest.mark.timeout(180)
def test_an_api_server_that_stops_reading_is_detached_and_the_engine_goes_on(checkpoint):
    """The engine's loop never waits on an API server's pipe: one that says hello and then reads nothing (a stopped
    process) is detached after stall_s with its requests aborted, while the main process's requests run on."""
    import multiprocessing
    import pickle
    import socket

    from shardllm.engine import core_proc
    from shardllm.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_kwargs(model=checkpoint, **KWARGS)
    (main_fe, main_eng), (stall_fe, stall_eng) = multiprocessing.Pipe(), multiprocessing.Pipe()
    for conn in (stall_eng, stall_fe):  # small socket buffers: a few messages fill the pipe
        s = socket.socket(fileno=os.dup(conn.fileno()))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        s.close()
    core = core_proc._Core(engine, [main_eng, stall_eng], idle_wait_s=0.05, stall_s=0.5)
    runner = threading.Thread(target=core.run, daemon=True)
    runner.start()
    try:
        stall_fe.send(("hello",))
        stall_fe.send(("add", "theirs", 1, pickle.dumps(([4, 5, 6], greedy(200), 0.0))))
        assert wait_until(lambda: 1 in core.live, timeout=TIMEOUT)
        mine = 0
        for k in range(4):  # requests one after another, each run to its end, while the other pipe stays unread
            main_fe.send(("add", f"mine-{k}", 1, pickle.dumps(([7, 8, 9 + k], greedy(40), 0.0))))
            while True:
                msg = main_fe.recv()
                done = [d for d in (msg[1] if msg[0] == "step" else []) if type(d) is not tuple and d.finished]
                if any(d.request_id == f"mine-{k}" for d in done):
                    mine += 1
                    break
        assert mine == 4
        assert wait_until(lambda: core.live == [0], timeout=TIMEOUT)  # detached
        assert wait_until(lambda: not engine.has_unfinished_requests(), timeout=TIMEOUT)  # its request aborted
    finally:
        main_fe.send(("stop",))
        runner.join(TIMEOUT)
        engine.shutdown()
    assert not runner.is_alive()


def test_a_second_server_on_the_same_port_is_refused():
    """API servers share their port with SO_REUSEPORT; a server started on a port in use is still refused."""
    from shardllm.entrypoints.cli import check_bind

    first = check_bind("127.0.0.1", 0, reuse_port=True)
    try:
        first.listen()
        port = first.getsockname()[1]
        check_bind("127.0.0.1", port, reuse_port=True, join=True).close()  # another API server of the same server
        for reuse_port in (True, False):
            with pytest.raises(ValueError, match="Address already in use"):
                check_bind("127.0.0.1", port, reuse_port=reuse_port)
    finally:
        first.close()
