"""The Ray executor on a real two-node Ray cluster (CPU, gloo), all traffic on loopback.

One cluster for the whole module: `ray.cluster_utils.Cluster` with two nodes of 2 CPUs, started inside a
network namespace that has only a loopback interface (so Ray, the rendezvous and the plan sockets can only
use 127.0.0.1), with RAY_AUTH_MODE=disabled and Ray's temp dir and HOME in a temporary directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import pytest

ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")

from shardllm import LLM, SamplingParams  # noqa: E402
from shardllm.executor.ray import assign_ranks, env_to_copy, sorted_gpu_ids  # noqa: E402

PROMPTS = [[1, 17, 33, 5, 9, 101, 7], [3, 4], [250, 14, 88, 19, 201, 6, 6, 6, 42, 71, 300, 12, 9]]
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
CLONE_NEWNET = 0x40000000


class LoopbackNetns:
    """Move this thread (and the processes it starts) into a new network namespace whose only interface is
    an up loopback; `leave` moves it back. Needs root (CAP_SYS_ADMIN), as CI has."""

    def __init__(self):
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        if self._libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            os.close(self._orig)
            raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
        siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # `ip link set lo up`
            flags = struct.unpack("16sh22x", fcntl.ioctl(s, siocgifflags, struct.pack("16sh22x", b"lo", 0)))[1]
            fcntl.ioctl(s, siocsifflags, struct.pack("16sh22x", b"lo", flags | iff_up))

    def leave(self) -> None:
        self._libc.setns(self._orig, CLONE_NEWNET)
        os.close(self._orig)


def ray_processes(marker: str) -> list[int]:
    """Pids of live processes whose command line contains `marker` (Ray sets titles like ray::RayWorker.run)."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{d}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue  # a zombie is already dead
        except OSError:
            continue
        if marker in cmd:
            pids.append(int(d))
    return pids


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class RayModuleLock:
    """One Ray test module at a time across the suite's processes (pytest-xdist gives each file to one process, and
    two Ray clusters at once on a 2-core machine starved each other's workers past their timeouts): an exclusive
    flock, taken before a module starts its cluster and released after it stopped."""

    PATH = os.path.join(tempfile.gettempdir(), "shardllm-ray-tests.lock")

    def __enter__(self):
        self._f = open(self.PATH, "w")
        fcntl.flock(self._f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self._f, fcntl.LOCK_UN)
        self._f.close()


def wait_until(cond, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return cond()


@contextlib.contextmanager
def ray_sandbox(prefix: str):
    """This thread (and what it starts) in a loopback-only network namespace, with Ray's temp dir and HOME in a
    fresh folder (yielded), RAY_ADDRESS unset, and no other module's Ray cluster running (RayModuleLock). On exit:
    every Ray process under the folder has ended (asserted, after up to 10 s), the folder is removed."""
    if os.geteuid() != 0:
        pytest.skip("the Ray tests make a loopback-only network namespace, which needs root")
    tmp = tempfile.mkdtemp(prefix=prefix, dir="/tmp")  # short: Ray's socket paths live below it
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "disabled")
    mp.setenv("RAY_TMPDIR", tmp)
    mp.setenv("HOME", tmp)  # Ray writes ~/.ray
    mp.delenv("RAY_ADDRESS", raising=False)
    lock = RayModuleLock().__enter__()
    netns = LoopbackNetns()
    try:
        yield tmp
    finally:
        netns.leave()
        mp.undo()
        left = wait_until(lambda: not ray_processes(tmp), 10) or ray_processes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        lock.__exit__()
        assert left is True, f"Ray processes left running: {left}"


@pytest.fixture(scope="module")
def ray_cluster():
    """Two Ray nodes (2 CPUs each) on loopback; this process is the driver. Everything stops at the end."""
    from ray.cluster_utils import Cluster

    with ray_sandbox("ray"):
        cluster = None
        try:
            node = dict(num_cpus=2, object_store_memory=100 * 2**20, node_ip_address="127.0.0.1")
            cluster = Cluster(initialize_head=True, head_node_args=dict(include_dashboard=False, **node))
            cluster.add_node(**node)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, logging_level="warning")
            yield cluster
        finally:
            if ray.is_initialized():
                ray.shutdown()
            if cluster is not None:
                cluster.shutdown()


