"""A real three-process server (the default model at --tp_size 3 on CPU, gloo): logit_bias reaches every rank's
sampler; a worker killed while the server is idle is noticed within 5 s (/health 503, shardllm_engine_healthy 0),
and the server then exits non-zero so that an orchestrator restarts it."""

from __future__ import annotations

import os
import signal
import time

import httpx
import psutil
import pytest

from tests.entrypoints.conftest import MODEL, RemoteServer

TOKEN = 1000  # an ordinary token of the default model's vocabulary


@pytest.fixture(scope="module")
def tp_server():
    srv = RemoteServer(["--tp_size", "3"])
    yield srv
    if srv.proc.poll() is None:
        srv.stop(signal.SIGKILL)


def _workers(server: RemoteServer) -> list[psutil.Process]:
    children = psutil.Process(server.proc.pid).children(recursive=True)  # SHARDLLM_ENGINE_PROCESS=1: grandchildren
    return [p for p in children if "shardllm.executor.multiproc" in " ".join(p.cmdline())]


def _complete(server: RemoteServer, **kw) -> httpx.Response:
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4, **kw}
    return httpx.post(server.url("/v1/completions"), json=body, timeout=60)


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 3}], ids=["greedy", "seeded"])
def test_logit_bias_on_tensor_parallel_ranks(tp_server, sampling):
    forced = _complete(tp_server, logit_bias={str(TOKEN): 100}, **sampling)
    assert forced.status_code == 200, forced.text
    # the same four tokens, echoed back as a prompt of token ids: the text the bias must produce
    echo = _complete(tp_server, prompt=[TOKEN] * 4, max_tokens=1, echo=True, temperature=0)
    expected = echo.json()["choices"][0]["text"]
    assert expected.startswith(forced.json()["choices"][0]["text"]) and forced.json()["choices"][0]["text"]


def test_worker_killed_while_idle_is_noticed_and_the_server_exits_nonzero(tp_server):
    assert _complete(tp_server).status_code == 200
    workers = _workers(tp_server)
    assert len(workers) == 3
    time.sleep(1.5)  # idle: no request runs while the worker dies
    os.kill(workers[1].pid, signal.SIGKILL)
    killed = time.monotonic()
    status = 200
    while status == 200 and time.monotonic() - killed < 5:  # the rule: noticed within 5 s
        status = httpx.get(tp_server.url("/health"), timeout=5).status_code
        time.sleep(0.1)
    assert status == 503, f"/health still {status} 5 s after the kill:\n{tp_server.log_tail()}"
    assert tp_server.metrics()[("shardllm_engine_healthy", ())] == 0
    refused = _complete(tp_server)
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "service_unavailable"
    rc = tp_server.proc.wait(60)
    assert rc == 1, tp_server.log_tail()
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    assert "Traceback" not in tp_server.log_tail(20000).split("is dead")[-1]  # no traceback after the shutdown
