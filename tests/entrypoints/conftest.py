"""A real `shardllm serve` subprocess on a free loopback port, on CPU with the embedded default model."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

MODEL = "SmolLM2-135M-Instruct"
MAX_SEQ_LEN = 1024
# Small on CPU: 0.25 GiB of fp32 KV is 364 blocks of 16 tokens for this model, enough for 128 short requests.
DEFAULT_ARGS = ["--device", "cpu", "--cpu_kv_cache_gb", "0.25", "--max_seq_len", str(MAX_SEQ_LEN),
                "--log_level", "warning", "--shutdown_timeout", "20"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RemoteServer:
    """Starts the server and waits for /health; `stop` sends a signal and returns the exit code."""

    def __init__(self, extra_args: list[str] = (), env: dict[str, str] | None = None, start_timeout: float = 240):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "shardllm.entrypoints.cli", "serve", "--host", "127.0.0.1", "--port",
               str(self.port), *DEFAULT_ARGS, *extra_args]
        # One intra-op thread: the server shares a small CI machine with the test's clients.
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        self.log = tempfile.NamedTemporaryFile("w+", prefix="shardllm-serve-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=full_env)
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                if httpx.get(self.url("/health"), timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.proc.kill()
        raise RuntimeError(f"server did not become healthy in {start_timeout} s:\n{self.log_tail()}")

    def url(self, path: str) -> str:
        return self.base_url + path

    def log_tail(self, n: int = 4000) -> str:
        if not os.path.exists(self.log.name):
            return ""
        with open(self.log.name) as f:
            return f.read()[-n:]

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Every sample of /metrics, keyed by (name, sorted labels without model_name)."""
        text = httpx.get(self.url("/metrics"), timeout=10).text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
                out[(s.name, labels)] = s.value
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60, keep_log: bool = False) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"server ignored signal {sig} for {timeout} s:\n{self.log_tail()}") from None
        if self.proc.returncode == 0 and not keep_log:
            os.unlink(self.log.name)  # kept when something went wrong
        return self.proc.returncode


def wait_idle(server: RemoteServer, timeout: float = 30) -> dict:
    """Poll /metrics until no request runs or waits and no KV block is held; return the last metrics."""
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        idle = (m[("shardllm_num_requests_running", ())] == 0 and m[("shardllm_num_requests_waiting", ())] == 0
                and m[("shardllm_kv_cache_usage_ratio", ())] == 0)
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server(request):
    """One server per test module; its shutdown on SIGTERM must exit 0. Its log is kept (the path printed) when a
    test of the module failed, so a failure's server side can be read after the run."""
    failed_before = request.session.testsfailed
    srv = RemoteServer()
    yield srv
    keep = request.session.testsfailed > failed_before
    rc = srv.stop(signal.SIGTERM, keep_log=keep)
    if keep:
        print(f"\n[server log kept: {srv.log.name}]")
    assert rc == 0, f"server exited {rc} on SIGTERM:\n{srv.log_tail()}"
