"""The engine process: an LLMEngine stepping in a process of its own, for the server (SHARDLLM_ENGINE_PROCESS, on).

In one process the HTTP front end and the engine's step share one GIL; at the GPU's rate the server spent ~44% of
it on streamed responses and ~37% in the engine (twenty-second session's profile, docs/benchmarks.md), and
delivered a third of the offline rate. Here the engine (scheduler, executor, detokenizer) has a core of its own and
the front end (engine/async_mp.py) only HTTP: vLLM V1's split of API server and EngineCore.

    front end                                   engine process (this module)
    ("add", id, seq, payload)      ─────Pipe──> add_request (payload: the pickled prompt, params, arrival time)
    ("abort", [ids]) / ("stop",)   ─────Pipe──> abort_request / abort all, last gauges, shut down
                                   <────Pipe─── ("ready", info) | ("failed", error)     once, at start
                                   <────Pipe─── ("step", [RequestDelta], EngineSnapshot | None,
                                                 LatencyHistograms.state() | None)   a step
                                   <────Pipe─── ("reject", id, seq, error)   add_request refused it
                                   <────Pipe─── ("dead", error)   a step failed: the engine has stopped

A step sends what each request gained since its last message, not its whole text (an output per request per step
carrying everything so far is O(tokens^2) to pickle): a RequestDelta per request that progressed, a SeqDelta per
sequence; the common case (one sequence, no logprobs, neither its first nor its last delta) a plain tuple
(make_step_delta). The engine process ignores SIGINT (a terminal's Ctrl-C reaches the whole process group; the front end
stops it) and ends when the front end's end of the pipe closes.

Several API servers (`shardllm serve --api_server_count N`, vLLM's --api-server-count): the engine has a pipe to
each; the server's main process is the first (its "stop" or its pipe's end stops the engine), each other one says
("hello",) when it listens and ("detach",) when it stops. A request's deltas go to the API server that added it;
the gauges and the latency histograms (kept here, so every API server's /metrics counts every request) go to all.
"""

from __future__ import annotations

import logging
import multiprocessing.connection as mp_connection
import os
import pickle
import queue
import signal
import threading
import time
from dataclasses import dataclass

from shardllm.config import EngineConfig
from shardllm.engine.detokenizer import make_prompt_logprobs, visible_text
from shardllm.engine.llm_engine import LLMEngine, _parent_metrics
from shardllm.engine.request import RequestStatus
from shardllm.metrics import EngineSnapshot, LatencyHistograms
from shardllm.outputs import RequestMetrics

logger = logging.getLogger(__name__)

_RUNNING, _WAITING, _PREEMPTED = RequestStatus.RUNNING, RequestStatus.WAITING, RequestStatus.PREEMPTED
_SNAPSHOT_S = 0.05  # a busy engine sends its gauges at most this often (and with every step where a request ends)
# An API server that takes none of the engine's messages for this long is detached (its requests aborted; it then
# sees its pipe end and exits, and the server's main process stops the whole server).
API_SERVER_STALL_S = 30.0


@dataclass
class SeqDelta:
    """What one sequence (of a request's n) gained since the last message. `text`: visible text to append, or the
    whole visible text when `reset` (it shrank, which the detokenizer does not do, but the front end must not
    show a wrong text if it ever did). `logprobs`: per new token, {token id: logprob} (the front end makes the
    Logprob objects and decodes them only where read)."""

    index: int
    text: str
    reset: bool
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None
    logprobs: list[dict[int, float]] | None
    error: str | None


@dataclass
class RequestDelta:
    request_id: str
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int
    seqs: list[SeqDelta]
    prompt_logprobs: list[dict[int, float] | None] | None = None  # once, in the first delta that has them
    seq: int | None = None  # the front end's number of this use of request_id (a reused id's old deltas are dropped)
    num_output_tokens: int = 0  # when finished: its longest sequence's output tokens (for the TPOT histogram)