@pytest.fixture(scope="module")
def llama(tiny_checkpoints):
    return tiny_checkpoints["llama"]


def generate(path, **kw) -> list[list[int]]:
    llm = LLM(path, device="cpu", num_kv_blocks=100, block_size=4, **kw)
    try:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    finally:
        llm.shutdown()


def pg_states() -> list[str]:
    return [pg["state"] for pg in ray.util.placement_group_table().values()]


# ---- pure functions -----------------------------------------------------------------------------------------------
def test_gpu_ids_sort_as_numbers():
    assert sorted_gpu_ids(["10", "2", "0"]) == [0, 2, 10]


def test_ranks_fill_nodes_in_order_driver_node_first():
    # PACK may interleave bundles over nodes; the ranks of one node must still be consecutive (one tp group)
    assert assign_ranks(["b", "a", "b", "a"], [1, 1, 1, 1], 4, first_node="a") == [
        (1, "a"), (3, "a"), (0, "b"), (2, "b")]
    # num_workers: one bundle of world/N units per node
    assert assign_ranks(["x", "y"], [2, 2], 4, first_node="z") == [(0, "x"), (0, "x"), (1, "y"), (1, "y")]
    # a caller's placement group (KubeRay, Ray Serve) may lead with a CPU-only bundle: it holds no rank
    assert assign_ranks(["x", "x", "x"], [0, 1, 1], 2, first_node="x") == [(1, "x"), (2, "x")]
    with pytest.raises(ValueError, match="holds 2 ranks, 4 are needed"):
        assign_ranks(["x", "y"], [1, 1], 4)


def test_env_that_travels():
    env = {"NCCL_DEBUG": "INFO", "HF_HOME": "/m", "SHARDLLM_STEP_TIMEOUT": "9", "CUDA_VISIBLE_DEVICES": "0",
           "MASTER_ADDR": "x", "PATH": "/bin", "MY_VAR": "1", "SHARDLLM_RAY_ENV_VARS": "MY_VAR"}
    assert env_to_copy(env) == {"NCCL_DEBUG": "INFO", "HF_HOME": "/m", "SHARDLLM_STEP_TIMEOUT": "9",
                                "MY_VAR": "1", "SHARDLLM_RAY_ENV_VARS": "MY_VAR"}


def test_num_workers_must_divide_the_ranks(llama):
    with pytest.raises(ValueError, match="num_workers=3 nodes do not divide"):
        LLM(llama, device="cpu", tensor_parallel_size=2, pipeline_parallel_size=2, num_workers=3)


def test_a_driver_without_gpus_may_drive_gpu_workers_over_ray():
    from shardllm.config import EngineConfig

    cfg = EngineConfig.create("llama-3-8b", load_format="dummy", device="cuda", tensor_parallel_size=2,
                              pipeline_parallel_size=2, num_workers=2)
    assert cfg.device == "cuda" and cfg.parallel_config.distributed_executor_backend == "ray"
    assert cfg.parallel_config.num_workers == 2


