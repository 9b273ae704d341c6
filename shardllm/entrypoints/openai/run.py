"""Run the OpenAI-compatible server with uvicorn: limits, graceful shutdown, and exit code 1 when the engine dies."""

from __future__ import annotations

import uvicorn

from shardllm.engine.async_llm import AsyncLLM
from shardllm.entrypoints.openai import limits, validation
from shardllm.entrypoints.openai.lifecycle import EXIT_ENGINE_DEAD, GracefulUvicornServer
from shardllm.entrypoints.openai.server import OpenAIServer


def run_server(llm: AsyncLLM, *, host: str = "localhost", port: int = 8000, sock=None,
               served_model_name: str | None = None,
               api_key: str | None = None, log_level: str = "info", shutdown_timeout: float = 30.0,
               max_request_body_bytes: int = limits.DEFAULT_MAX_REQUEST_BODY_BYTES,
               max_seqs_per_request: int = validation.DEFAULT_MAX_SEQS_PER_REQUEST,
               timeout_keep_alive: float = limits.DEFAULT_TIMEOUT_KEEP_ALIVE_S,
               request_read_timeout: float = limits.DEFAULT_REQUEST_READ_TIMEOUT_S) -> int:
    """Serve until SIGINT/SIGTERM: then stop accepting, let running requests finish for up to
    `shutdown_timeout` seconds, abort the rest, stop the engine and return 0. If the engine dies (a worker lost, a
    failed step) /health says 503 and ~2 s later the server shuts down and returns EXIT_ENGINE_DEAD (1), for an
    orchestrator to restart it. `sock`: a socket already bound to (host, port) to listen on (cli.check_bind), else
    uvicorn binds (host, port) itself.

    Limits: bodies over `max_request_body_bytes` get 413; a request of more than `max_seqs_per_request` sequences
    (prompts x n) gets 400; a connection idle for `timeout_keep_alive` s, or whose request has not fully arrived
    `request_read_timeout` s after its first byte, is closed.
    """
    if max_seqs_per_request < 1:
        raise ValueError(f"max_seqs_per_request must be >= 1, got {max_seqs_per_request}")
    server = OpenAIServer(llm, served_model_name or llm.config.model_config.model, api_key, max_seqs_per_request)
    app = limits.BodySizeLimitMiddleware(server.app, max_request_body_bytes)
    # uvicorn's own deadline is a backstop behind ours: by then every aborted stream has ended.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level.lower(),
                            timeout_graceful_shutdown=shutdown_timeout + 5, lifespan="on",
                            timeout_keep_alive=timeout_keep_alive,
                            http=limits.ReadTimeoutH11Protocol.with_read_timeout(request_read_timeout))
    on_grace_end = lambda: llm.abort_all("the server is shutting down; the request was aborted")
    uv = GracefulUvicornServer(config, on_grace_end, shutdown_timeout)
    server.on_engine_dead = lambda: setattr(uv, "should_exit", True)
    try:
        uv.run(sockets=None if sock is None else [sock])
    finally:
        llm.shutdown()
    return EXIT_ENGINE_DEAD if server.engine_died else 0
