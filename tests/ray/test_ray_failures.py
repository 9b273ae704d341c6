"""What users get wrong with Ray, each failing in bounded time with a one-line error, all on loopback.

The checks of where to find the cluster run in a subprocess whose ray.init fails at once: a wrong address used
to reach ray.init, which retried it for many minutes; now it must fail before. One real one-node Ray cluster
(2 CPUs) serves the module: the Ctrl-C during the wait for a placement group. Everything runs in a network
namespace that has only a loopback interface (tests/executor/test_ray.py's LoopbackNetns).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

ray = pytest.importorskip("ray")

from tests.executor.test_ray import ray_sandbox  # noqa: E402

# A node without a running GCS process: Ray's "auto" looks at the processes of the machine (another test's
# cluster, in another network namespace, would be found) before the address `ray start` recorded.
NO_LOCAL_GCS = ("import ray._private.services as s\n"
                "def _none(): return frozenset()\n"
                "_none.cache_clear = lambda: None\n"
                "s.find_gcs_addresses = _none\n")


@pytest.fixture(scope="module")
def loopback():
    """This thread (and what it starts) in a loopback-only network namespace, Ray's temp dir and HOME apart."""
    with ray_sandbox("rayf") as tmp:  # not beside test_ray.py's cluster (see RayModuleLock)
        yield tmp


@pytest.fixture(scope="module")
def ray_cluster(loopback):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=dict(
        include_dashboard=False, num_cpus=2, object_store_memory=100 * 2**20, node_ip_address="127.0.0.1"))
    try:
        ray.init(address=cluster.address, logging_level="warning")
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Listener:
    """A loopback port that accepts connections and, unless silent, answers like an HTTP/1 server."""

    def __init__(self, silent: bool):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.silent = silent
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            if not self.silent:
                c.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def connect_in_subprocess(args: str, env: dict[str, str] | None = None, timeout: float = 60,
                          join: bool = False) -> tuple[dict, float]:
    """Run `connect(args)` in a fresh interpreter (on a node without a GCS process); unless `join`, ray.init must
    not be reached. Returns the outcome and the seconds it took."""
    code = NO_LOCAL_GCS + (
        "import json, ray\n"
        "import shardllm.executor.ray_connect as r\n"
        "r.CONNECT_TIMEOUT_S = 2.0\n"
        "def no_init(*a, **k): raise AssertionError(f'ray.init{a}{k} was called')\n"
        + ("" if join else "ray.init = no_init\n") +
        "try:\n"
        f"    joined = r.connect({args})\n"
        "    print(json.dumps({'joined': joined, 'nodes': len(ray.nodes()), 'address': ray.get_runtime_context()"
        ".gcs_address}))\n"
        "    ray.shutdown()\n"
        "except Exception as e:\n"
        "    print(json.dumps({'type': type(e).__name__, 'message': str(e)}))\n")
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), time.monotonic() - t


@pytest.mark.parametrize("silent", [False, True], ids=["http", "silent"])
def test_an_address_that_is_not_a_ray_gcs_fails_at_once(loopback, silent):
    """Before: ray.init retried such a port (the dashboard's, another service's) for many minutes."""
    listener = Listener(silent)
    try:
        out, took = connect_in_subprocess(f"'127.0.0.1:{listener.port}'")
    finally:
        listener.close()
    assert out.get("type") == "ValueError", out
    assert f"127.0.0.1:{listener.port} accepts connections but is not a Ray cluster's GCS" in out["message"]
    assert ("did not answer within 2 s" if silent else "speaks another protocol") in out["message"]
    assert "ray start --head --port" in out["message"]
    assert took < 30


def test_the_dashboard_url_is_named_as_such(loopback):
    """RAY_ADDRESS=http://head:8265 is what `ray job submit` takes; before, a DNS error named host 'http'."""
    out, _ = connect_in_subprocess("None", env={"RAY_ADDRESS": "http://127.0.0.1:8265"})
    assert out.get("type") == "ValueError", out
    assert "is an HTTP address (Ray's dashboard and job API" in out["message"]
    assert "HOST:6379" in out["message"]


def test_a_stale_recorded_cluster_fails_at_once(loopback, tmp_path):
    """A head that died without `ray stop` leaves its address in ray_current_cluster; before, `shardllm serve` on
    that node retried it in ray.init for many minutes."""
    os.makedirs(tmp_path / "ray")
    port = free_port()  # nobody listens there
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}")
    out, took = connect_in_subprocess("None", env={"RAY_TMPDIR": str(tmp_path)})
    assert out.get("type") == "ValueError", out
    assert f"cannot reach the Ray cluster recorded on this node (127.0.0.1:{port}" in out["message"]
    assert "ray stop --force" in out["message"]
    assert took < 30


def test_the_cluster_recorded_on_this_node_is_joined(ray_cluster, loopback):
    """The probe takes a real GCS for one, and the recorded cluster is joined through Ray's "auto" (only then
    does Ray send this node's auth token)."""
    os.makedirs(os.path.join(loopback, "ray"), exist_ok=True)
    record = os.path.join(loopback, "ray", "ray_current_cluster")
    with open(record, "w") as f:
        f.write(ray_cluster.address)
    try:
        out, _ = connect_in_subprocess("None", join=True)
    finally:
        os.unlink(record)
    assert out == {"joined": True, "nodes": 1, "address": ray_cluster.address}, out


def test_num_workers_without_a_cluster_does_not_start_a_private_one(loopback, tiny_checkpoints, tmp_path):
    """Before: a one-node cluster was started (about 20 s, and Ray saved a token that then turned on token
    auth for the next `ray start --head`), only to fail with 'Start the missing nodes'."""
    code = NO_LOCAL_GCS + (
        "import sys\n"
        "from shardllm.entrypoints.cli import main\n"
        f"sys.exit(main(['generate', {tiny_checkpoints['llama']!r}, '--device', 'cpu', '--tp_size', '2', "
        "'--num_workers', '2', '-p', 'hi']))\n")
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "RAY_TMPDIR": str(tmp_path)})
    assert r.returncode == 1, r.stderr[-3000:]
    assert "num_workers=2 spreads the ranks over 2 Ray nodes, but no Ray cluster runs on this node" in r.stderr
    assert "ray start --head --port=6379" in r.stderr
    assert "starting a local one" not in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "ray" / "session_latest"), "a local Ray cluster was started"
    assert time.monotonic() - t < 60


def test_a_dead_actor_is_described_in_one_line(ray_cluster):
    """The reason the server logs and sends with its 503s; before, Ray's actor error showed as 'ActorDiedError()'."""
    from shardllm.executor.ray import describe_error

    @ray.remote(num_cpus=0)
    class Victim:
        def pid(self) -> int:
            return os.getpid()

        def sleep(self) -> None:
            time.sleep(60)

    victim = Victim.remote()
    pid = ray.get(victim.pid.remote(), timeout=60)
    ref = victim.sleep.remote()
    os.kill(pid, signal.SIGKILL)  # as the OOM killer would
    with pytest.raises(ray.exceptions.RayActorError) as err:
        ray.get(ref, timeout=30)
    text = describe_error(err.value)
    assert text.startswith(f"{type(err.value).__name__}: The actor died"), text
    assert "\n" not in text and len(text) < 300, text
