"""ProcessAsyncLLM (the engine in a spawned process, SHARDLLM_ENGINE_PROCESS=1) on a tiny random checkpoint:
streaming, the same tokens as the in-thread engine, cancellation frees blocks, bad input fails one request only, a
request that cannot be pickled is refused with the fix, an engine that cannot start raises its error, a killed or
failing engine fails every request and marks the front end unhealthy, shutdown ends the process."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import pickle
import signal
import threading
import time

import pytest

from shardllm.config import EngineConfig
from shardllm.engine import core_proc
from shardllm.engine.async_llm import AsyncLLM, EngineDeadError, RequestFailedError
from shardllm.engine.async_mp import ProcessAsyncLLM
from shardllm.engine.core_proc import RequestDelta, SeqDelta
from shardllm.engine.llm_engine import LLMEngine
from shardllm.outputs import RequestMetrics
from shardllm.sampling_params import SamplingParams
from tests.conftest import write_tiny_checkpoint
from tests.entrypoints.test_async_llm import (  # noqa: F401 - these tests run here too, on this module's `llm`
    collect,
    greedy,
    shut_down_with_a_request_in_flight,
    test_abort_wakes_a_waiting_consumer,
    test_bad_input_fails_only_that_request,
    test_cancel_aborts_and_frees_blocks,
    test_duplicate_request_id_is_refused,
    wait_until,
)

TIMEOUT = 60
KWARGS = dict(device="cpu", num_kv_blocks=64, max_seq_len=256)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "llama"), "llama")


@pytest.fixture(scope="module")
def llm(checkpoint):
    llm = ProcessAsyncLLM.from_kwargs(model=checkpoint, **KWARGS)
    yield llm
    llm.shutdown()
    assert llm._proc.exitcode == 0


def test_streams_the_in_thread_engines_tokens(llm, checkpoint):
    prompts = [[10 + i, 20 + i, 30 + i] for i in range(6)]

    async def together(engine):
        return await asyncio.gather(*(collect(engine, p, greedy(12), f"t-{i}") for i, p in enumerate(prompts)))

    got = asyncio.run(asyncio.wait_for(together(llm), TIMEOUT))
    ref_llm = AsyncLLM.from_kwargs(model=checkpoint, **KWARGS)
    try:
        ref = asyncio.run(asyncio.wait_for(together(ref_llm), TIMEOUT))
    finally:
        ref_llm.shutdown()
    assert [o[-1].outputs[0].token_ids for o in got] == [o[-1].outputs[0].token_ids for o in ref]
    for outs in got:
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        lengths = [len(o.outputs[0].token_ids) for o in outs]
        assert lengths == sorted(lengths) and lengths[-1] == 12 and outs[-1].outputs[0].finish_reason == "length"
        assert outs[-1].prompt_token_ids == prompts[got.index(outs)]
    assert wait_until(lambda: llm.latency.e2e_request_latency.snapshot()[2] >= 6)
    assert wait_until(lambda: llm.snapshot.generation_tokens >= 72)  # the engine process's counters


def test_a_request_that_does_not_pickle_is_refused_with_the_fix(llm):
    params = SamplingParams(max_tokens=4, logits_processors=[lambda ids, logits: logits])
    with pytest.raises(ValueError, match="SHARDLLM_ENGINE_PROCESS=0"):
        asyncio.run(asyncio.wait_for(collect(llm, [1, 2], params, "lambda"), TIMEOUT))
    assert llm.num_requests_in_flight == 0
    assert asyncio.run(asyncio.wait_for(collect(llm, [1, 2], greedy(3), "after-lambda"), TIMEOUT))[-1].finished


def test_an_engine_that_cannot_start_raises_its_error(checkpoint):
    children_before = set(multiprocessing.active_children())
    with pytest.raises(ValueError, match="the KV cache holds .* tokens but max_seq_len is 256"):
        ProcessAsyncLLM.from_kwargs(model=checkpoint, device="cpu", num_kv_blocks=4, max_seq_len=256)
    assert set(multiprocessing.active_children()) <= children_before  # the engine process has ended


def test_a_killed_engine_fails_every_request_and_marks_unhealthy(checkpoint):
    llm = ProcessAsyncLLM.from_kwargs(model=checkpoint, **KWARGS)
    try:
        async def run():
            gens = [llm.generate([1, 2, 3 + i], greedy(200), f"k{i}") for i in range(3)]
            for g in gens:
                await g.__anext__()
            os.kill(llm._proc.pid, signal.SIGKILL)

            async def drain(g):
                async for _ in g:
                    pass

            return await asyncio.gather(*(drain(g) for g in gens), return_exceptions=True)

        results = asyncio.run(asyncio.wait_for(run(), TIMEOUT))
        assert all(isinstance(r, EngineDeadError) and "engine process exited (killed by SIGKILL)" in str(r)
                   for r in results), results
        assert not llm.is_healthy and llm.error is not None
        s = llm.snapshot  # a killed engine sent no last gauges: they say so anyway
        assert not s.is_healthy and s.num_requests_running == 0 and s.kv_cache_usage == 0
        with pytest.raises(EngineDeadError, match="not serving"):
            asyncio.run(asyncio.wait_for(collect(llm, [1], greedy(2), "after"), TIMEOUT))
    finally:
        llm.shutdown()


def test_shutdown_fails_requests_in_flight_and_ends_the_process(checkpoint):
    llm = ProcessAsyncLLM.from_kwargs(model=checkpoint, **KWARGS)
    shut_down_with_a_request_in_flight(llm)
    assert llm._proc.exitcode == 0
    s = llm.snapshot  # the engine aborted what ran and sent its last gauges before it ended
    assert s.finished.get("abort") == 1 and not s.is_healthy and s.num_requests_running == 0


def test_a_failing_step_sends_unhealthy_gauges_then_the_error(checkpoint, monkeypatch):
    """The engine process's loop (run here in a thread, on a pipe): a step that raises aborts what runs, sends
    gauges marked unhealthy, then ("dead", error), and shuts the engine down."""
    real = LLMEngine.step_progressed
    calls = []

    def failing(self, *a, **kw):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("boom")
        return real(self, *a, **kw)

    monkeypatch.setattr(LLMEngine, "step_progressed", failing)
    front, child = multiprocessing.Pipe()
    config = EngineConfig.create(model=checkpoint, **KWARGS)
    t = threading.Thread(target=core_proc.engine_core_main, args=(child, config, 0.05, 30, None))
    t.start()
    try:
        assert front.poll(TIMEOUT) and front.recv()[0] == "ready"
        front.send(("add", "a", 1, pickle.dumps(([1, 2, 3], greedy(50), 0.0))))
        msgs = []
        while not msgs or msgs[-1][0] != "dead":
            assert front.poll(TIMEOUT)
            msgs.append(front.recv())
        t.join(TIMEOUT)
        assert not t.is_alive()
    finally:
        front.close()
    steps = [m for m in msgs if m[0] == "step"]
    assert str(msgs[-1][1]) == "boom" and msgs[-2][0] == "step" and msgs[-2][2].is_healthy is False
    assert msgs[-2][2].num_requests_running == 0  # aborted before the gauges were sent
    assert sum(len(m[1]) for m in steps) >= 2  # the steps before the failure delivered tokens


def _greedy_texts(server, model: str) -> tuple[str, str]:
    import json

    import httpx

    body = {"model": model, "prompt": list(range(100, 140)), "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    whole = httpx.post(server.url("/v1/completions"), json=body, timeout=120).json()["choices"][0]["text"]
    with httpx.stream("POST", server.url("/v1/completions"), json={**body, "stream": True}, timeout=120) as r:
        chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    return whole, "".join(c["choices"][0]["text"] for c in chunks)


def test_both_server_forms_give_the_same_text_and_a_killed_server_leaves_no_engine(tmp_path):
    """`shardllm serve` with the engine process (the default) and with SHARDLLM_ENGINE_PROCESS=0: the same greedy
    text, streamed and not; SIGKILL of the server's process ends its engine process too (its pipe closes)."""
    pytest.importorskip("fastapi")
    import psutil

    from shardllm.model_loader.default_model import default_model_path
    from tests.entrypoints.conftest import RemoteServer
    from tests.helpers import write_text_checkpoint

    path = write_text_checkpoint(str(tmp_path / "llama"), max_position_embeddings=1024)
    texts = {}
    for form, env in (("thread", {"SHARDLLM_ENGINE_PROCESS": "0"}), ("process", {})):
        server = RemoteServer([path, "--tokenizer", default_model_path()], env=env)
        try:
            texts[form] = _greedy_texts(server, path)
            children = psutil.Process(server.proc.pid).children()
            engines = [p for p in children if "multiprocessing.spawn" in " ".join(p.cmdline())]
            assert len(engines) == (form == "process"), [p.cmdline() for p in children]
            assert all(p.name() == "shardllm-engine" for p in engines)  # as `top` and `ps -e` show it
            if form == "process":
                server.proc.kill()
                server.proc.wait(30)
                gone, alive = psutil.wait_procs(engines, timeout=30)
                assert not alive, "the engine process outlived its server"
        finally:
            if server.proc.poll() is None:
                assert server.stop() == 0, server.log_tail()
    whole, streamed = texts["process"]
    assert whole == streamed and len(whole) > 10
    assert texts["thread"] == texts["process"]


