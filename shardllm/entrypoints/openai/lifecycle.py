"""The server's life beside its engine: uvicorn with a grace period on SIGTERM; a watchdog that shuts the server
down (exit code 1) once the engine is dead, so that an orchestrator restarts it, as vLLM's and TGI's launchers do;
and client disconnects logged as the client events they are (one INFO line, no traceback)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Callable

import uvicorn
from starlette.requests import Request

logger = logging.getLogger(__name__)

ENGINE_WATCH_INTERVAL_S = 0.5
# After the engine died the server answers 503 (on /health too) this long before it stops listening, so that a
# probe or load balancer sees the failure rather than a refused connection.
ENGINE_DEAD_DRAIN_S = 2.0
EXIT_ENGINE_DEAD = 1  # the process exit code after the engine died


async def watch_engine(llm, on_dead: Callable[[], None], interval_s: float = ENGINE_WATCH_INTERVAL_S,
                       drain_s: float = ENGINE_DEAD_DRAIN_S) -> None:
    """Call `on_dead` once, `drain_s` after `llm.error` is set (the engine thread ended by a failure: a dead worker,
    a failed step). A shutdown that was asked for is not a death."""
    while llm.error is None:
        await asyncio.sleep(interval_s)
    logger.error("the engine is dead (%r): the server stops in %.0f s and exits with code %d, to be restarted",
                 llm.error, drain_s, EXIT_ENGINE_DEAD)
    await asyncio.sleep(drain_s)
    on_dead()


def log_client_gone(request: Request, when: str) -> None:
    """One line for a client that went away before its answer was complete."""
    client = request.client
    who = f"{client.host}:{client.port}" if client else "a client"
    logger.info("client %s disconnected %s (%s %s)", who, when, request.method, request.url.path)


def log_stream_gone(request_id: str) -> None:
    """One line for a client that hung up before its stream ended (its requests are aborted)."""
    logger.info("client disconnected during the stream of %s", request_id)


class GracefulUvicornServer(uvicorn.Server):
    """uvicorn, with a grace period: on the first SIGINT/SIGTERM it stops accepting at once, and what is
    still running `grace_s` later is aborted, so that every stream ends with an error event and [DONE]."""

    def __init__(self, config: uvicorn.Config, on_grace_end, grace_s: float, on_signal=None):
        super().__init__(config)
        self._on_grace_end, self._grace_s = on_grace_end, grace_s
        self._on_signal = on_signal  # called (in the signal handler) on the first SIGINT/SIGTERM
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:  # listening now; uvicorn says nothing when it is handed a bound socket (cli.check_bind)
            logger.info("shardllm: serving on %s", self.listen_url(sockets))

    def listen_url(self, sockets=None) -> str:
        """http://HOST:PORT: the host as configured, the port the socket is bound to (a real one for port 0)."""
        host, port = self.config.host, self.config.port
        bound = sockets or [s for srv in getattr(self, "servers", []) for s in (srv.sockets or ())]
        if bound and bound[0].family in (socket.AF_INET, socket.AF_INET6):
            port = bound[0].getsockname()[1]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def handle_exit(self, sig: int, frame) -> None:
        if not self.should_exit and self._loop is not None:
            logger.info("signal %d: shutting down (running requests get %.0f s)", sig, self._grace_s)
            self._loop.call_soon_threadsafe(self._loop.call_later, self._grace_s, self._on_grace_end)
            if self._on_signal is not None:
                self._on_signal()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn re-raises a caught signal once it has shut down, so the process would die by it; a
        # server that shut down gracefully should exit 0 instead.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
