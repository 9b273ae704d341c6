"""One worker process per rank on this host; the driver (scheduler) process runs no rank itself.

Each step the driver pickles the plan once and writes it to every worker's pipe; the output rank
(tp rank 0 of the last stage) answers with the sampled tokens. The driver never blocks inside a
collective, so a worker that dies (its process sentinel fires) or hangs (no answer within the step
timeout) turns into an error here within seconds, and the other workers are stopped.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections import defaultdict, deque
from multiprocessing.connection import Connection, wait

import torch

from shardllm import envs
from shardllm.executor.base import Executor
from shardllm.step_io import ModelRunnerOutput, SchedulerOutput
from shardllm.worker.model_runner import is_ready, resolve

logger = logging.getLogger(__name__)

STEP_TIMEOUT_S = envs.SHARDLLM_STEP_TIMEOUT  # debugging knob
INIT_TIMEOUT_S = envs.SHARDLLM_INIT_TIMEOUT
# Output rank: while its oldest launched step runs, look for the next plan every _POLL_S (see _worker_main).
_WAIT_FOR_PLANS = envs.SHARDLLM_WORKER_WAIT_FOR_PLANS
_POLL_S = 1e-4


def _wait_for_plan(conn: Connection, timeout: float) -> None:
    """Return when `conn` has a message or after `timeout` s. Not conn.poll(timeout): poll(2) rounds it up to a
    whole millisecond (measured: 1.09 ms per conn.poll(1e-4)), which would hold a finished step's answer that long."""
    try:
        select.select([conn], [], [], timeout)
    except ValueError:  # a descriptor past select's FD_SETSIZE
        conn.poll(timeout)


class WorkerError(RuntimeError):
    """A worker process failed, died or stopped answering; the executor is unusable afterwards."""