def explode_after_two(output_ids, logits):
    """A module-level logits processor (it pickles by name) that fails its request at the third token. The second
    waits 0.3 s, so that the test's reader has taken the first output before the failure comes (on a loaded
    machine the engine could otherwise fail the request before the event loop woke)."""
    if len(output_ids) == 1:
        time.sleep(0.3)
    if len(output_ids) >= 2:
        raise RuntimeError("logits processor exploded")
    return logits


def test_a_request_that_fails_is_raised_even_to_a_reader_that_lags(llm):
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logits_processors=[explode_after_two])

    async def run():
        gen = llm.generate([1, 2, 3], params, "fails")
        first = await gen.__anext__()
        await asyncio.sleep(1.0)  # the engine goes on: the failure arrives while the reader holds back
        with pytest.raises(RequestFailedError, match="logits processor exploded"):
            async for _ in gen:
                pass
        return first

    assert not asyncio.run(asyncio.wait_for(run(), TIMEOUT)).finished
    assert asyncio.run(asyncio.wait_for(collect(llm, [1, 2], greedy(3), "after-fail"), TIMEOUT))[-1].finished


def test_deltas_of_an_earlier_use_of_an_id_and_a_bad_delta_spoil_nothing_else(llm):
    """_apply on the event loop: a delta numbered for an earlier use of a reused id is dropped; a delta that cannot
    apply fails its request alone, and the other requests' deltas in the same message still land."""
    from shardllm.engine.async_mp import _State

    def delta(rid, seq, index, text, finish=None):
        return RequestDelta(rid, finish is not None, RequestMetrics(0.0), 0,
                            [SeqDelta(index, text, False, [7], finish, None, None, None)], seq=seq)

    async def run():
        queues = {rid: asyncio.Queue() for rid in ("x", "bad", "ok")}
        llm._streams.update(queues)
        for rid, seq in (("x", 5), ("bad", 6), ("ok", 7)):
            llm._states[rid] = _State(rid, [1], greedy(4), seq)
        try:
            llm._apply([delta("x", 4, 0, "OLD"), delta("bad", 6, 3, "?"), delta("ok", 7, 0, "fine", "length")])
            assert llm._states["x"].seqs[0].text == "" and queues["x"].empty()
            assert isinstance(queues["bad"].get_nowait(), RequestFailedError) and "bad" not in llm._states
            out = llm._output(queues["ok"].get_nowait())
            assert out.finished and out.outputs[0].text == "fine" and "ok" not in llm._states
        finally:
            for rid in queues:
                llm._streams.pop(rid, None)
                llm._states.pop(rid, None)

    asyncio.run(asyncio.wait_for(run(), TIMEOUT))


