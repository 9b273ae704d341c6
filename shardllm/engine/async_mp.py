"""ProcessAsyncLLM: the server's engine in a process of its own (engine/core_proc.py), driven from asyncio.

    event loop (HTTP)                              reader thread               engine process
    generate() ── ("add", ...) ──────────────────────────────────────Pipe──>  add_request, step
    per-request queue <── _apply (call_soon_threadsafe) <── recv() <──Pipe──  ("step", deltas, snapshot)

The front end keeps each request's text, tokens and logprobs so far and applies a step's deltas to them on the
event loop; a request's queue holds its state object (once: a reader that lags takes the newest state) and the
reader builds the RequestOutput when it takes it. Same surface as AsyncLLM (AsyncFrontEnd); `shardllm serve` uses it
unless SHARDLLM_ENGINE_PROCESS=0.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import pickle
import queue
import signal
import threading
import time
from typing import Any

from shardllm import envs
from shardllm.config import EngineConfig
from shardllm.engine.async_llm import AsyncFrontEnd, EngineDeadError, RequestFailedError, failure_summary
from shardllm.engine.core_proc import RequestDelta, engine_core_main
from shardllm.engine.detokenizer import IncrementalText, load_tokenizer
from shardllm.engine.llm_engine import tokenize
from shardllm.metrics import EngineSnapshot
from shardllm.outputs import CompletionOutput, Logprob, LogprobsSnapshot, RequestOutput
from shardllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class _Seq:
    __slots__ = ("index", "text", "token_ids", "finish_reason", "stop_reason", "logprobs", "error", "detok")

    def __init__(self, index: int, want_logprobs: bool, detok: IncrementalText | None = None):
        self.index, self.text, self.token_ids = index, "", []
        self.finish_reason = self.stop_reason = self.error = None
        self.logprobs: list | None = [] if want_logprobs else None
        self.detok = detok  # this side makes the text from the token ids (the engine sends none)


class _State:
    """A request's outputs so far, on the front end (event loop only)."""

    __slots__ = ("request_id", "seq", "prompt", "prompt_token_ids", "seqs", "finished", "metrics", "num_cached_tokens",
                 "prompt_logprobs")

    def __init__(self, request_id: str, prompt, params: SamplingParams, seq: int = 0, tokenizer=None):
        """`tokenizer`: detokenize here (the request was sent with detokenize=False; see `detokenize_here`)."""
        self.request_id, self.seq = request_id, seq
        self.prompt = prompt if isinstance(prompt, str) else None
        self.prompt_token_ids = None if isinstance(prompt, str) else list(prompt)
        self.seqs = [_Seq(i, params.logprobs is not None,
                          None if tokenizer is None else IncrementalText(self.prompt_token_ids, params, tokenizer))
                     for i in range(params.n)]
        self.finished = False
        self.metrics = None
        self.num_cached_tokens = 0
        self.prompt_logprobs = None


def apply_delta(st: _State, d: RequestDelta, tokenizer) -> None:
    """Add a step's RequestDelta to the request's state (Logprob objects that decode with `tokenizer` when read)."""
    for sd in d.seqs:
        s = st.seqs[sd.index]
        if s.detok is not None:
            if sd.token_ids:
                s.text += s.detok.add(tokenizer, sd.token_ids)
        else:
            s.text = sd.text if sd.reset else s.text + sd.text
        if sd.token_ids:
            s.token_ids.extend(sd.token_ids)
        s.finish_reason, s.stop_reason, s.error = sd.finish_reason, sd.stop_reason, sd.error
        if sd.logprobs and s.logprobs is not None:
            s.logprobs.extend({t: Logprob(v, tokenizer=tokenizer, token_id=t) for t, v in e.items()}
                              for e in sd.logprobs)
    if d.prompt_logprobs is not None:
        st.prompt_logprobs = [None if e is None else {t: Logprob(v, tokenizer=tokenizer, token_id=t)
                                                      for t, v in e.items()} for e in d.prompt_logprobs]
    st.metrics, st.num_cached_tokens, st.finished = d.metrics, d.num_cached_tokens, d.finished


def apply_step_delta(st: _State, d: tuple, tokenizer) -> None:
    """Add make_step_delta's (id, seq, text, token ids) to a request's state (its one sequence)."""
    s = st.seqs[0]
    ids = d[3]
    s.text += s.detok.add(tokenizer, ids) if s.detok is not None else d[2]
    s.token_ids.extend(ids)


