"""The engine process: an LLMEngine stepping in a process of its own, for the server (SHARDLLM_ENGINE_PROCESS, on).

In one process the HTTP front end and the engine's step share one GIL; at the GPU's rate the server spent ~44% of
it on streamed responses and ~37% in the engine (twenty-second session's profile, docs/benchmarks.md), and
delivered a third of the offline rate. Here the engine (scheduler, executor, detokenizer) has a core of its own and
the front end (engine/async_mp.py) only HTTP: vLLM V1's split of API server and EngineCore.

    front end                                   engine process (this module)
    ("add", id, seq, payload)      ─────Pipe──> add_request (payload: the pickled prompt, params, arrival time)
    ("abort", [ids]) / ("stop",)   ─────Pipe──> abort_request / abort all, last gauges, shut down
                                   <────Pipe─── ("ready", info) | ("failed", error)     once, at start
                                   <────Pipe─── ("step", [RequestDelta], EngineSnapshot | None)   a step
                                   <────Pipe─── ("reject", id, seq, error)   add_request refused it
                                   <────Pipe─── ("dead", error)   a step failed: the engine has stopped

A step sends what each request gained since its last message, not its whole text (an output per request per step
carrying everything so far is O(tokens^2) to pickle): a RequestDelta per request that progressed, a SeqDelta per
sequence. The engine process ignores SIGINT (a terminal's Ctrl-C reaches the whole process group; the front end
stops it) and ends when the front end's end of the pipe closes.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import threading
import time
from dataclasses import dataclass

from shardllm.config import EngineConfig
from shardllm.engine.detokenizer import make_prompt_logprobs, visible_text
from shardllm.engine.llm_engine import LLMEngine, _parent_metrics
from shardllm.metrics import EngineSnapshot
from shardllm.outputs import RequestMetrics

logger = logging.getLogger(__name__)

_SNAPSHOT_S = 0.05  # a busy engine sends its gauges at most this often (and with every step where a request ends)


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
    if finished:
        engine.release(parent_id)
    return RequestDelta(parent_id, finished, metrics, first.num_cached_tokens, seqs, prompt_lps)


class _Core:
    def __init__(self, engine, conn, idle_wait_s: float):
        self.engine, self.conn, self.idle_wait_s = engine, conn, idle_wait_s
        self.snapshot_time = 0.0
        self.seqs: dict[str, int] = {}  # request id -> the front end's number for this use of the id

    def snapshot(self, healthy: bool = True) -> EngineSnapshot:
        self.snapshot_time = time.monotonic()
        return self.engine.snapshot(healthy, poll_memory=healthy)

    def send(self, msg: tuple) -> None:
        try:
            self.conn.send(msg)
        except (OSError, EOFError) as e:  # BrokenPipe, ConnectionReset: the front end is gone
            raise _FrontEndGone from e

    def recv(self):
        """The next command: ("add", id, seq, payload) with payload the pickled (prompt, params, arrival), so that
        one that does not unpickle here is this request's error, not the engine's; ("abort", ids); ("stop",)."""
        try:
            return self.conn.recv()
        except (OSError, EOFError) as e:
            raise _FrontEndGone from e

    def apply_commands(self, block: bool) -> bool:
        """Apply the front end's commands (waiting up to idle_wait_s for one when `block`). False: asked to stop."""
        engine = self.engine
        try:
            ready = self.conn.poll(self.idle_wait_s if block else 0)
        except (OSError, EOFError) as e:
            raise _FrontEndGone from e
        while ready:
            cmd = self.recv()
            kind = cmd[0]
            if kind == "add":
                _, rid, seq, payload = cmd
                try:
                    prompt, params, arrival = pickle.loads(payload)
                    engine.add_request(rid, prompt, params, arrival)
                    self.seqs[rid] = seq
                except Exception as e:  # bad input: this request only
                    self.send(("reject", rid, seq, portable_error(e)))
            elif kind == "abort":
                engine.abort_request(cmd[1])
                for rid in cmd[1]:
                    self.seqs.pop(rid, None)
            elif kind == "stop":
                return False
            try:
                ready = self.conn.poll(0)
            except (OSError, EOFError) as e:
                raise _FrontEndGone from e
        return True

    def run(self) -> None:
        engine = self.engine
        self.send(("step", [], self.snapshot()))
        while True:
            busy = engine.has_unfinished_requests()
            if not self.apply_commands(block=not busy):
                break
            engine.executor.check_health()  # a worker that died while idle is noticed within idle_wait_s
            deltas = []
            ended = False
            if engine.has_unfinished_requests():
                for pid in engine.step_progressed():
                    d = make_delta(engine, pid)
                    if d is not None:
                        d.seq = self.seqs.pop(pid, None) if d.finished else self.seqs.get(pid)
                        deltas.append(d)
                        ended |= d.finished
            snap = None
            if ended or not engine.has_unfinished_requests() or time.monotonic() - self.snapshot_time >= _SNAPSHOT_S:
                snap = self.snapshot()
            if deltas or snap is not None:
                self.send(("step", deltas, snap))


class _FrontEndGone(Exception):
    """The pipe to the front end broke (its process ended): the engine stops."""


def _name_process(name: bytes) -> None:
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
    terminal's Ctrl-C reaches the whole process group) and SIGTERM is handled by doing nothing."""
    if threading.current_thread() is threading.main_thread():  # (a test runs it in a thread)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, _ignore_sigterm)
        _name_process(b"shardllm-engine")
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
    core = _Core(engine, conn, idle_wait_s)
    try:
        core.send(("ready", {"num_blocks": engine.num_blocks,
                             "capacity_tokens": engine.kv_cache_manager.capacity_tokens}))
        core.run()
        engine.abort_unfinished()  # asked to stop
        core.send(("step", [], core.snapshot(healthy=False)))
    except _FrontEndGone:
        logger.info("the front end is gone; stopping the engine")
    except BaseException as e:  # noqa: BLE001 - any failure of a step ends the engine
        logger.exception("engine step failed; failing every request in flight")
        try:
            engine.abort_unfinished()
            core.send(("step", [], core.snapshot(healthy=False)))
            core.send(("dead", portable_error(e)))
        except Exception:
            logger.debug("telling the front end failed", exc_info=True)
    finally:
        try:
            engine.shutdown()
        except Exception:
            logger.exception("engine shutdown failed")
        try:
            conn.close()
        except OSError:
            pass
