"""One Ray actor per rank, on any number of nodes; the engine sees the same Executor as multiproc.

Ray places, starts, supervises and stops the workers; it does not carry the step plans. Each actor runs
the multiproc worker loop (`multiproc._worker_main`) over an authenticated TCP connection to the driver
(`multiprocessing.connection`, HMAC challenge with a random key that travels in the actor call), so a
step costs what it costs with multiproc: the plan pickled once and written to every rank's socket, no
Ray call per step. The driver also hosts the rendezvous TCPStore, on its Ray node IP and a port the OS
picks, so every node reaches both through the address Ray itself uses.

Placement (ranks are `pp_rank * tp + tp_rank`; a TP group should live on one node, stages span nodes):

    num_workers=None:  world_size bundles {"GPU": 1} ({"CPU": 1} on CPU), PACK
    num_workers=N:     N bundles {"GPU": world_size / N}, STRICT_SPREAD (N distinct nodes: the guide's layout)
    inside a placement group (Ray Serve, KubeRay): that group, as it is

Bundles are ordered by node (the driver's node first, then by node id) and ranks fill them in order, so
the ranks of a node are consecutive. Every wait on Ray has a timeout and fails with what to change.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import Client, Listener

from shardllm import envs
from shardllm.config import EngineConfig
from shardllm.executor.multiproc import INIT_TIMEOUT_S, MultiprocExecutor, WorkerError
from shardllm.executor.ray_connect import connect

logger = logging.getLogger(__name__)

PG_TIMEOUT_S = envs.SHARDLLM_RAY_PG_TIMEOUT  # resources busy: how long to wait
WATCH_INTERVAL_S = 1.0  # how often the watcher looks at the actors' long-running calls
# Environment the workers inherit from the driver (the driver's value wins on every node).
ENV_PREFIXES = ("SHARDLLM_", "NCCL_", "GLOO_", "TORCH_", "NVSHMEM_", "HF_", "HUGGING_FACE_", "TRANSFORMERS_",
                "TOKENIZERS_", "CUDA_LAUNCH_BLOCKING", "PYTHONHASHSEED")
ENV_NEVER = frozenset({"CUDA_VISIBLE_DEVICES", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                       "SHARDLLM_HOST"})


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ValueError("distributed_executor_backend='ray' (or num_workers) needs Ray: "
                         "`pip install 'shardllm[ray]'`") from None
    return ray


def env_to_copy(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The driver's variables that travel to every worker: names starting with ENV_PREFIXES, plus the names
    listed in SHARDLLM_RAY_ENV_VARS (comma-separated); never device, rank or rendezvous variables."""
    environ = os.environ if environ is None else environ
    extra = set(envs.get("SHARDLLM_RAY_ENV_VARS", environ))
    return {k: v for k, v in environ.items()
            if (k.startswith(ENV_PREFIXES) or k in extra) and k not in ENV_NEVER}


def sorted_gpu_ids(ids) -> list[int]:
    """Ray's accelerator ids as ints in numeric order (as strings, "10" would sort before "2")."""
    return sorted(int(i) for i in ids)


def describe_error(e: BaseException | None) -> str:
    """One line for a log or an HTTP error. Ray's actor errors have an empty repr and a str of a dozen lines:
    keep its first sentence and the worker's exit detail."""
    if e is None:
        return "no error"
    text = " ".join(str(e).split())
    if not text:
        return repr(e)
    first = text.split(". ", 1)[0].rstrip(".")
    detail = re.search(r"Worker exit detail: (.+?)\.(?: |$)", text)
    return f"{type(e).__name__}: {first}" + (f" ({detail.group(1)})" if detail else "")


@dataclass(frozen=True)
class RankPlacement:
    """Where one rank runs."""

    rank: int
    bundle_index: int
    node_id: str
    node_ip: str
    pid: int = 0
    gpu_ids: tuple[int, ...] = ()  # Ray's ids of this rank's GPUs on its node (empty on CPU)


def assign_ranks(bundle_nodes: list[str], bundle_units: list[int], world_size: int,
                 first_node: str | None = None) -> list[tuple[int, str]]:
    """(bundle index, node id) of each rank: bundles grouped by node (`first_node` first, then node ids in
    order), each bundle holding `units` ranks, ranks filling them in order.

    >>> assign_ranks(["b", "a", "b", "a"], [1, 1, 1, 1], 4, first_node="b")
    [(0, 'b'), (2, 'b'), (1, 'a'), (3, 'a')]
    """
    order = sorted(range(len(bundle_nodes)), key=lambda i: (bundle_nodes[i] != first_node, bundle_nodes[i], i))
    slots = [(i, bundle_nodes[i]) for i in order for _ in range(int(bundle_units[i]))]
    if len(slots) < world_size:
        raise ValueError(f"the placement group holds {len(slots)} ranks, {world_size} are needed "
                         "(tp_size x pp_size): give it more bundles or lower tp_size/pp_size")
    return slots[:world_size]