def frontend_detokenize(api_server_count: int) -> bool:
    """Whether the API servers make the text of requests without stop strings: SHARDLLM_FRONTEND_DETOKENIZE, else
    with several API servers only (one API server that detokenizes too becomes the bound: 8B fp8 on one H200 at
    128/128, 16,181 out tok/s against 21,472 with the engine detokenizing; two API servers 24,628)."""
    value = envs.SHARDLLM_FRONTEND_DETOKENIZE
    return api_server_count > 1 if value is None else value


def detokenize_here(prompt, params: SamplingParams, tokenizer, enabled: bool = True) -> bool:
    """Whether the front end makes this request's text (from the token ids the engine sends) rather than the
    engine: `enabled` (frontend_detokenize), a token-id prompt without stop strings (a stop string ends the request
    in the engine, which needs the text there). Moves the per-token detokenization off the engine process."""
    return (enabled and tokenizer is not None and params.detokenize and not params.stop
            and not isinstance(prompt, str))


def build_output(st: _State, tokenizer) -> RequestOutput:
    """The request's RequestOutput now: token ids copied, a running request's logprobs a snapshot (no copy), as
    LLMEngine's outputs are. A text prompt's ids are tokenized here once (the server sends ids)."""
    outs = []
    for s in st.seqs:
        lps = s.logprobs
        if lps is not None and not st.finished:
            lps = LogprobsSnapshot(lps)
        outs.append(CompletionOutput(s.index, s.text, list(s.token_ids), s.finish_reason, s.stop_reason, lps,
                                     s.error))
    if st.prompt_token_ids is None and st.prompt is not None:
        st.prompt_token_ids = tokenize(tokenizer, st.prompt)
    return RequestOutput(st.request_id, st.prompt, st.prompt_token_ids or [], outs, st.finished, st.metrics,
                         st.num_cached_tokens, st.prompt_logprobs)


