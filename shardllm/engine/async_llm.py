"""AsyncLLM: the engine stepping in its own thread, driven from asyncio (the server's front end).

    event loop (HTTP)                               engine thread
    generate() ── Add/Abort ──> inbox (SimpleQueue) ──> applied between steps
    per-request asyncio.Queue <── call_soon_threadsafe ── step() outputs

Only the engine thread touches the LLMEngine, so the engine needs no locks; the event loop never
waits on a step. Readers in other threads see the engine's gauges and counters through `snapshot`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from shardllm.config import EngineConfig
from shardllm.engine.llm_engine import LLMEngine, tokenize
from shardllm.metrics import EngineSnapshot, LatencyHistograms
from shardllm.outputs import RequestOutput
from shardllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


def failure_summary(e: BaseException) -> str:
    """One line for clients about why the engine failed: the error's first line and, for a worker's error that
    carries its traceback, the traceback's last line ("worker rank 2 failed (KeyboardInterrupt)"). The traceback
    itself goes to the server log only."""
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    if not lines:
        return type(e).__name__
    head = lines[0].rstrip(":")
    return f"{head} ({lines[-1]})" if len(lines) > 1 else head


class PromptTooLongError(ValueError):
    """A prompt of `chars` characters whose first `head_chars` alone make `head_tokens` tokens, more than the
    context holds (the rest was not tokenized)."""

    def __init__(self, chars: int, head_chars: int, head_tokens: int):
        super().__init__(f"the prompt is {chars} characters, and its first {head_chars} alone make {head_tokens} "
                         "tokens")
        self.chars, self.head_chars, self.head_tokens = chars, head_chars, head_tokens


class EngineDeadError(RuntimeError):
    """The engine thread stopped (an exception in a step, or shutdown); no request can run."""


class RequestAbortedError(RuntimeError):
    """The request was aborted through `AsyncLLM.abort` while a consumer still waited on it."""


class RequestFailedError(RuntimeError):
    """Processing this request's inputs or outputs failed in the engine (e.g. a logits processor raised); the
    engine and the other requests run on."""


@dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    arrival_time: float


@dataclass
class _Abort:
    request_ids: list[str]


class _Stop:
    pass


class AsyncFrontEnd:
    """What the server sees of an engine driven from asyncio: `generate` streams a request's outputs, `abort`,
    `shutdown`, the gauges (`snapshot`, `latency`), `tokenize` and the chat template. Two engines implement the
    rest: AsyncLLM (the engine in a thread of this process) and ProcessAsyncLLM (in a process of its own,
    engine/async_mp.py). A request's queue carries items with `.finished` that `_output` turns into a
    RequestOutput, or an exception to raise."""

    config: EngineConfig
    tokenizer: Any

    def __init__(self):
        self.latency = LatencyHistograms()
        self._streams: dict[str, asyncio.Queue] = {}  # touched by the event loop only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self._stopping = False

    # ---- what the engines provide --------------------------------------------------------------------------
    def _send_add(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        raise NotImplementedError

    def _send_abort(self, request_ids: list[str]) -> None:
        raise NotImplementedError

    def _output(self, item) -> RequestOutput:
        return item

    @property
    def is_healthy(self) -> bool:
        raise NotImplementedError

    def shutdown(self, timeout: float | None = 30.0) -> None:
        raise NotImplementedError

    def _running(self) -> bool:
        raise NotImplementedError

    # ---- front end (event loop) ----------------------------------------------------------------------------
    @property
    def error(self) -> BaseException | None:
        return self._error

    @property
    def max_model_len(self) -> int:
        return self.config.scheduler_config.max_model_len

    @property
    def num_requests_in_flight(self) -> int:
        return len(self._streams)

    def tokenize(self, text: str) -> list[int]:
        """The prompt's token ids, as the engine would make them (safe to call beside the engine thread)."""
        return tokenize(self.tokenizer, text)

    def apply_chat_template(self, messages: list[dict], chat_template: str | None = None,
                            max_chars: int | None = None) -> list[int]:
        """Render a conversation with the model's chat template and tokenize it (no special tokens added).
        max_chars: a rendered text longer than this is tokenized up to it first, and if that part alone makes more
        than max_model_len tokens, PromptTooLongError is raised without tokenizing the rest (the server's bound)."""
        tok = self.tokenizer
        if tok is None:
            raise ValueError("this model has no tokenizer, so it cannot chat: use completions with token ids")
        if chat_template is None and not getattr(tok, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template: use completions instead")
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                       chat_template=chat_template)
        if max_chars is not None and len(text) > max_chars:
            head = len(tok.encode(text[:max_chars], add_special_tokens=False))
            if head > self.max_model_len:
                raise PromptTooLongError(len(text), max_chars, head)
        return tok.encode(text, add_special_tokens=False)

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Run one request; yield its RequestOutput each time it progresses, the last one finished.

        Outputs carry the whole text so far, so a consumer slower than the engine skips to the newest.
        Leaving the loop early, or cancelling the task (a client that disconnects), aborts the request
        and frees its KV blocks at the engine's next step boundary. Raises what add_request raises
        (ValueError/TypeError for bad input) and EngineDeadError when the engine fails.
        """
        self._check_alive()
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._streams:
                raise RuntimeError("an AsyncLLM serves one event loop at a time")
            self._loop = loop  # idle: follow the caller to its loop (asyncio.run in scripts and tests)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = q
        try:
            self._send_add(request_id, prompt, params)
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        done = False
        try:
            while True:
                item = await q.get()
                while not isinstance(item, BaseException) and not item.finished and not q.empty():
                    item = q.get_nowait()
                if isinstance(item, BaseException):
                    done = True  # the engine has already dropped it (add failed, or the engine died)
                    raise item
                done = item.finished
                yield self._output(item)
                if done:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not done:
                self._send_abort([request_id])

    def abort(self, request_id: str, reason: str = "the request was aborted") -> None:
        """Abort a request; a consumer still waiting on it gets RequestAbortedError(reason). A no-op for
        requests that finished."""
        q = self._streams.pop(request_id, None)
        if q is not None:
            self._send_abort([request_id])
            q.put_nowait(RequestAbortedError(reason))

    def abort_all(self, reason: str) -> None:
        """Abort every request in flight (the end of a graceful shutdown's grace period)."""
        for request_id in list(self._streams):
            self.abort(request_id, reason)

    def _check_alive(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"the engine failed and is not serving: {failure_summary(self._error)} (details in "
                                  "the server log)") from self._error
        if self._stopping or not self._running():
            raise EngineDeadError("the engine is shutting down")

    def _fail(self, request_id: str, exc: BaseException) -> None:
        q = self._streams.get(request_id)
        if q is not None:
            q.put_nowait(exc)

    def _fail_all(self, exc: BaseException) -> None:
        for q in self._streams.values():
            q.put_nowait(exc)

    def _post(self, fn, *args) -> None:
        """Run fn(*args) on the event loop (from another thread)."""
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is left to tell
            pass


class AsyncLLM(AsyncFrontEnd):
    """Runs an LLMEngine in a background thread; `generate` streams one request's outputs to asyncio.

    Args:
        engine: a built LLMEngine; the AsyncLLM owns it from now on (only its thread may touch it).
        idle_wait_s: how long the idle engine thread sleeps on its inbox before refreshing the snapshot.
    """

    def __init__(self, engine: LLMEngine, idle_wait_s: float = 1.0):
        super().__init__()
        self.engine = engine
        self.config = engine.config
        self.tokenizer = engine.tokenizer
        self.snapshot = EngineSnapshot(num_kv_blocks=engine.num_blocks,
                                       kv_cache_capacity_tokens=engine.kv_cache_manager.capacity_tokens)
        self._idle_wait_s = idle_wait_s
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="shardllm-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncLLM:
        return cls(LLMEngine(config))

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> AsyncLLM:
        """Build from the `LLM` arguments (see EngineConfig.create)."""
        return cls.from_config(EngineConfig.create(**kwargs))

    @property
    def is_healthy(self) -> bool:
        return (self._error is None and not self._stopping and self._thread.is_alive()
                and getattr(self.engine.executor, "dead", None) is None)

    def _send_add(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        self._inbox.put(_Add(request_id, prompt, params, time.time()))

    def _send_abort(self, request_ids: list[str]) -> None:
        self._inbox.put(_Abort(request_ids))

    def _running(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Abort what is still running, stop the engine thread and free the devices. Blocking."""
        self._stopping = True
        if self._thread.is_alive():
            self._inbox.put(_Stop())
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.error("the engine thread did not stop within %s s", timeout)

    # ---- delivery (event loop side of call_soon_threadsafe) ------------------------------------------------
    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            q = self._streams.get(out.request_id)
            failed = [o.error for o in out.outputs if o.finish_reason == "error"] if out.finished else []
            if q is not None and failed:
                q.put_nowait(RequestFailedError(f"the request failed in the engine: {failed[0]}"))
            elif q is not None:
                q.put_nowait(out)
            elif not out.finished:  # nobody listens any more: do not spend steps on it
                self._inbox.put(_Abort([out.request_id]))

    # ---- engine thread -------------------------------------------------------------------------------------
    def _reader_behind(self, request_id: str) -> bool:
        """Whether `request_id`'s stream still holds an output its reader has not taken: then the engine builds
        no new one this step (outputs carry the whole text so far; the reader skips to the newest anyway), so a
        server short of CPU spends less of it where its readers lag. Read from the engine thread: a dict lookup and a
        deque's length, each atomic under the GIL; a stale answer only adds or delays one output."""
        q = self._streams.get(request_id)
        return q is not None and not q.empty()

    def _run(self) -> None:
        engine = self.engine
        try:
            self._publish()
            while True:
                if not self._apply_commands(block=not engine.has_unfinished_requests()):
                    break
                engine.executor.check_health()  # a worker that died while idle is noticed within idle_wait_s
                if engine.has_unfinished_requests():
                    outputs = engine.step(skip=self._reader_behind)
                    for out in outputs:
                        if out.finished:
                            self.latency.observe(out)
                    if outputs:
                        self._post(self._dispatch, outputs)
                self._publish()
        except BaseException as e:  # noqa: BLE001 - any failure of a step ends the engine
            logger.exception("engine step failed; failing every request in flight")
            self._error = e
        reason = (f"the engine failed: {failure_summary(self._error)} (details in the server log)"
                  if self._error is not None
                  else "the server is shutting down")
        try:  # gauges first, so that a client told of the failure sees it in the metrics too
            self.engine.abort_unfinished()
            self._publish()
        except Exception:
            logger.exception("cleaning up the engine failed")
        self._post(self._fail_all, EngineDeadError(reason))
        try:
            engine.shutdown()
        except Exception:
            logger.exception("engine shutdown failed")

    def _apply_commands(self, block: bool) -> bool:
        """Apply the inbox's commands; wait for one first when the engine is idle. False on stop."""
        commands = []
        try:
            if block:
                commands.append(self._inbox.get(timeout=self._idle_wait_s))
            while True:
                commands.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        for cmd in commands:
            if isinstance(cmd, _Add):
                try:
                    self.engine.add_request(cmd.request_id, cmd.prompt, cmd.params, cmd.arrival_time)
                except Exception as e:  # bad input: fail this request only
                    self._post(self._fail, cmd.request_id, e)
            elif isinstance(cmd, _Abort):
                self.engine.abort_request(cmd.request_ids)
            elif isinstance(cmd, _Stop):
                return False
        return True

    def _publish(self) -> None:
        self.snapshot = self.engine.snapshot(healthy=self._error is None and not self._stopping,
                                             poll_memory=self._error is None)
