"""Graceful shutdown: on SIGTERM the server stops accepting, lets running requests finish for up to
--shutdown_timeout seconds, aborts the rest (their streams end with an error event and [DONE]), stops the
engine and exits 0."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from tests.entrypoints.conftest import MODEL, RemoteServer


def _stream(server: RemoteServer, max_tokens: int, started: threading.Event, result: dict) -> None:
    body = {"model": MODEL, "prompt": "Tell me a story:", "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True}
    lines = []
    try:
        with httpx.stream("POST", server.url("/v1/completions"), json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                    started.set()
    except httpx.HTTPError as e:
        result["error"] = e
    started.set()
    result["lines"] = lines


def test_sigterm_finishes_short_requests_aborts_long_ones_and_exits_0():
    server = RemoteServer(["--shutdown_timeout", "6"])
    try:
        short, long = {}, {}
        started_short, started_long = threading.Event(), threading.Event()
        threads = [threading.Thread(target=_stream, args=(server, 6, started_short, short)),
                   threading.Thread(target=_stream, args=(server, 1000, started_long, long))]
        for t in threads:
            t.start()
        assert started_short.wait(60) and started_long.wait(60)
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):  # no new connections once shutdown began
            httpx.post(server.url("/v1/completions"), json={"model": MODEL, "prompt": "x"}, timeout=5)
        rc = server.proc.wait(60)
        elapsed = time.monotonic() - t0
        for t in threads:
            t.join(30)
        assert rc == 0, server.log_tail()
        assert elapsed < 30, elapsed
        assert short["lines"][-1] == "data: [DONE]"  # finished inside the grace period
        # aborted at the end of the grace period: an error event, then [DONE]
        assert "error" not in long and long["lines"][-1] == "data: [DONE]"
        assert '"error"' in long["lines"][-2] and "shutting down" in long["lines"][-2]
        assert len(long["lines"]) < 1000
    finally:
        server.stop(signal.SIGKILL)