class ProcessAsyncLLM(AsyncFrontEnd):
    """Runs an LLMEngine in a spawned process; `generate` streams one request's outputs to asyncio.

    Args:
        config: the engine's configuration (pickled to the engine process).
        idle_wait_s: how long the idle engine process waits for a command before refreshing its gauges.
        start_timeout_s: how long to wait for the engine to load (None: as long as it takes).
    Raises what the engine raises when it cannot start (ValueError for a setting, a WorkerError, ...), and
    EngineDeadError if the engine process ends without a word.
    """

    def __init__(self, config: EngineConfig, idle_wait_s: float = 1.0, start_timeout_s: float | None = None,
                 api_server_count: int = 1):
        if not isinstance(api_server_count, int) or api_server_count < 1:
            raise ValueError(f"api_server_count must be an integer >= 1, got {api_server_count!r}")
        ctx = multiprocessing.get_context("spawn")
        pipes = [ctx.Pipe(duplex=True) for _ in range(api_server_count)]
        self._init_front_end(config, pipes[0][0], None)
        # the other API servers' ends (entrypoints/openai/api_servers.py hands each to its process)
        self.api_server_conns = [ours for ours, _ in pipes[1:]]
        children = [theirs for _, theirs in pipes]
        self._proc = ctx.Process(target=engine_core_main, name="shardllm-engine",
                                 args=(children if api_server_count > 1 else children[0], config, idle_wait_s,
                                       logging.getLogger().level, root_log_format()))
        self._start_ignoring_sigint()
        for child in children:
            child.close()
        try:
            self.engine_info = {**self._wait_ready(start_timeout_s),
                                "frontend_detokenize": frontend_detokenize(api_server_count)}
        except BaseException:
            for c in self.api_server_conns:
                c.close()
            self._kill()
            raise
        self._start_threads()

    @classmethod
    def attach(cls, conn, config: EngineConfig, engine_info: dict) -> ProcessAsyncLLM:
        """A front end of an engine process another process started (an API server of `--api_server_count`):
        `conn` is one of that ProcessAsyncLLM's `api_server_conns`, `engine_info` its `engine_info`. Its shutdown
        detaches from the engine (its running requests are aborted) and leaves the engine running."""
        self = cls.__new__(cls)
        self._init_front_end(config, conn, engine_info)
        self._start_threads()
        self._send(("hello",))
        return self

    def _init_front_end(self, config: EngineConfig, conn, engine_info: dict | None) -> None:
        AsyncFrontEnd.__init__(self)
        self.config = config
        mc = config.model_config
        self.tokenizer = load_tokenizer(mc.tokenizer_path, mc.trust_remote_code)
        self._conn, self._proc, self.engine_info = conn, None, engine_info
        self.api_server_conns = []
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()  # pickled commands, sent by the sender thread
        self._states: dict[str, _State] = {}
        self._stopped = threading.Event()
        self._add_seq = 0
        self._reader = self._sender = None

    def _start_threads(self) -> None:
        info = self.engine_info
        self.snapshot = EngineSnapshot(num_kv_blocks=info["num_blocks"],
                                       kv_cache_capacity_tokens=info["capacity_tokens"])
        self._reader = threading.Thread(target=self._read, name="shardllm-engine-reader", daemon=True)
        self._reader.start()
        self._sender = threading.Thread(target=self._write, name="shardllm-engine-sender", daemon=True)
        self._sender.start()

    def _start_ignoring_sigint(self) -> None:
        """Start the engine process with SIGINT ignored from its first instruction (an ignored signal stays
        ignored across exec): a terminal's Ctrl-C reaches the whole process group, and the engine must not die
        of it while it imports (the server stops it)."""
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            self._proc.start()
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)

    @classmethod
    def from_kwargs(cls, api_server_count: int = 1, **kwargs: Any) -> ProcessAsyncLLM:
        """Build from the `LLM` arguments (see EngineConfig.create)."""
        return cls(EngineConfig.create(**kwargs), api_server_count=api_server_count)

    def _wait_ready(self, timeout: float | None) -> dict:
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self._conn.poll(0.5):
                if not self._proc.is_alive():
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise EngineDeadError(f"the engine did not start within {timeout} s")
            msg = self._conn.recv()
        except (EOFError, OSError):  # it ended without a word (killed, out of host memory, ...)
            self._proc.join(5)
            how = how_ended(self._proc.exitcode)
            raise EngineDeadError(f"the engine process exited while starting ({how})") from None
        if msg[0] == "failed":
            raise msg[1]
        if msg[0] != "ready":
            raise EngineDeadError(f"the engine process said {msg[0]!r} before it was ready")
        return msg[1]

    # ---- AsyncFrontEnd -------------------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        """True for an API server attached to another process's engine (`attach`): its shutdown only detaches."""
        return self._proc is None

    def _engine_alive(self) -> bool:
        return self._proc.is_alive() if self._proc is not None else not self._stopped.is_set()

    @property
    def is_healthy(self) -> bool:
        return self._error is None and not self._stopping and self._engine_alive()

    def _running(self) -> bool:
        return self._engine_alive() and not self._stopped.is_set()

    def _send(self, msg: tuple) -> None:
        """Queue a command for the engine process (pickled here; the sender thread writes it, so that the event loop
        never waits on a full pipe while the engine runs a long step)."""
        self._outbox.put(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))

    def _write(self) -> None:
        while True:
            data = self._outbox.get()
            if data is None:
                return
            try:
                self._conn.send_bytes(data)
            except (OSError, ValueError):  # the engine process is gone: the reader reports it
                return

    def _send_add(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        here = detokenize_here(prompt, params, self.tokenizer, self.engine_info["frontend_detokenize"])
        try:
            sent = params.clone(detokenize=False) if here else params
            payload = pickle.dumps((prompt, sent, time.time()), protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError) as e:  # a logits processor defined in a function
            raise ValueError(f"the request cannot be sent to the engine process ({e}): pass picklable "
                             "SamplingParams (module-level logits processors) or serve with "
                             "SHARDLLM_ENGINE_PROCESS=0") from None
        self._add_seq += 1
        self._send(("add", request_id, self._add_seq, payload))
        self._states[request_id] = _State(request_id, prompt, params, self._add_seq, self.tokenizer if here else None)

    def _send_abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._states.pop(rid, None)
        self._send(("abort", request_ids))

    def _output(self, st: _State) -> RequestOutput:
        return build_output(st, self.tokenizer)

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Abort what is still running, stop the engine process and free the devices (an attached API server:
        detach, leaving the engine to the others). Blocking."""
        self._stopping = True
        if self._proc is None:
            self._detach(timeout)
            return
        if self._proc.is_alive():
            self._send(("stop",))
            self._outbox.put(None)
            self._proc.join(timeout)
            if self._proc.is_alive():
                logger.error("the engine process did not stop within %s s; killing it", timeout)
        self._kill()

    def _detach(self, timeout: float | None) -> None:
        if not self._stopped.is_set():
            self._send(("detach",))  # the engine aborts this front end's requests and closes its end: the reader ends
        self._outbox.put(None)
        for t in (self._sender, self._reader):
            if t is not None and t is not threading.current_thread():
                t.join(5 if timeout is None else min(timeout, 5))
        try:
            self._conn.close()
        except OSError:
            pass

    def _kill(self) -> None:
        for c in self.api_server_conns:  # (not handed to an API server's process)
            c.close()
        self.api_server_conns = []
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._outbox.put(None)
        for t in (self._reader, self._sender):  # the reader sees the pipe's end once the process has exited
            if t is not None and t is not threading.current_thread():
                t.join(5)
        try:
            self._conn.close()
        except OSError:
            pass

    # ---- reader thread -------------------------------------------------------------------------------------
    def _read(self) -> None:
        conn = self._conn
        error: BaseException | None = None
        try:
            while True:
                msg = conn.recv()
                kind = msg[0]
                if kind == "step":
                    if msg[2] is not None:
                        self.snapshot = msg[2]
                    if msg[3] is not None:  # the engine keeps the latency histograms (of every API server)
                        self.latency.load(msg[3])
                    if msg[1]:
                        self._post(self._apply, msg[1])
                elif kind == "reject":
                    self._post(self._reject, msg[1], msg[2], msg[3])
                elif kind == "dead":
                    error = msg[1]
                    break
        except (EOFError, OSError):
            if not self._stopping:
                how = "its pipe ended: it, or the server's main process, is gone"
                if self._proc is not None:
                    self._proc.join(5)
                    how = how_ended(self._proc.exitcode)
                error = EngineDeadError(f"the engine process exited ({how})")
        except BaseException as e:  # noqa: BLE001 - a message that does not unpickle, ...
            logger.exception("reading the engine process's messages failed")
            error = e
        if error is not None:
            self._error = error
            reason = f"the engine failed: {failure_summary(error)} (details in the server log)"
        else:
            reason = "the server is shutting down"
        # the gauges of an engine that has stopped (a killed one sent none): nothing runs, nothing is held
        self.snapshot = dataclasses.replace(self.snapshot, is_healthy=False, num_requests_running=0,
                                            num_requests_waiting=0, kv_cache_usage=0.0)
        self._stopped.set()
        self._post(self._end, EngineDeadError(reason))

    # ---- event loop ----------------------------------------------------------------------------------------
    def _end(self, exc: BaseException) -> None:
        self._states.clear()
        self._fail_all(exc)

    def _reject(self, request_id: str, seq: int, exc: BaseException) -> None:
        st = self._states.get(request_id)
        if st is not None and st.seq == seq:
            del self._states[request_id]
            self._fail(request_id, exc)

    def _apply(self, deltas: list[RequestDelta | tuple]) -> None:
        tok = self.tokenizer
        gone = []
        for d in deltas:
            if type(d) is tuple:  # make_step_delta's: (id, seq, text, token ids) of a running single sequence
                rid, seq, text, ids = d
                st = self._states.get(rid)
                if st is None or st.seq != seq:
                    if st is None:
                        gone.append(rid)
                    continue
                try:
                    apply_step_delta(st, d, tok)
                except Exception as e:  # noqa: BLE001 - this request fails; the others' deltas still apply
                    self._apply_failed(rid, e, gone)
                    continue
                q = self._streams.get(rid)
                if q is not None and q.empty():
                    q.put_nowait(st)
                continue
            st = self._states.get(d.request_id)
            if st is None or st.seq != d.seq:  # aborted (or an earlier use of a reused id): nobody listens
                if st is None and not d.finished:  # do not spend steps on it
                    gone.append(d.request_id)
                continue
            q = self._streams.get(d.request_id)
            try:
                apply_delta(st, d, tok)
            except Exception as e:  # noqa: BLE001 - this request fails; the others' deltas still apply
                self._apply_failed(d.request_id, e, gone)
                continue
            if d.finished:
                self._states.pop(d.request_id, None)
                failed = [s.error for s in st.seqs if s.finish_reason == "error"]
                if failed and q is not None:  # raised, not delivered as a finished output
                    _replace(q, RequestFailedError(f"the request failed in the engine: {failed[0]}"))
                    continue
            if q is not None and q.empty():
                q.put_nowait(st)
        if gone:
            self._send(("abort", gone))

    def _apply_failed(self, request_id: str, e: Exception, gone: list[str]) -> None:
        logger.exception("request %s: applying its output failed", request_id)
        self._states.pop(request_id, None)
        gone.append(request_id)
        q = self._streams.get(request_id)
        if q is not None:
            _replace(q, RequestFailedError(f"the request failed in the server: {e!r}"))


def root_log_format() -> str | None:
    """The format of the root logger's first handler (what a spawned process of the server logs with), if any."""
    root = logging.getLogger()
    return root.handlers[0].formatter._fmt if root.handlers and root.handlers[0].formatter else None


def how_ended(exitcode: int | None) -> str:
    """How a process ended, for a message: "killed by SIGKILL", "exit code 1"."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def _replace(q, exc: BaseException) -> None:
    """Put `exc` in a request's queue in place of the state it may still hold (a reader that lags would otherwise
    take that state, finished, and never see the error)."""
    while not q.empty():
        q.get_nowait()
    q.put_nowait(exc)
