"""Guards around each GPU test (wired in by tests/conftest.py): end the processes a test left running, and end the
run when a test is stuck where pytest-timeout's SIGALRM cannot reach it (the main thread inside a CUDA/NCCL call).

Linux only (/proc), as the GPU machines are; elsewhere `descendants` finds nothing and the guards do nothing.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time

Proc = tuple[int, int]  # (pid, start time in clock ticks since boot): a pid reused later is another process


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(ppid, start time, state) of `pid` from /proc/<pid>/stat, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = data[data.rfind(")") + 2:].split()  # the command name (field 2) may hold spaces and parentheses
    return int(fields[1]), int(fields[19]), fields[0]  # fields 4, 22 and 3 of proc(5)


def descendants(root: int | None = None) -> set[Proc]:
    """Every live (not zombie) process below `root` (default: this one), children of children included."""
    root = os.getpid() if root is None else root
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return set()
    children: dict[int, list[tuple[int, int, str]]] = {}
    for pid in pids:
        st = _stat(pid)
        if st is not None:
            children.setdefault(st[0], []).append((pid, st[1], st[2]))
    found, todo = set(), [root]
    while todo:
        for pid, start, state in children.get(todo.pop(), []):
            if state != "Z":
                found.add((pid, start))
            todo.append(pid)
    return found


def _alive(proc: Proc) -> bool:
    st = _stat(proc[0])
    return st is not None and st[1] == proc[1] and st[2] != "Z"


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)  # our own child: no zombie left behind (others' children: ECHILD)
    except OSError:
        pass


def end_processes(nodeid: str, procs: set[Proc], grace_s: float = 3.0) -> None:
    """SIGTERM each of `procs` still alive, SIGKILL those alive `grace_s` later; says so on stderr."""
    procs = {p for p in procs if _alive(p)}
    if not procs:
        return
    print(f"\n[gpu_guard] {nodeid} left {len(procs)} process(es) running: ending pids "
          f"{sorted(p[0] for p in procs)}", file=sys.__stderr__, flush=True)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, _ in procs:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            for pid, _ in procs:
                _reap(pid)
            procs = {p for p in procs if _alive(p)}
            if not procs:
                return
            time.sleep(0.05)


def release_gpu_memory() -> None:
    """After each GPU test, hand this process's cached CUDA blocks back, so that the next test's engines (and
    their worker processes, which size the KV cache from the device's free memory) see the whole GPU. After a
    failed test, first drop the traceback pytest keeps in sys.last_*: its frames hold the test's engine."""
    torch = sys.modules.get("torch")
    if hasattr(sys, "last_value"):
        for name in ("last_type", "last_value", "last_traceback", "last_exc"):
            if hasattr(sys, name):
                delattr(sys, name)
        from shardllm.utils import release_memory

        release_memory()  # collects what start-up froze, then empties the cache
    elif torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class HardTimeout:
    """Ends the whole run if a test outlives `seconds`: dumps every thread's stack, ends the processes the test
    started, exits with code 3. Armed at the test's timeout plus a grace, so it only fires when pytest-timeout's
    signal could not interrupt the test (a Python signal handler waits for the blocking C call to return)."""

    EXIT_CODE = 3

    def __init__(self, nodeid: str, seconds: float, before: set[Proc], capture_manager=None):
        self.nodeid, self.seconds, self.before, self.capman = nodeid, seconds, before, capture_manager
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"gpu_guard {nodeid}", daemon=True)

    def start(self) -> HardTimeout:
        self._thread.start()
        return self

    def cancel(self) -> None:
        self._cancelled.set()

    def _run(self) -> None:
        # SIGALRM (pytest-timeout's) must reach the main thread: delivered to this one, it would not interrupt
        # the main thread's blocking system call, and the test would not fail until that call returned
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        if not self._cancelled.wait(self.seconds):
            self._fire()

    def _fire(self) -> None:
        if self.capman is not None:  # pytest's fd capture would swallow what follows: os._exit skips its report
            try:
                self.capman.suspend_global_capture(in_=True)
            except Exception:
                pass
        err = sys.__stderr__
        print(f"\n[gpu_guard] HARD TIMEOUT: {self.nodeid} still running {self.seconds:.0f} s after it started and "
              f"its timeout signal did not stop it (stuck in a CUDA/NCCL call?). Stacks:", file=err, flush=True)
        faulthandler.dump_traceback(file=err, all_threads=True)
        end_processes(self.nodeid, descendants() - self.before)
        print(f"[gpu_guard] ending the run (exit code {self.EXIT_CODE}) after {self.nodeid}", file=err, flush=True)
        os._exit(self.EXIT_CODE)