def portable_error(e: BaseException) -> BaseException:
    """`e` if it pickles (ValueError, the workers' errors), else a RuntimeError with its type and message."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


def _raw_logprobs(entries) -> list[dict[int, float]]:
    return [{t: lp.logprob for t, lp in d.items()} for d in entries]


class _Sent:
    """How much of a sequence the front end has: characters of visible text, tokens, logprob entries."""

    __slots__ = ("text", "tokens", "logprobs", "prompt_logprobs")

    def __init__(self):
        self.text = self.tokens = self.logprobs = 0
        self.prompt_logprobs = False


def make_step_delta(engine, parent_id: str, seq: int | None) -> tuple | None:
    """The common step's delta, as a plain tuple (a tenth of the time of a RequestDelta to build and pickle, for
    ~1,000 running requests a step): (request id, seq, text to append, new token ids) for a running request of one
    sequence without logprobs whose first delta was sent and whose visible text did not shrink; None otherwise
    (make_delta's RequestDelta then)."""
    children = engine.sequences_of(parent_id)
    if not children or len(children) != 1:
        return None
    c = children[0]
    sent = c.__dict__.get("_sent")
    status = c.status  # (identity tests: an Enum's hash is a Python-level call)
    if (sent is None or c.logprobs is not None
            or not (status is _RUNNING or status is _WAITING or status is _PREEMPTED)
            or (c.prompt_logprobs is not None and not sent.prompt_logprobs)):
        return None
    text = visible_text(c) if c.sampling_params.stop else c.output_text
    if len(text) < sent.text:
        return None
    ids, start = c.token_ids, c.num_prompt_tokens + sent.tokens
    delta_text = text[sent.text:] if len(text) > sent.text else ""
    sent.text, sent.tokens = len(text), len(ids) - c.num_prompt_tokens
    return (parent_id, seq, delta_text, ids[start:])


def make_delta(engine, parent_id: str) -> RequestDelta | None:
    """The RequestDelta of a request that progressed this step (None if it is gone); a finished request is
    released from the engine. Tracks what was sent on the sequences (`_sent`)."""
    children = engine.sequences_of(parent_id)
    if not children:
        return None
    finished = all(c.is_finished for c in children)
    seqs = []
    for c in children:
        sent = c.__dict__.get("_sent")
        if sent is None:
            sent = c._sent = _Sent()
        text = visible_text(c)
        reset = len(text) < sent.text
        delta_text = text if reset else text[sent.text:]
        sent.text = len(text)
        n = c.num_output_tokens
        new_ids = c.token_ids[c.num_prompt_tokens + sent.tokens:] if n > sent.tokens else []
        sent.tokens = n
        lps = None
        if c.logprobs is not None:
            lps = _raw_logprobs(c.logprobs[sent.logprobs:])
            sent.logprobs = len(c.logprobs)
        seqs.append(SeqDelta(c.index, delta_text, reset, new_ids, c.status.finish_reason, c.stop_reason, lps,
                             c.error))
    first = children[0]
    prompt_lps = None
    sent0 = first._sent
    if not sent0.prompt_logprobs:
        built = make_prompt_logprobs(engine.tokenizer, first)
        if built is not None:
            prompt_lps = [None if d is None else {t: lp.logprob for t, lp in d.items()} for d in built]
            sent0.prompt_logprobs = True
    metrics = first.metrics if len(children) == 1 else _parent_metrics(children)
    num_tokens = 0
    if finished:
        num_tokens = max(c.num_output_tokens for c in children)
        engine.release(parent_id)
    return RequestDelta(parent_id, finished, metrics, first.num_cached_tokens, seqs, prompt_lps,
                        num_output_tokens=num_tokens)


class _Core:
    """The engine's loop over its front ends' pipes: `conns[0]` is the server's main process (its pipe's end, or a
    "stop", ends the engine); the others are API servers (`--api_server_count`) that say "hello" when they start
    listening and "detach" when they stop (or whose pipe ends): their running requests are then aborted."""

    def __init__(self, engine, conns, idle_wait_s: float, stall_s: float = API_SERVER_STALL_S):
        self.engine, self.idle_wait_s, self.stall_s = engine, idle_wait_s, stall_s
        self.conns = list(conns)
        # API servers 1.. get their messages through a thread each: one that stops reading must not stop the engine
        self.outboxes = {i: _Outbox(c, i) for i, c in enumerate(self.conns) if i > 0}
        self.index = {id(c): i for i, c in enumerate(self.conns)}
        self.live = [0]  # front ends that are sent steps, in order
        self.pending = set(range(1, len(self.conns)))  # API servers not attached yet (sent nothing)
        self.snapshot_time = 0.0
        self.seqs: dict[str, int] = {}  # request id -> the front end's number for this use of the id
        self.owner: dict[str, int] = {}  # request id -> the front end that added it
        self.latency = LatencyHistograms()  # every front end's requests: each API server shows the same /metrics

    def snapshot(self, healthy: bool = True) -> EngineSnapshot:
        self.snapshot_time = time.monotonic()
        return self.engine.snapshot(healthy, poll_memory=healthy)

    def send(self, msg: tuple, i: int = 0) -> None:
        if i > 0:
            self.outboxes[i].put(msg)
            return
        try:
            self.conns[i].send(msg)
        except (OSError, EOFError) as e:  # BrokenPipe, ConnectionReset: the front end is gone
            raise _FrontEndGone from e

    def check_api_servers(self) -> None:
        """Detach an API server whose pipe broke, or that has not taken a message for stall_s seconds (stopped, or
        starved: its messages would pile up here without end)."""
        now = time.monotonic()
        for i in list(self.live):
            box = self.outboxes.get(i)
            if box is None:
                continue
            since = box.blocked_since
            if box.broken or (since is not None and now - since > self.stall_s):
                if not box.broken:
                    logger.error("API server %d has not read the engine's messages for %.0f s: detaching it", i,
                                 now - since)
                self.drop(i)

    def broadcast(self, msg: tuple) -> None:
        for i in list(self.live):
            self.send(msg, i)

    def drop(self, i: int) -> None:
        """API server `i` is gone (detached, or its pipe ended): abort its requests, forget its pipe."""
        if i in self.live:
            self.live.remove(i)
        self.pending.discard(i)
        ids = [rid for rid, owner in self.owner.items() if owner == i]
        if ids:
            self.engine.abort_request(ids)
        for rid in ids:
            self.owner.pop(rid, None)
            self.seqs.pop(rid, None)
        box = self.outboxes.get(i)
        if box is not None:
            box.close()  # (its thread closes the pipe)
        logger.info("API server %d detached (%d requests of its aborted)", i, len(ids))

    def apply_commands(self, block: bool) -> bool:
        """Apply the front ends' commands (waiting up to idle_wait_s for one when `block`). False: asked to stop.
        A command: ("add", id, seq, payload) with payload the pickled (prompt, params, arrival), so that one that
        does not unpickle here is this request's error, not the engine's; ("abort", ids); ("hello",);
        ("detach",); ("stop",)."""
        watched = [self.conns[i] for i in (*self.live, *sorted(self.pending))]
        try:
            ready = mp_connection.wait(watched, self.idle_wait_s if block else 0)
        except (OSError, EOFError) as e:
            raise _FrontEndGone from e
        for conn in ready:
            i = self.index[id(conn)]
            try:
                while True:
                    if not self.apply(self.recv_from(i), i):
                        return False
                    if i not in self.live or not conn.poll(0):
                        break
            except _FrontEndGone:
                if i == 0:
                    raise
                self.drop(i)
        return True

    def recv_from(self, i: int):
        try:
            return self.conns[i].recv()
        except (OSError, EOFError) as e:
            raise _FrontEndGone from e

    def apply(self, cmd: tuple, i: int) -> bool:
        engine = self.engine
        kind = cmd[0]
        if kind == "add":
            _, rid, seq, payload = cmd
            try:
                prompt, params, arrival = pickle.loads(payload)
                engine.add_request(rid, prompt, params, arrival)
                self.seqs[rid], self.owner[rid] = seq, i
            except Exception as e:  # bad input (a duplicate id too): this request only
                self.send(("reject", rid, seq, portable_error(e)), i)
        elif kind == "abort":
            mine = [rid for rid in cmd[1] if self.owner.get(rid, 0) == i]
            engine.abort_request(mine)
            for rid in mine:
                self.seqs.pop(rid, None)
                self.owner.pop(rid, None)
        elif kind == "hello" and i in self.pending:
            self.pending.discard(i)
            self.live.append(i)
            self.send(("step", [], self.snapshot(), self.latency.state()), i)
        elif kind == "detach" and i != 0:
            self.drop(i)
        elif kind == "stop" and i == 0:
            return False
        return True

    def run(self) -> None:
        engine = self.engine
        self.broadcast(("step", [], self.snapshot(), self.latency.state()))
        while True:
            busy = engine.has_unfinished_requests()
            if not self.apply_commands(block=not busy):
                break
            if self.outboxes:
                self.check_api_servers()
            engine.executor.check_health()  # a worker that died while idle is noticed within idle_wait_s
            deltas: dict[int, list[RequestDelta | tuple]] = {}
            ended = False
            if engine.has_unfinished_requests():
                for pid in engine.step_progressed():
                    fast = make_step_delta(engine, pid, self.seqs.get(pid))
                    if fast is not None:
                        deltas.setdefault(self.owner.get(pid, 0), []).append(fast)
                        continue
                    d = make_delta(engine, pid)
                    if d is None:
                        continue
                    if d.finished:
                        d.seq, owner = self.seqs.pop(pid, None), self.owner.pop(pid, 0)
                        self.latency.observe_metrics(d.metrics, d.num_output_tokens)
                        ended = True
                    else:
                        d.seq, owner = self.seqs.get(pid), self.owner.get(pid, 0)
                    deltas.setdefault(owner, []).append(d)
            snap = None
            if ended or not engine.has_unfinished_requests() or time.monotonic() - self.snapshot_time >= _SNAPSHOT_S:
                snap = self.snapshot()
            latency = self.latency.state() if ended else None
            for i in list(self.live):
                mine = deltas.get(i)
                if mine or snap is not None:
                    self.send(("step", mine or [], snap, latency), i)


class _Outbox:
    """Messages to one API server (not the main process's), written by a thread of their own: the engine's loop
    never waits on that pipe. `blocked_since`: when the message being written started (None between messages)."""

    def __init__(self, conn, index: int):
        self.conn, self.broken, self.blocked_since = conn, False, None
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._write, name=f"shardllm-api-{index}-sender", daemon=True)
        self.thread.start()

    def put(self, msg: tuple) -> None:
        if not self.broken:
            if self.blocked_since is None:
                self.blocked_since = time.monotonic()  # (cleared when the thread has written it: it is taking them)
            self.queue.put(msg)

    def _write(self) -> None:
        while True:
            msg = self.queue.get()
            if msg is None:
                break
            try:
                self.conn.send(msg)
            except (OSError, EOFError, ValueError):  # the API server is gone (or its pipe closed here)
                self.broken = True
                break
            if self.queue.empty():
                self.blocked_since = None
        try:
            self.conn.close()
        except OSError:
            pass

    def close(self) -> None:
        self.broken = True
        self.queue.put(None)


