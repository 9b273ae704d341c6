"""The image's HEALTHCHECK script (shardllm/entrypoints/healthcheck.py): it finds the server's process, reads its port
the way `shardllm serve` does, and asks /health there. Real processes with a real HTTP server on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from shardllm.entrypoints.cli import SERVER_DEFAULTS, build_parser
from shardllm.entrypoints.healthcheck import find_server, serve_args, served_address

SCRIPT = Path(__file__).resolve().parents[2] / "shardllm" / "entrypoints" / "healthcheck.py"
# A stand-in server (real HTTP, /health 200) whose command line reads as `shardllm-serve ...`; it binds the port
# given by --port, else by port: in the --config file.
SERVER = """
import http.server, sys, yaml
args = sys.argv[1:]
if "--port" in args:
    port = int(args[args.index("--port") + 1])
else:
    port = yaml.safe_load(open(args[args.index("--config") + 1]))["port"]
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], port: int, cwd: Path | None = None) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", SERVER, "shardllm-serve", *args], cwd=cwd)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the stand-in server did not listen")


def healthcheck(pid: int) -> int:
    return subprocess.run([sys.executable, str(SCRIPT), "--pid", str(pid), "--timeout", "10"],
                          capture_output=True, timeout=60).returncode


@pytest.mark.parametrize("args", [
    [], ["M"], ["M", "--port", "9000"], ["--port=9001", "M"], ["M", "--port", "9000", "--port", "9002"],
    ["M", "--host", "0.0.0.0", "--port", "7000"], ["M", "--host", "10.1.2.3"], ["M", "--tp_size", "2"]])
def test_reads_port_and_host_as_serve_parses_them(args):
    ns = build_parser().parse_args(["serve", *args])
    host, port = served_address(args, environ={})
    assert port == getattr(ns, "port", SERVER_DEFAULTS["port"])
    expected = getattr(ns, "host", SERVER_DEFAULTS["host"])
    assert host == ("127.0.0.1" if expected in ("0.0.0.0", "localhost") else expected)


def test_recognises_the_ways_the_server_is_started():
    assert serve_args(["/opt/shardllm/bin/python3", "/opt/shardllm/bin/shardllm-serve", "M", "--port", "1"]) == [
        "M", "--port", "1"]
    assert serve_args(["/usr/bin/shardllm", "serve", "--port", "2"]) == ["--port", "2"]
    assert serve_args(["python", "-m", "shardllm.entrypoints.cli", "serve"]) == []
    assert serve_args(["/usr/bin/shardllm", "plan", "llama-3-8b"]) is None
    assert serve_args(["/sbin/docker-init", "--", "sleep", "1"]) is None


def test_a_server_on_another_port_is_checked_there(tmp_path):
    port = free_port()
    proc = start_server(["M", "--host", "127.0.0.1", "--port", str(port)], port)
    try:
        assert find_server(proc.pid) == (str(proc.pid), ["M", "--host", "127.0.0.1", "--port", str(port)])
        # from this process, as from an init process: the server is found below it
        assert find_server(os.getpid())[0] == str(proc.pid)
        assert healthcheck(proc.pid) == 0
    finally:
        proc.kill()
        proc.wait()
    assert healthcheck(proc.pid) == 1  # gone: unhealthy, not an error of the script


def test_the_port_of_a_config_file_relative_to_the_servers_directory(tmp_path):
    port = free_port()
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump({"port": port, "host": "127.0.0.1"}))
    proc = start_server(["M", "--config", "serve.yaml"], port, cwd=tmp_path)
    try:
        assert served_address(["M", "--config", "serve.yaml"], cwd=str(tmp_path)) == ("127.0.0.1", port)
        assert healthcheck(proc.pid) == 0
    finally:
        proc.kill()
        proc.wait()