# ---- on the cluster -----------------------------------------------------------------------------------------------
def test_tp2_pp2_over_two_nodes_equals_one_rank(ray_cluster, llama, monkeypatch):
    expected = generate(llama)
    monkeypatch.setenv("NCCL_DEBUG", "WARN")  # the driver's setting must reach the other node's workers
    llm = LLM(llama, device="cpu", num_kv_blocks=100, block_size=4, tensor_parallel_size=2,
              pipeline_parallel_size=2, num_workers=2)
    try:
        ex = llm.engine.executor
        assert type(ex).__name__ == "RayExecutor"
        placement = ex.placement
        nodes = [p.node_id for p in placement]
        assert nodes[0] == nodes[1] and nodes[2] == nodes[3], "a tp group spans nodes"
        assert nodes[0] != nodes[2], "both pipeline stages on one node"
        assert set(nodes) == {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert all(p.node_ip == "127.0.0.1" for p in placement)
        assert ex.worker_env("NCCL_DEBUG") == ["WARN"] * 4
        tokens = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
        assert tokens == expected
        pids = [p.pid for p in placement]
        assert all(map(alive, pids))
    finally:
        llm.shutdown()
    # shutdown: actors gone, the placement group removed, the CPUs free again
    assert wait_until(lambda: not any(map(alive, pids)), 10), "actors left after shutdown"
    assert set(pg_states()) <= {"REMOVED"}
    assert wait_until(lambda: ray.available_resources().get("CPU", 0) == 4, 30)


def test_mixtral_tp2_ep2_equals_one_rank(ray_cluster, tiny_checkpoints):
    path = tiny_checkpoints["mixtral"]
    expected = generate(path)
    assert generate(path, tensor_parallel_size=2, expert_parallel_size=2,
                    distributed_executor_backend="ray") == expected


def _engine_in_placement_group(path: str) -> tuple[list[list[int]], list[int], str]:
    """Runs as a Ray task inside the caller's placement group (as under Ray Serve or KubeRay)."""
    from ray.util.placement_group import get_current_placement_group

    llm = LLM(path, device="cpu", num_kv_blocks=100, block_size=4, tensor_parallel_size=2,
              distributed_executor_backend="ray")
    try:
        tokens = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
        bundles = [p.bundle_index for p in llm.engine.executor.placement]
    finally:
        llm.shutdown()
    return tokens, bundles, get_current_placement_group().id.hex()


def test_engine_inside_a_placement_group_uses_it(ray_cluster, llama):
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    expected = generate(llama)
    pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="PACK")
    assert pg.wait(30)
    try:
        strategy = PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True)
        task = ray.remote(_engine_in_placement_group).options(num_cpus=0, scheduling_strategy=strategy)
        tokens, bundles, pg_id = ray.get(task.remote(llama), timeout=120)
        assert tokens == expected
        assert sorted(bundles) == [0, 1] and pg_id == pg.id.hex()
        assert ray.util.placement_group_table(pg)["state"] == "CREATED"  # the caller's group outlives the engine
    finally:
        remove_placement_group(pg)


def test_cluster_too_small_fails_at_once_with_the_fix(ray_cluster, llama):
    t = time.monotonic()
    with pytest.raises(ValueError, match=r"num_workers=4 needs 4 nodes with 1 CPU each.*2 node\(s\) alive.*ray start"):
        LLM(llama, device="cpu", tensor_parallel_size=2, pipeline_parallel_size=2, num_workers=4)
    with pytest.raises(ValueError, match=r"8 ranks need 8 CPUs, but the Ray cluster has 4.*ray status"):
        LLM(llama, device="cpu", tensor_parallel_size=4, pipeline_parallel_size=2,
            distributed_executor_backend="ray")
    assert time.monotonic() - t < 30
    assert set(pg_states()) <= {"REMOVED"}


