"""Several API-server processes on one engine: `shardllm serve --api_server_count N` (vLLM's --api-server-count).

With the engine in a process of its own (engine/core_proc.py) the server's HTTP process is the next bound: one
Python interpreter streams every token as a server-sent event, about one core at ~20,000 tokens/s on an H200
(twenty-third session, docs/benchmarks.md). Here N processes share that work:

    main process (API server 0) ──pipe──┐
    API server 1 (spawned)      ──pipe──┼── engine process (one LLMEngine; each request's deltas go to the API
    ...                                 │   server that added it, the gauges and latency histograms to all)
    API server N-1              ──pipe──┘

Each binds the same host:port with SO_REUSEPORT, so the kernel spreads new connections over the N listening
sockets by their address hash; each serves the whole API (its own tokenizer, chat templates, /metrics with the
engine's gauges and histograms). The main process starts the others once the engine is ready.

Ending:
- SIGINT or SIGTERM to the main process: it sends SIGTERM to the others; each stops accepting and gives its
  running requests --shutdown_timeout seconds, as the main one does; the main process waits for them before it
  stops the engine. (A terminal's Ctrl-C reaches them all at once: the same.)
- Another API server dies while the main one serves: the main one logs it and stops with exit code 1, for an
  orchestrator to restart the server, as when the engine dies.
- The engine dies: every API server sees its pipe end and exits with code 1.
- The main process is killed: the engine sees its pipe end and stops; the others then see theirs end and exit.
"""

from __future__ import annotations

import copy
import logging
import multiprocessing
import os
import signal
import threading
import time

from shardllm.engine.async_mp import how_ended, root_log_format

logger = logging.getLogger(__name__)

_WATCH_INTERVAL_S = 0.5


def log_prefix(index: int) -> str:
    """What each log line of API server `index` starts with (when there are several)."""
    return f"[api_server {index}] "


def prefix_log_lines(prefix: str) -> None:
    """Start every line of this process's root handlers with `prefix` (after their time and level)."""
    for handler in logging.getLogger().handlers:
        if handler.formatter is not None:
            handler.setFormatter(logging.Formatter(handler.formatter._fmt.replace("%(message)s",
                                                                                  prefix + "%(message)s", 1)))


def uvicorn_log_config(prefix: str) -> dict:
    """uvicorn's default logging configuration with `prefix` before each message (access lines too)."""
    import uvicorn.config

    cfg = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    for f in cfg["formatters"].values():
        f["fmt"] = f["fmt"].replace("%(levelprefix)s ", "%(levelprefix)s " + prefix, 1)
    return cfg


class APIServers:
    """The API servers 1..N-1 of a main process that serves as API server 0 (started here, at once).

    Args:
        llm: the main process's ProcessAsyncLLM, made with api_server_count=N (its `api_server_conns`, handed to
            the processes and closed here).
        host, port: the address they bind (the main process's socket must have SO_REUSEPORT set; port: the bound
            one, not 0).
        server_kwargs: run_server's keyword arguments (served_model_name, api_key, log_level, shutdown_timeout,
            the limits).
    """

    def __init__(self, llm, host: str, port: int, server_kwargs: dict):
        ctx = multiprocessing.get_context("spawn")
        level, fmt = logging.getLogger().level, root_log_format()
        self.processes: list = []
        self.stopping = False
        for i, conn in enumerate(llm.api_server_conns, start=1):
            p = ctx.Process(target=api_server_main, name=f"shardllm-api-{i}", daemon=True,
                            args=(i, conn, llm.config, llm.engine_info, host, port, server_kwargs, level, fmt))
            p.start()
            conn.close()  # its process has it now: the engine sees this pipe end when that process ends
            self.processes.append(p)
        llm.api_server_conns = []

    def terminate(self) -> None:
        """Ask each one to stop (SIGTERM: a graceful shutdown, as the main process's)."""
        self.stopping = True
        for p in self.processes:
            if p.is_alive():
                try:
                    os.kill(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def wait(self, timeout: float) -> None:
        """Wait up to `timeout` s for all to exit; kill those left."""
        deadline = time.monotonic() + timeout
        for p in self.processes:
            p.join(max(deadline - time.monotonic(), 0.0))
            if p.is_alive():
                logger.error("API server %s did not stop within %.0f s; killing it", p.name, timeout)
                p.kill()
                p.join(5)

    def watch(self, on_death) -> None:
        """In a thread: call `on_death(message)` once if one of them ends while the server is not stopping."""

        def loop() -> None:
            while not self.stopping:
                for p in self.processes:
                    if p.exitcode is not None and not self.stopping:
                        on_death(f"API server {p.name} exited ({how_ended(p.exitcode)})")
                        return
                time.sleep(_WATCH_INTERVAL_S)

        threading.Thread(target=loop, name="shardllm-api-watch", daemon=True).start()


def api_server_main(index: int, conn, config, engine_info: dict, host: str, port: int, server_kwargs: dict,
                    log_level: int, log_format: str | None) -> None:
    """An API server's process (multiprocessing spawn): attach to the engine through `conn`, bind host:port with
    SO_REUSEPORT and serve until SIGINT / SIGTERM (exit code 0) or the engine's end (exit code 1)."""
    import sys

    from shardllm.engine.core_proc import name_process

    name_process(f"shardllm-api-{index}".encode())
    prefix = log_prefix(index)
    if log_format is not None:
        logging.basicConfig(level=log_level, format=log_format)
        prefix_log_lines(prefix)
    from shardllm.engine.async_mp import ProcessAsyncLLM
    from shardllm.entrypoints.cli import check_bind
    from shardllm.entrypoints.openai.run import run_server

    try:
        sock = check_bind(host, port, reuse_port=True, join=True)
    except ValueError as e:
        logger.error("%s", e)
        sys.exit(1)
    llm = ProcessAsyncLLM.attach(conn, config, engine_info)
    try:
        code = run_server(llm, host=host, port=port, sock=sock, log_prefix=prefix, **server_kwargs)
    finally:
        sock.close()
    sys.exit(code)