class RayWorker:
    """The Ray actor behind one rank (wrapped by `ray.remote` at start; threaded, so `getenv` answers while
    `run` serves)."""

    def info(self) -> dict:
        import ray

        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
                "gpu_ids": [str(i) for i in ctx.get_accelerator_ids().get("GPU", [])],
                "num_cpus": os.cpu_count() or 1}

    def getenv(self, name: str) -> str | None:
        return os.environ.get(name)

    def run(self, rank: int, address: tuple[str, int], authkey: bytes, cuda_visible_devices: str | None) -> None:
        """Serve the rank's steps until the driver says stop or goes away (the multiproc worker loop)."""
        if cuda_visible_devices is not None:  # all this node's engine GPUs, before torch first touches CUDA
            os.environ["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
        from shardllm.executor.multiproc import _worker_main

        conn = Client(address, authkey=authkey)
        conn.send(rank)
        _worker_main(conn, os.getppid())  # exits too if the raylet (its parent) dies


class _ActorProcess:
    """A rank's actor seen as a process (poll, wait, kill, returncode) by the multiproc messaging code:
    its `run` call returns when the worker loop ends and fails when the actor or its node dies."""

    def __init__(self, ray, actor, ref, rank: int):
        self._ray, self.actor, self.ref, self.rank = ray, actor, ref, rank
        self.returncode: int | None = None
        self.error: BaseException | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            ready, _ = self._ray.wait([self.ref], timeout=0)
            if ready:
                self._finish()
        return self.returncode

    def _finish(self) -> None:
        try:
            self._ray.get(self.ref, timeout=5)
            self.returncode = 0
        except Exception as e:  # noqa: BLE001 - RayActorError, ActorDiedError, a task error: all mean gone
            self.error = e
            self.returncode = 1

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            ready, _ = self._ray.wait([self.ref], timeout=timeout)
            if not ready:
                raise subprocess.TimeoutExpired(f"ray actor of rank {self.rank}", timeout)
            self._finish()
        return self.returncode

    def kill(self) -> None:
        try:
            self._ray.kill(self.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass


class RayExecutor(MultiprocExecutor):
    """Ranks as Ray actors. Selected by distributed_executor_backend='ray', num_workers or ray_address."""

    def __init__(self, config: EngineConfig):
        super().__init__(config)
        self._ray = None
        self._started_ray = False
        self._pg = None
        self._own_pg = False
        self._listener: Listener | None = None
        self._stopping = threading.Event()
        self.procs, self.conns = [], []
        self.placement: list[RankPlacement] = []

    # ---- start -----------------------------------------------------------------------------------------------
    def initialize(self) -> int:
        try:
            return self._initialize()
        except BaseException:
            self.shutdown()
            raise

    def _initialize(self) -> int:
        pc = self.config.parallel_config
        self._init_messaging()
        ray = self._ray = _import_ray()
        t0 = time.monotonic()
        self._started_ray = connect(pc.ray_address, pc.num_workers)
        on_gpu = self.config.device == "cuda"
        key = "GPU" if on_gpu else "CPU"
        self._pg, self._own_pg = self._placement_group(key)
        table = ray.util.placement_group_table(self._pg)
        bundles = self._pg.bundle_specs
        nodes = [table["bundles_to_node_id"][i] for i in range(len(bundles))]
        units = [int(b.get(key, 0)) for b in bundles]  # ranks a bundle holds (a caller's CPU-only bundle: none)
        driver_node = ray.get_runtime_context().get_node_id()
        slots = assign_ranks(nodes, units, self.world_size, first_node=driver_node)

        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        actor_cls = ray.remote(RayWorker)
        env = env_to_copy()
        actors = []
        for bundle_index, _ in slots:
            strategy = PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=bundle_index)
            actors.append(actor_cls.options(
                num_cpus=0 if on_gpu else 1, num_gpus=1 if on_gpu else 0, max_concurrency=2,
                scheduling_strategy=strategy, runtime_env={"env_vars": env}).remote())
        self._actors = actors
        infos = self._ray_get([a.info.remote() for a in actors], max(PG_TIMEOUT_S, 60),
                              "start the worker actors (SHARDLLM_RAY_PG_TIMEOUT sets the wait)")
        self.placement = [RankPlacement(r, slots[r][0], i["node_id"], i["node_ip"], i["pid"],
                                        tuple(sorted_gpu_ids(i["gpu_ids"]))) for r, i in enumerate(infos)]
        self._check_tp_locality()
        logger.info("ray: %d actors up in %.1fs; (rank, node ip, node id, pid): %s", self.world_size,
                    time.monotonic() - t0, [(p.rank, p.node_ip, p.node_id[:8], p.pid) for p in self.placement])

        # Rendezvous and plan channel, both hosted here on the driver's Ray node IP (ports chosen by the OS).
        import torch.distributed as dist

        host = ray.util.get_node_ip_address()
        self._store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False)
        init_method = f"store://{host}:{self._store.port}"
        authkey = secrets.token_bytes(32)
        self._listener = Listener((host, 0), authkey=authkey)
        address = self._listener.address
        ranks_per_ip = Counter(p.node_ip for p in self.placement)
        node_gpus: dict[str, set[int]] = {}
        for p in self.placement:
            node_gpus.setdefault(p.node_id, set()).update(p.gpu_ids)
        procs = []
        for p, actor in zip(self.placement, actors):
            cvd = local_rank = None
            if on_gpu:
                gpus = sorted(node_gpus[p.node_id])
                cvd, local_rank = ",".join(map(str, gpus)), gpus.index(p.gpu_ids[0])
            procs.append((p, actor, actor.run.remote(p.rank, address, authkey, cvd), local_rank))
        self.procs = [_ActorProcess(ray, actor, ref, p.rank) for p, actor, ref, _ in procs]
        by_rank = {}
        for conn in self._accept_all(INIT_TIMEOUT_S):  # each worker first says which rank it is
            by_rank[conn.recv()] = conn
        self.conns = [by_rank[r] for r in range(self.world_size)]
        for (p, _, _, local_rank), conn in zip(procs, self.conns):
            threads = 0 if on_gpu else max(1, infos[p.rank]["num_cpus"] // ranks_per_ip[p.node_ip])
            conn.send((self.config, p.rank, local_rank or 0, init_method, threads))
        self._watcher = threading.Thread(target=self._watch, name="shardllm-ray-watch", daemon=True)
        self._watcher.start()
        num_blocks = self._load_and_size_kv_cache()
        logger.info("ray: workers connected, the model loaded and the KV cache sized in %.1fs",
                    time.monotonic() - t0)
        return num_blocks

    def _placement_group(self, key: str):
        """(placement group, whether we made it): the current one when we run inside one, else a new one."""
        ray = self._ray
        from ray.util.placement_group import get_current_placement_group, placement_group

        pc = self.config.parallel_config
        pg = get_current_placement_group()
        if pg is not None:
            logger.info("ray: using the placement group this engine was started in (%d bundles)",
                        len(pg.bundle_specs))
            return pg, False
        n = pc.num_workers
        check_cluster(ray, key, self.world_size, n, pc.ray_address)
        if n:
            bundles, strategy = [{key: self.world_size // n}] * n, "STRICT_SPREAD"
        else:
            bundles, strategy = [{key: 1}] * self.world_size, "PACK"
        pg = placement_group(bundles, strategy=strategy)
        try:
            ready = _wait_placement_group(ray, pg, PG_TIMEOUT_S)
        except BaseException:  # Ctrl-C (the slices let it through): a pending group would take the units later
            _remove_placement_group(pg)
            raise
        if not ready:
            _remove_placement_group(pg)
            raise ValueError(f"Ray could not reserve {bundles} ({strategy}) within {PG_TIMEOUT_S:.0f}s: "
                             f"{cluster_summary(ray, key)}. Free the {key}s other jobs hold, add nodes, or lower "
                             "tp_size/pp_size (`ray status` shows the cluster; SHARDLLM_RAY_PG_TIMEOUT sets the wait)")
        return pg, True

    def _check_tp_locality(self) -> None:
        tp = self.config.parallel_config.tensor_parallel_size
        for start in range(0, self.world_size, tp):
            nodes = {p.node_id for p in self.placement[start:start + tp]}
            if len(nodes) > 1:
                logger.warning("ray: the tp group of ranks %d-%d spans %d nodes (all-reduce over the network): "
                               "give each node a multiple of tp_size=%d %ss", start, start + tp - 1, len(nodes), tp,
                               "GPU" if self.config.device == "cuda" else "CPU")

    def _ray_get(self, refs, timeout: float, what: str):
        ray = self._ray
        try:
            return ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise WorkerError(f"ray: could not {what} within {timeout:.0f}s") from None
        except ray.exceptions.RayError as e:
            raise WorkerError(f"ray: could not {what}: {e}") from None

    def _accept_all(self, timeout: float) -> list:
        """Each rank's connection; fails as soon as an actor's run() ends (it died or could not connect)."""
        conns: list = []
        errors: list[BaseException] = []

        def accept() -> None:
            try:
                while len(conns) < self.world_size:
                    conns.append(self._listener.accept())
            except BaseException as e:  # noqa: BLE001 - the listener closed, or a bad handshake
                errors.append(e)

        t = threading.Thread(target=accept, daemon=True)
        t.start()
        deadline = time.monotonic() + timeout
        while t.is_alive():
            t.join(0.2)
            for p in self.procs:
                if p.poll() is not None:
                    raise WorkerError(f"ray: the actor of rank {p.rank} ended before connecting: "
                                      f"{describe_error(p.error)}")
            if time.monotonic() > deadline:
                raise WorkerError(f"ray: {len(conns)} of {self.world_size} workers connected within {timeout:.0f}s")
        if errors:
            raise WorkerError(f"ray: a worker could not connect to the driver: {errors[0]!r}")
        return conns

    # ---- failure ---------------------------------------------------------------------------------------------
    def _watch(self) -> None:
        """Notice an actor (or its node) dying while the engine is idle: mark the executor dead and stop the
        other actors, so none is left blocked in a collective. The engine sees it at its next call."""
        ray = self._ray
        refs = {p.ref: p for p in self.procs}
        while not self._stopping.is_set():
            try:
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=WATCH_INTERVAL_S)
            except Exception:  # noqa: BLE001 - Ray is shutting down
                return
            if ready and not self._stopping.is_set():
                p = refs[ready[0]]
                p.poll()
                reason = (f"ray: the actor of rank {p.rank} on node {self.placement[p.rank].node_ip} ended: "
                          f"{describe_error(p.error)}" if p.error else f"ray: the worker loop of rank {p.rank} ended")
                if self.dead is None:
                    self.dead = reason
                logger.error("%s; stopping the other workers", reason)
                for q in self.procs:
                    q.kill()
                return

    def check_health(self) -> None:
        """Raise WorkerError once the watcher saw an actor end (no Ray call here: the engine calls it every step)."""
        self._check_alive()

    def worker_env(self, name: str) -> list[str | None]:
        """The value of environment variable `name` in each rank's process (what travelled with the workers)."""
        return self._ray_get([a.getenv.remote(name) for a in self._actors], 30, "read the workers' environment")

    # ---- stop ------------------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        self._stopping.set()
        super().shutdown()  # asks each worker loop to stop; kills the actors that do not within 5 s
        ray = self._ray
        if ray is None:
            return
        for a in getattr(self, "_actors", []):
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self._actors = []
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._pg is not None and self._own_pg:
            _remove_placement_group(self._pg)
        self._pg = None
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
        self._started_ray = False


PG_WAIT_SLICE_S = 0.5  # one wait on a placement group: a signal (Ctrl-C) is handled between two


def _wait_placement_group(ray, pg, timeout: float) -> bool:
    """Whether `pg` is placed within `timeout` s. Not pg.wait(timeout): that blocks in Ray's C++ client and
    holds back Ctrl-C (KeyboardInterrupt) until it returns, up to the whole SHARDLLM_RAY_PG_TIMEOUT."""
    ref = pg.ready()
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        ready, _ = ray.wait([ref], timeout=max(0.0, min(PG_WAIT_SLICE_S, left)))
        if ready:
            return True
        if left <= PG_WAIT_SLICE_S:
            return False


def _remove_placement_group(pg) -> None:
    from ray.util.placement_group import remove_placement_group

    try:
        remove_placement_group(pg)
    except Exception:  # noqa: BLE001 - Ray is gone, or the group already is
        pass


def cluster_summary(ray, key: str) -> str:
    """Each alive node's id, IP and units of `key` (part of what `ray status` tells)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    parts = [f"node {n['NodeID'][:8]} ({n['NodeManagerAddress']}) has {n['Resources'].get(key, 0):g} {key}"
             for n in nodes]
    return f"{len(nodes)} node(s) alive: " + "; ".join(parts)


def check_cluster(ray, key: str, world_size: int, num_workers: int | None, address: str | None) -> None:
    """Fail at once, naming what is missing, when the cluster cannot hold the ranks at all."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    where = f"the Ray cluster at {address}" if address else "the Ray cluster"
    if num_workers:
        per_node = world_size // num_workers
        fit = [n for n in nodes if n["Resources"].get(key, 0) >= per_node]
        if len(fit) < num_workers:
            raise ValueError(
                f"num_workers={num_workers} needs {num_workers} nodes with {per_node} {key} each "
                f"({world_size} ranks / {num_workers} nodes), but {where} has {len(fit)} such node(s): "
                f"{cluster_summary(ray, key)}. Start the missing nodes with `ray start --address=<head>:6379` "
                f"(check `ray status`), or lower num_workers / tp_size / pp_size")
        return
    total = sum(n["Resources"].get(key, 0) for n in nodes)
    if total < world_size:
        raise ValueError(f"tp_size x pp_size = {world_size} ranks need {world_size} {key}s, but {where} has "
                         f"{total:g}: {cluster_summary(ray, key)}. Add nodes with `ray start --address=<head>:6379` "
                         "(check `ray status`), or lower tp_size / pp_size")