class _FrontEndGone(Exception):
    """The pipe to the front end broke (its process ended): the engine stops."""


def name_process(name: bytes) -> None:
    """The process's short name (what `top` and `ps -e` show; Linux prctl(PR_SET_NAME), 15 bytes); elsewhere, none."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, ctypes.c_char_p(name[:15]), 0, 0, 0)  # 15: PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _exit_if_orphaned(parent: int, loaded: threading.Event) -> None:
    """While the model loads (minutes for a large one) the engine reads no pipe: if the server's process ends then
    (SIGKILL, a crash), end this one at once rather than hold the GPUs until the load is done. Once loaded, the
    pipe's end says it."""
    while not loaded.wait(0.5):
        if os.getppid() != parent:
            logger.warning("the server's process ended while the model loaded; stopping the engine")
            os._exit(1)


def _ignore_sigterm(signum, frame) -> None:
    """The engine process's SIGTERM handler: none. A SIGTERM to the whole process group or cgroup (systemd,
    `timeout`, `kill -TERM -PGID`) must leave the engine running while the server drains; the server stops it
    (a "stop" command, or its pipe's end). A handler, not SIG_IGN, so that the workers it spawns keep the default."""


def engine_core_main(conn, config: EngineConfig, idle_wait_s: float, log_level: int, log_format: str | None) -> None:
    """The engine process's entry point (multiprocessing spawn): build the engine, say ready (or why not), step
    until told to stop or the front end is gone, then abort what runs, send the last gauges and shut the engine
    down. SIGINT is ignored (inherited from the front end's start, so from the interpreter's first instruction: a
    terminal's Ctrl-C reaches the whole process group) and SIGTERM is handled by doing nothing. `conn`: the pipe
    to the server's process, or a list of pipes (the server's first, then one per other API server)."""
    conns = list(conn) if isinstance(conn, (list, tuple)) else [conn]
    conn = conns[0]
    if threading.current_thread() is threading.main_thread():  # (a test runs it in a thread)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, _ignore_sigterm)
        name_process(b"shardllm-engine")
    if log_format is not None:
        logging.basicConfig(level=log_level, format=log_format)
    loaded = threading.Event()
    threading.Thread(target=_exit_if_orphaned, args=(os.getppid(), loaded), name="shardllm-orphan-watch",
                     daemon=True).start()
    try:
        engine = LLMEngine(config)
        loaded.set()
    except BaseException as e:  # noqa: BLE001 - every failure to start goes back to the front end
        logger.debug("the engine failed to start", exc_info=True)
        try:
            conn.send(("failed", portable_error(e)))
        except OSError:
            pass
        return
    core = _Core(engine, conns, idle_wait_s)
    try:
        core.send(("ready", {"num_blocks": engine.num_blocks,
                             "capacity_tokens": engine.kv_cache_manager.capacity_tokens}))
        core.run()
        engine.abort_unfinished()  # asked to stop
        core.broadcast(("step", [], core.snapshot(healthy=False), None))
    except _FrontEndGone:
        logger.info("the front end is gone; stopping the engine")
    except BaseException as e:  # noqa: BLE001 - any failure of a step ends the engine
        logger.exception("engine step failed; failing every request in flight")
        try:
            engine.abort_unfinished()
            core.broadcast(("step", [], core.snapshot(healthy=False), None))
            core.broadcast(("dead", portable_error(e)))
        except Exception:
            logger.debug("telling the front end failed", exc_info=True)
    finally:
        try:
            engine.shutdown()
        except Exception:
            logger.exception("engine shutdown failed")
        for box in core.outboxes.values():
            box.close()  # after what is queued: the last gauges, a "dead"
        for box in core.outboxes.values():
            box.thread.join(2)
        try:
            conn.close()
        except OSError:
            pass