class MultiprocExecutor(Executor):
    def initialize(self) -> int:
        self._init_messaging()
        # The rendezvous store lives in this process, which outlives the workers: a rank that exits first never
        # pulls it from under the others (NCCL's watchdog polls it until its process group is destroyed).
        import torch.distributed as dist

        self._store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        init_method = f"store://127.0.0.1:{self._store.port}"
        threads = 0
        if self.config.device == "cpu":
            threads = max(1, (os.cpu_count() or 1) // self.world_size)
        # Workers are fresh interpreters (`python -m`), not multiprocessing children: nothing of the user's
        # __main__ is re-imported, and CUDA is never initialised before a fork. A socket pair is the pipe.
        self.conns, self.procs = [], []
        for rank in range(self.world_size):
            ours, theirs = socket.socketpair()
            fd = theirs.fileno()
            p = subprocess.Popen([sys.executable, "-m", "shardllm.executor.multiproc", "--fd", str(fd),
                                  "--parent_pid", str(os.getpid())], pass_fds=(fd,))
            theirs.close()
            conn = Connection(ours.detach())
            conn.send((self.config, rank, rank, init_method, threads))
            self.conns.append(conn)
            self.procs.append(p)
        return self._load_and_size_kv_cache()

    def _init_messaging(self) -> None:
        """The driver-side state of the messaging below (the Ray executor shares it)."""
        pc = self.config.parallel_config
        self.world_size = pc.world_size
        self.output_rank = (pc.pipeline_parallel_size - 1) * pc.tensor_parallel_size
        self.dead: str | None = None
        self.plan_send_s = 0.0  # time spent pickling and writing plans, for the overhead measurement
        self.num_steps = 0
        self._inbox: defaultdict[tuple[int, str], list] = defaultdict(list)  # (rank, kind) -> answers

    def _load_and_size_kv_cache(self) -> int:
        """Once every worker has its start-up message: wait for the model on every rank, then size and allocate
        the KV cache (the smallest rank's block count); returns the number of blocks."""
        self._collect_all(INIT_TIMEOUT_S)  # model loaded on every rank
        num_blocks = min(self._call_all("determine_num_blocks", timeout=INIT_TIMEOUT_S))
        self._call_all("initialize_kv_cache", num_blocks)
        return num_blocks

    # ---- messaging -------------------------------------------------------------------------------------------
    def _send_all(self, method: str, *args) -> None:
        self._check_alive()
        data = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            for c in self.conns:
                c.send_bytes(data)
        except (BrokenPipeError, OSError) as e:
            self._fail(f"cannot reach a worker: {e}")

    def _call_all(self, method: str, *args, timeout: float = STEP_TIMEOUT_S) -> list:
        self._send_all(method, *args)
        return self._collect_all(timeout)

    def _collect_all(self, timeout: float) -> list:
        return [self._receive(rank, timeout) for rank in range(self.world_size)]

    def _receive(self, rank: int, timeout: float, kind: str = "ok"):
        """Wait for `rank`'s answer of `kind` ("step": a step's tokens, "ok": any other call's result) while
        watching every worker for an error or an exit; answers that come first wait in an inbox."""
        if self._inbox[(rank, kind)]:
            return self._inbox[(rank, kind)].pop(0)
        deadline = time.monotonic() + timeout
        watched = {self.conns[rank]: rank}
        for r, c in enumerate(self.conns):
            watched.setdefault(c, r)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self._fail(f"worker rank {rank} did not answer within {timeout:.0f}s (hung?)")
            ready = wait(list(watched), timeout=min(left, 0.25))
            if not ready:
                for r, p in enumerate(self.procs):
                    if p.poll() is not None:
                        self._fail(f"worker rank {r} died (exit code {p.returncode})")
            for obj in ready:
                if obj in watched:
                    r = watched[obj]
                    try:
                        status, payload = obj.recv()
                    except (EOFError, OSError):
                        self._fail(f"worker rank {r} died (exit code {self._exit_code(r)})")
                    if status == "err":
                        exc, tb = payload
                        self._fail(f"worker rank {r} failed:\n{tb}", exc)
                    if r == rank and status == kind:
                        return payload
                    self._inbox[(r, status)].append(payload)  # another answer: keep it for its turn

    def _exit_code(self, rank: int) -> int | None:
        try:
            return self.procs[rank].wait(1.0)
        except subprocess.TimeoutExpired:
            return None

    def _check_alive(self) -> None:
        if self.dead is not None:
            raise WorkerError(self.dead)

    def _fail(self, reason: str, exc: BaseException | None = None):
        self.dead = reason
        self.shutdown()
        if isinstance(exc, ValueError):  # configuration errors keep their type and message
            raise exc
        raise WorkerError(reason)

    # ---- the executor interface ------------------------------------------------------------------------------
    def submit(self, scheduler_output: SchedulerOutput) -> None:
        t = time.perf_counter()
        self._send_all("execute_model", scheduler_output)
        self.plan_send_s += time.perf_counter() - t
        self.num_steps += 1

    def collect(self) -> ModelRunnerOutput:
        # the output rank answers steps in the order they were sent
        return self._receive(self.output_rank, STEP_TIMEOUT_S, kind="step")

    def memory_in_use(self) -> list[int]:
        return self._call_all("memory_in_use")

    def memory_report(self) -> list[dict[str, int]]:
        return self._call_all("memory_report")

    def expert_load(self) -> dict[tuple[int, int], int]:
        return self._call_all("expert_load")[0]

    def start_step_profile(self, num_steps: int, tag: str | None = None) -> None:
        self._call_all("start_step_profile", num_steps, tag)  # between the same two plans on every rank

    def step_profile(self) -> list[dict | None]:
        return self._call_all("step_profile")

    def check_health(self) -> None:
        """Raise WorkerError if a worker process has exited (cheap: one waitpid each). The AsyncLLM calls it every
        engine-loop turn, idle or not, so a worker killed while idle is noticed within a second; the caller then
        shuts the executor down (after telling its clients: that wait is up to 5 s)."""
        self._check_alive()
        for r, p in enumerate(self.procs):
            if p.poll() is not None:
                self.dead = f"worker rank {r} died (exit code {p.returncode})"
                raise WorkerError(self.dead)

    def shutdown(self) -> None:
        procs = getattr(self, "procs", [])
        for c in getattr(self, "conns", []):
            try:
                c.send_bytes(pickle.dumps(("shutdown", ())))
            except Exception:
                pass
        deadline = time.monotonic() + 5
        for r, p in enumerate(procs):
            try:
                p.wait(max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                try:  # a Ray actor on a lost node may not confirm in time: the rest must still be stopped
                    p.wait(2)
                except subprocess.TimeoutExpired:
                    logger.warning("worker rank %d did not confirm its exit within 2 s of being killed", r)
        for c in getattr(self, "conns", []):
            c.close()
        self.procs, self.conns = [], []
        self._store = None  # the workers are gone: the rendezvous store may close
        if self.dead is None:
            self.dead = "the executor was shut down"


def _watch_parent(parent_pid: int) -> None:
    """Exit when the driver is gone, even if the main thread is stuck in a collective."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(1)


def _worker_main(conn: Connection, parent_pid: int) -> None:
    from shardllm.distributed.parallel_state import destroy_distributed, init_distributed
    from shardllm.worker.worker import Worker

    # A terminal's Ctrl-C reaches the whole process group: the driver decides how to stop (a server drains its
    # requests first) and tells the workers; a worker interrupted mid-step would fail every request in flight.
    if threading.current_thread() is threading.main_thread():  # a Ray actor runs this in one of its threads
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    config, rank, local_rank, init_method, threads = conn.recv()
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    if threads:
        torch.set_num_threads(threads)
    pc = config.parallel_config

    def reply_error(e: BaseException) -> None:
        try:
            pickle.dumps(e)
        except Exception:
            e = RuntimeError(str(e))
        conn.send(("err", (e, traceback.format_exc())))

    try:
        worker = Worker(config, rank, local_rank)
        worker.init_device()
        backend = "nccl" if config.device == "cuda" else "gloo"
        init_distributed(rank, pc.world_size, pc.tensor_parallel_size, pc.pipeline_parallel_size,
                         pc.expert_parallel_size, backend, init_method,
                         worker.device if backend == "nccl" else None, pc.pp_partition)
        worker.init_fast_all_reduce()
        worker.load_model()
        conn.send(("ok", None))
    except BaseException as e:
        reply_error(e)
        return
    from shardllm.distributed.parallel_state import get_parallel_context

    is_output = get_parallel_context().is_output_rank
    # The output rank launches a step and answers once the device has its tokens (also with synchronous
    # scheduling, where a pipeline keeps several steps in flight); the earlier behaviour for A/B runs: block in
    # the step (synchronous scheduling) or on the oldest launched step (async), SHARDLLM_WORKER_WAIT_FOR_PLANS=0.
    lazy = config.scheduler_config.async_scheduling or _WAIT_FOR_PLANS
    launched: deque = deque()  # output rank: steps launched whose tokens are not yet sent
    frozen = False
    try:
        while True:
            # A launched step's tokens go back as soon as the device has them, but a plan that arrives first is
            # launched first: blocking on the oldest step here would leave the device idle while the next plan
            # waits in the pipe (the driver sends it only after digesting the step before: profiled at tp = 2 as
            # 0.7 ms of idle GPU per batch-1 step, docs/benchmarks.md).
            if launched and not conn.poll(0):
                if is_ready(launched[0]) or not _WAIT_FOR_PLANS:
                    try:
                        conn.send(("step", resolve(launched.popleft())))
                    except BaseException as e:
                        reply_error(e)
                        break
                else:
                    _wait_for_plan(conn, _POLL_S)  # wakes at once on a plan; else look at the device again
                continue
            try:
                method, args = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                break
            if method == "shutdown":
                break
            if method == "execute_model" and not frozen:  # start-up is over: keep its objects out of GC passes
                from shardllm.utils import freeze_startup_objects

                freeze_startup_objects()
                frozen = True
            try:
                if method == "execute_model":
                    result = worker.execute_model(*args, wait=not lazy)
                else:
                    result = getattr(worker, method)(*args)
            except BaseException as e:
                reply_error(e)
                break
            if method != "execute_model":
                conn.send(("ok", result))
            elif is_output and lazy:
                launched.append(result)
            elif is_output:
                conn.send(("step", result))
    finally:
        try:
            destroy_distributed()
        except Exception:
            pass
        conn.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="a shardllm worker process (started by the multiproc executor)")
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--parent_pid", type=int, required=True)
    a = ap.parse_args()
    _worker_main(Connection(a.fd), a.parent_pid)