def test_the_engine_process_outlasts_a_sigterm_to_its_group(llm):
    """systemd's control-group stop and `kill -TERM -PGID` reach the engine too: it must go on serving while the
    server drains (the server stops it)."""
    os.kill(llm._proc.pid, signal.SIGTERM)
    outs = asyncio.run(asyncio.wait_for(collect(llm, [4, 5], greedy(6), "after-term"), TIMEOUT))
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 6
    assert llm._proc.is_alive() and llm.is_healthy


ORPHAN_SCRIPT = """
import multiprocessing, os, sys, threading, time
from shardllm.engine.core_proc import _exit_if_orphaned

def child():
    _exit_if_orphaned(os.getppid(), threading.Event())  # a model that never finishes loading

if __name__ == "__main__":
    p = multiprocessing.get_context("spawn").Process(target=child)
    p.start()
    print(p.pid, flush=True)
    time.sleep(3)  # the child's watch has started
    os._exit(0)  # the server's process ends without a word (as SIGKILL)
"""


def test_an_engine_still_loading_ends_when_its_server_process_does(tmp_path):
    import subprocess
    import sys

    import psutil

    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN_SCRIPT)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    pid = int(out.stdout.split()[0])
    try:
        psutil.Process(pid).wait(15)
    except psutil.NoSuchProcess:
        pass
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, "still running"
