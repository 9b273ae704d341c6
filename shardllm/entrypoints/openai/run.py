"""Run the OpenAI-compatible server with uvicorn: limits, graceful shutdown, and exit code 1 when the engine dies."""

from __future__ import annotations

import logging
import signal

import uvicorn

from shardllm.engine.async_llm import AsyncLLM
from shardllm.entrypoints.openai import api_servers as api_servers_mod
from shardllm.entrypoints.openai import limits, validation
from shardllm.entrypoints.openai.lifecycle import EXIT_ENGINE_DEAD, GracefulUvicornServer
from shardllm.entrypoints.openai.server import OpenAIServer

logger = logging.getLogger(__name__)


def run_server(llm: AsyncLLM, *, host: str = "localhost", port: int = 8000, sock=None,
               served_model_name: str | None = None,
               api_key: str | None = None, log_level: str = "info", shutdown_timeout: float = 30.0,
               max_request_body_bytes: int = limits.DEFAULT_MAX_REQUEST_BODY_BYTES,
               max_seqs_per_request: int = validation.DEFAULT_MAX_SEQS_PER_REQUEST,
               timeout_keep_alive: float = limits.DEFAULT_TIMEOUT_KEEP_ALIVE_S,
               request_read_timeout: float = limits.DEFAULT_REQUEST_READ_TIMEOUT_S,
               log_prefix: str | None = None, api_servers=None) -> int:
    """Serve until SIGINT/SIGTERM: then stop accepting, let running requests finish for up to
    `shutdown_timeout` seconds, abort the rest, stop the engine and return 0. If the engine dies (a worker lost, a
    failed step) /health says 503 and ~2 s later the server shuts down and returns EXIT_ENGINE_DEAD (1), for an
    orchestrator to restart it. `sock`: a socket already bound to (host, port) to listen on (cli.check_bind), else
    uvicorn binds (host, port) itself.

    Limits: bodies over `max_request_body_bytes` get 413; a request of more than `max_seqs_per_request` sequences
    (prompts x n) gets 400; a connection idle for `timeout_keep_alive` s, or whose request has not fully arrived
    `request_read_timeout` s after its first byte, is closed.

    Several API servers (api_servers.py): `api_servers` (the main process's APIServers) are asked to stop with
    this one and waited for before the engine stops; if one dies, this server stops and returns 1 too.
    `log_prefix` starts each of uvicorn's log lines (which API server wrote it).
    """
    if max_seqs_per_request < 1:
        raise ValueError(f"max_seqs_per_request must be >= 1, got {max_seqs_per_request}")
    server = OpenAIServer(llm, served_model_name or llm.config.model_config.model, api_key, max_seqs_per_request)
    app = limits.BodySizeLimitMiddleware(server.app, max_request_body_bytes)
    log_kwargs = {} if log_prefix is None else {"log_config": api_servers_mod.uvicorn_log_config(log_prefix)}
    # uvicorn's own deadline is a backstop behind ours: by then every aborted stream has ended.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level.lower(),
                            timeout_graceful_shutdown=shutdown_timeout + 5, lifespan="on",
                            timeout_keep_alive=timeout_keep_alive,
                            http=limits.ReadTimeoutH11Protocol.with_read_timeout(request_read_timeout),
                            **log_kwargs)
    on_grace_end = lambda: llm.abort_all("the server is shutting down; the request was aborted")
    uv = GracefulUvicornServer(config, on_grace_end, shutdown_timeout,
                               on_signal=None if api_servers is None else api_servers.terminate)
    server.on_engine_dead = lambda: setattr(uv, "should_exit", True)
    others_died: list[str] = []
    if api_servers is not None:
        def stop_others() -> None:
            api_servers.terminate()
            api_servers.wait(shutdown_timeout + 10)

        def on_death(message: str) -> None:  # (in the watch thread)
            logger.error("%s: the server stops and exits with code %d, to be restarted", message, EXIT_ENGINE_DEAD)
            others_died.append(message)
            loop = uv._loop
            if loop is None:
                uv.should_exit = True
            else:  # as on SIGTERM: the others are told, running streams get their grace period and an end event
                loop.call_soon_threadsafe(uv.handle_exit, signal.SIGTERM, None)

        server.before_engine_stop = stop_others
        api_servers.watch(on_death)
    try:
        uv.run(sockets=None if sock is None else [sock])
    finally:
        if api_servers is not None:
            stop_others()  # (done already unless the server stopped before its lifespan ended)
        llm.shutdown()
    return EXIT_ENGINE_DEAD if server.engine_died or others_died else 0