def test_unreachable_ray_address_is_a_clear_error(llama):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.monotonic()
    cmd = [sys.executable, "-m", "shardllm.entrypoints.cli", "generate", llama, "--device", "cpu", "--tp_size", "2",
           "--distributed_executor_backend", "ray", "-p", "hi"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_AUTH_MODE": "disabled"})
    assert r.returncode == 1, r.stderr[-2000:]
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in r.stderr and "ray start --head" in r.stderr
    assert time.monotonic() - t < 60


def test_serve_num_workers_then_a_dead_actor_ends_the_server(ray_cluster, llama):
    from tests.entrypoints.conftest import RemoteServer

    srv = RemoteServer([llama, "--tp_size", "2", "--pp_size", "2", "--num_workers", "2",
                        "--ray_address", ray_cluster.address, "--log_level", "info", "--max_seq_len", "256"])
    try:
        from openai import OpenAI

        client = OpenAI(base_url=srv.url("/v1"), api_key="none", max_retries=0)
        r = client.completions.create(model=llama, prompt=PROMPTS[0], max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
        memory = {labels: v for (name, labels), v in srv.metrics().items()
                  if name == "shardllm_gpu_memory_used_bytes"}
        assert sorted(dict(labels)["rank"] for labels in memory) == ["0", "1", "2", "3"]
        assert all(v > 0 for v in memory.values())
        workers = ray_processes("ray::RayWorker")
        assert len(workers) == 4, workers

        # a long stream (tokens only, no text: the tiny model has no tokenizer, so its chunks may come late); kill
        # one actor (SIGKILL, as the OOM killer would) once the request runs
        body = {"model": llama, "prompt": PROMPTS[2], "max_tokens": 240, "temperature": 0, "ignore_eos": True,
                "stream": True}
        events, ended = [], []

        def consume() -> None:
            with httpx.stream("POST", srv.url("/v1/completions"), json=body, timeout=60) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        events.append(json.loads(line[6:]))
            ended.append(time.monotonic())

        stream = threading.Thread(target=consume, daemon=True)
        stream.start()
        assert wait_until(lambda: srv.metrics()[("shardllm_generation_tokens_total", ())] > 5, 30)
        os.kill(workers[-1], signal.SIGKILL)
        killed_at = time.monotonic()
        stream.join(30)
        assert ended and "error" in events[-1], events[-2:]
        error_at = ended[0]
        assert error_at - killed_at < 10
        assert events[-1]["error"]["type"] == "service_unavailable", events[-1]
        # unhealthy, then the process exits non-zero so that an orchestrator restarts it
        try:
            health = httpx.get(srv.url("/health"), timeout=5).status_code
        except httpx.TransportError:
            health = None  # already stopped listening
        assert health != 200
        assert srv.proc.wait(60) != 0
        assert wait_until(lambda: not ray_processes("ray::RayWorker"), 15), "orphan actors"
        assert set(pg_states()) <= {"REMOVED"}
    finally:
        srv.stop(signal.SIGKILL)


def test_serve_on_ray_stops_cleanly_on_sigterm(ray_cluster, llama):
    from tests.entrypoints.conftest import RemoteServer

    srv = RemoteServer([llama, "--tp_size", "2", "--num_workers", "2", "--ray_address", ray_cluster.address,
                        "--max_seq_len", "256"])
    try:
        r = httpx.post(srv.url("/v1/completions"), timeout=60,
                       json={"model": llama, "prompt": PROMPTS[1], "max_tokens": 4, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert len(ray_processes("ray::RayWorker")) == 2
    finally:
        rc = srv.stop(signal.SIGTERM)
    assert rc == 0, srv.log_tail()
    assert wait_until(lambda: not ray_processes("ray::RayWorker"), 15), "actors left after SIGTERM"
    assert set(pg_states()) <= {"REMOVED"}


def test_losing_a_node_mid_generation_fails_fast_and_cleans_up(ray_cluster, llama):
    """Last in the module: it takes a node away from the shared cluster."""
    llm = LLM(llama, device="cpu", num_kv_blocks=100, block_size=4, tensor_parallel_size=2, num_workers=2)
    ex = llm.engine.executor
    node = next(iter(ray_cluster.worker_nodes))
    lost = [p.pid for p in ex.placement if p.node_id == node.node_id]
    pids = [p.pid for p in ex.placement]
    assert len(lost) == 1
    failed = []

    def generate_until_it_fails() -> None:
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline:
                llm.generate(PROMPTS, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True), use_tqdm=False)
        except Exception as e:  # noqa: BLE001 - the executor's error, checked below
            failed.append((time.monotonic(), e))

    worker = threading.Thread(target=generate_until_it_fails, daemon=True)
    worker.start()
    assert wait_until(lambda: llm.engine.stats.generation_tokens > 10, 30)
    ray_cluster.remove_node(node, allow_graceful=False)
    removed_at = time.monotonic()
    worker.join(30)
    try:
        assert failed, "generation went on without the node"
        assert failed[0][0] - removed_at < 10
        assert type(failed[0][1]).__name__ == "WorkerError", failed[0][1]
    finally:
        llm.shutdown()
    assert wait_until(lambda: not any(map(alive, pids)), 15), "actors left after losing a node"
    assert set(pg_states()) <= {"REMOVED"}
