"""The engine: requests in, tokens out, one step at a time (schedule -> execute -> update)."""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from shardllm.config import EngineConfig
from shardllm.engine.detokenizer import (
    detokenize_incrementally,
    find_stop_string,
    init_offsets,
    load_tokenizer,
    make_logprobs,
    make_prompt_logprobs,
    visible_text,
)
from shardllm.engine.kv_cache_manager import KVCacheManager
from shardllm.engine.request import Request, RequestStatus
from shardllm.engine.scheduler import Scheduler
from shardllm.engine.startup_summary import log_startup_summary
from shardllm.executor.base import Executor
from shardllm.metrics import EngineSnapshot
from shardllm.model_loader.host_memory import check_host_memory
from shardllm.outputs import CompletionOutput, LogprobsSnapshot, RequestMetrics, RequestOutput
from shardllm.sampling_params import SamplingParams
from shardllm.utils import freeze_startup_objects

logger = logging.getLogger(__name__)

_MEMORY_POLL_S = 1.0  # how often a snapshot re-reads device memory and expert load (a call into every worker)


def _logprobs_out(req: Request) -> list | LogprobsSnapshot | None:
    """A finished request's own list (nothing appends to it any more); a running one's entries so far."""
    if req.logprobs is None:
        return None
    return req.logprobs if req.is_finished else LogprobsSnapshot(req.logprobs)


class _RequestFailed(Exception):
    """A request's sampling failed on the workers (the message says why)."""


_EXTRA_EOS_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<|eom_id|>")


@dataclass
class EngineStats:
    """Counters since start; the server's metrics read them."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)
    preemptions: int = 0
    steps: int = 0
    max_in_flight: int = 0  # most batches in the pipeline at once


def _parent_metrics(children: list[Request]) -> RequestMetrics:
    """The timestamps of a request with n > 1 sequences: scheduled and first token at its earliest child's, finished
    at its last child's (each child keeps its own; the first child's alone would end the request when it ends)."""
    def first(times):
        return min((t for t in times if t is not None), default=None)

    ms = [c.metrics for c in children]
    done = [m.finished_time for m in ms]
    return RequestMetrics(ms[0].arrival_time, first(m.first_scheduled_time for m in ms),
                          first(m.first_token_time for m in ms), None if None in done else max(done))


def tokenize(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids with the tokenizer's special tokens (BOS). ValueError without a tokenizer."""
    if tokenizer is None:
        raise ValueError("this model has no tokenizer (dummy weights from a shipped config): "
                         "pass prompts as lists of token ids")
    return tokenizer.encode(prompt, add_special_tokens=True)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        mc = config.model_config
        self.tokenizer = load_tokenizer(mc.tokenizer_path, mc.trust_remote_code)
        self.eos_token_ids = self._eos_token_ids()
        check_host_memory(config)  # on CPU the weights and KV cache are host memory: fail before the OOM killer
        self.executor = Executor.create(config)
        num_blocks = self.executor.initialize()
        cc, sc = config.cache_config, config.scheduler_config
        capacity = (num_blocks - 1) * cc.block_size
        if capacity < sc.max_model_len:
            self.executor.shutdown()
            raise ValueError(
                f"the KV cache holds {max(capacity, 0)} tokens but max_seq_len is {sc.max_model_len}: lower "
                "max_seq_len, raise kv_cache_free_gpu_memory_fraction (or cpu_kv_cache_gb on CPU), "
                "use a smaller dtype, or add GPUs with tensor_parallel_size")
        self.num_blocks = num_blocks
        log_startup_summary(config, num_blocks, self.executor)
        self.kv_cache_manager = KVCacheManager(num_blocks, cc.block_size, cc.enable_prefix_caching)
        self.scheduler = Scheduler(sc, self.kv_cache_manager)
        self.stats = EngineStats()
        self._parents: dict[str, list[Request]] = {}
        self._in_flight: deque = deque()  # submitted SchedulerOutputs, oldest first
        # num_microbatches batches in flight fill the pipeline (pp, or pp + 1 when synchronous: config.py); async
        # scheduling keeps one more, so that the host schedules and sends step k+1 (and digests step k's tokens)
        # while the devices run step k
        self._max_in_flight = sc.num_microbatches + bool(sc.async_scheduling)
        self._owed_after_failure = False  # abort_all_after_failure's collection was interrupted: finish it first
        self._counter = 0
        self._memory: tuple[int, ...] = ()
        self._expert_load: dict = {}
        self._memory_time = 0.0
        freeze_startup_objects()

    @classmethod
    def from_kwargs(cls, **kwargs) -> LLMEngine:
        return cls(EngineConfig.create(**kwargs))

    def _eos_token_ids(self) -> tuple[int, ...]:
        ids: set[int] = set()

        def add(v):
            if isinstance(v, int):
                ids.add(v)
            elif isinstance(v, (list, tuple)):
                ids.update(x for x in v if isinstance(x, int))

        mc = self.config.model_config
        add(getattr(mc.hf_config, "eos_token_id", None))
        if mc.path and os.path.isdir(mc.path):
            try:
                from transformers import GenerationConfig

                add(GenerationConfig.from_pretrained(mc.path).eos_token_id)
            except Exception:
                pass
        tok = self.tokenizer
        if tok is not None:
            add(tok.eos_token_id)
            if mc.load_format == "gguf":  # GGUF files often name only one of the chat's end tokens
                vocab = tok.get_vocab()
                add([vocab[t] for t in _EXTRA_EOS_TOKENS if t in vocab])
        return tuple(sorted(ids))

    # ---- requests ------------------------------------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[int]:
        return tokenize(self.tokenizer, prompt)

    def add_request(self, request_id: str | None, prompt: str | list[int] | None,
                    params: SamplingParams | None = None, arrival_time: float | None = None) -> str:
        """Validate and queue a request; returns its id. Raises ValueError for input that cannot run."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        if request_id is None:
            request_id = str(self._counter)
            self._counter += 1
        if request_id in self._parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        token_ids = self.tokenize(prompt) if isinstance(prompt, str) else prompt
        if not isinstance(token_ids, (list, tuple)) or not all(isinstance(t, int) for t in token_ids):
            raise TypeError("a prompt must be a string or a list of token ids")
        if not token_ids:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.config.model_config.hf_config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        bad = [t for t in params.logit_bias or () if t >= vocab]
        if bad:
            raise ValueError(f"logit_bias token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        bad = [t for t in params.stop_token_ids if t >= vocab]
        if bad:
            raise ValueError(f"stop_token_ids {bad[:5]} are outside the vocabulary [0, {vocab}): give token ids of "
                             "this model")
        max_len = self.config.scheduler_config.max_model_len
        if len(token_ids) >= max_len:
            raise ValueError(f"the prompt has {len(token_ids)} tokens but max_seq_len is {max_len}: shorten the "
                             f"prompt to at most {max_len - 1} tokens or raise max_seq_len")
        if params.max_tokens is not None and params.max_tokens >= max_len:
            # never satisfiable, whatever the prompt: a mistake (10**9 "for no limit" ran to the end of an 8k
            # context for minutes on CPU). A request that merely runs past the context ends there (finish_reason
            # "length"), as vLLM's offline LLM does; the server refuses both (OpenAI's context_length_exceeded).
            raise ValueError(f"max_tokens={params.max_tokens} is not below max_seq_len={max_len}: ask for at most "
                             f"{max_len - len(token_ids)} tokens after this {len(token_ids)}-token prompt (None: the "
                             f"rest of the context) or raise max_seq_len")
        eos = () if params.ignore_eos else self.eos_token_ids
        children = []
        for i in range(params.n):
            p = params.clone(eos_token_ids=eos, n=1, seed=params.child_seed(i),
                             prompt_logprobs=params.prompt_logprobs if i == 0 else None)  # the prompt's, once
            rid = request_id if params.n == 1 else f"{request_id}#{i}"
            req = Request(rid, token_ids, p, arrival_time, prompt=text, parent_id=request_id, index=i)
            init_offsets(req, self.tokenizer)
            children.append(req)
        self._parents[request_id] = children
        for req in children:
            self.scheduler.add_request(req)
        return request_id

    def abort_request(self, request_ids: str | list[str]) -> None:
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            for req in self._parents.pop(rid, []):
                if not req.is_finished:
                    self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_ABORTED)
                    self.stats.finished["abort"] = self.stats.finished.get("abort", 0) + 1

    def abort_unfinished(self) -> None:
        """Abort every request that runs or waits (the engine stops), logged once, so that the last gauges count
        them."""
        ids = {r.parent_id for r in (*self.scheduler.running, *self.scheduler.waiting)}
        if ids:
            logger.info("aborting %d unfinished requests", len(ids))
            self.abort_request(list(ids))

    def abort_all_after_failure(self) -> None:
        """After `step` raised or was interrupted (KeyboardInterrupt): abort every unfinished request, forget the
        prefix cache's hashes (a dropped step may not have written blocks already hashed), then collect and drop
        the batches still in flight (what the workers owe for them, their errors ignored), so that the workers
        forget the requests at the next step and the engine serves new ones (a request left behind would be
        scheduled with tokens of a step that never finished). A second interrupt during the collection leaves the
        rest of it to the next `step`. A dead executor stays dead: the next step raises its error."""
        self.abort_request(list(self._parents))
        self.scheduler.kv.reset_prefix_cache()
        self._owed_after_failure = True
        self._drain_in_flight()
        self._owed_after_failure = False

    def _drain_in_flight(self) -> None:
        while self._in_flight:
            try:
                self.executor.collect()
            except Exception:  # noqa: BLE001 - the failure being recovered from, or one like it
                pass
            self._in_flight.popleft()  # only once collected: an interrupt above leaves it owed, for the next step

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self._in_flight)

    # ---- one step ------------------------------------------------------------------------------------------
    def step(self, final_only: bool = False, skip: Callable[[str], bool] | None = None) -> list[RequestOutput]:
        """Advance by one batch; return the outputs of the requests that progressed (final_only: that ended; `skip`:
        not those of the unfinished requests whose id it says true of: AsyncLLM's consumers that have not read the
        last one yet, since each output carries the whole text so far and a lagging reader skips to the newest).
        The batching is `step_progressed`'s."""
        return [out for pid in self.step_progressed(final_only, skip) if (out := self._make_output(pid)) is not None]

    def step_progressed(self, final_only: bool = False, skip: Callable[[str], bool] | None = None) -> list[str]:
        """Advance by one batch; return the ids of the requests that progressed (as `step` filters them), whose
        sequences `sequences_of` gives; the caller builds what it sends from them and calls `release` for each
        finished one (`step` does both through RequestOutputs; the engine process sends deltas, core_proc.py).

        With pipeline parallelism up to pp + 1 batches are in flight (synchronous: num_microbatches = pp + 1; async
        scheduling: pp and its one more): a step submits a new batch when one can be formed and a slot is free, and
        collects the oldest batch when the pipeline is full or nothing new can start. With one batch in flight that
        is submit-then-collect.
        """
        if self._owed_after_failure:  # a recovery whose collection was interrupted: finish it first
            self._drain_in_flight()
            self._owed_after_failure = False
        if len(self._in_flight) < self._max_in_flight:
            so = self.scheduler.schedule()
            self.stats.preemptions += so.num_preempted
            if not so.is_empty:
                now = time.time()
                for s in so.scheduled:
                    req = self.scheduler.requests.get(s.req_id)
                    if req is not None and req.metrics.first_scheduled_time is None:
                        req.metrics.first_scheduled_time = now
                self.executor.submit(so)
                self._in_flight.append(so)
                self.stats.max_in_flight = max(self.stats.max_in_flight, len(self._in_flight))
                if len(self._in_flight) < self._max_in_flight and self.scheduler.has_schedulable():
                    return []
        if not self._in_flight:
            return []
        so = self._in_flight[0]
        ro = self.executor.collect()
        self._in_flight.popleft()  # only once collected: a failure or interrupt above leaves it owed (the recovery)
        self.stats.steps += 1
        updated = self.scheduler.update_from_output(so, ro)
        now = time.time()
        parents: dict[str, None] = {}
        for req in updated:
            if req.status is RequestStatus.FINISHED_ABORTED:  # a sibling failed earlier in this loop: done
                continue
            try:
                if req.status is RequestStatus.FINISHED_ERROR:  # its sampling failed on the workers
                    raise _RequestFailed(req.error)
                self._process_token(req, now)
            except Exception as e:  # this request's outputs cannot be processed: it fails, the others run on
                self._fail_request(req, e, now)
            if not final_only or req.is_finished:  # final_only: only a finished child can finish its parent
                parents[req.parent_id] = None
        self.stats.generation_tokens += len(updated)
        if final_only:
            parents = {p: None for p in parents if all(c.is_finished for c in self._parents.get(p, ()))}
        elif skip is not None:
            parents = {p: None for p in parents if not skip(p) or all(c.is_finished for c in self._parents.get(p, ()))}
        return list(parents)

    def sequences_of(self, parent_id: str) -> list[Request] | None:
        """The sequences (n of them) of request `parent_id`, None once released or aborted."""
        return self._parents.get(parent_id)

    def release(self, parent_id: str) -> None:
        """Forget a finished request (its output has been taken)."""
        self._parents.pop(parent_id, None)

    def _process_token(self, req: Request, now: float) -> None:
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
            self.stats.prompt_tokens += req.num_prompt_tokens
        entry = getattr(req, "pending_logprobs", None)
        if entry is not None and req.logprobs is not None:
            req.logprobs.append(make_logprobs(self.tokenizer, entry, req.token_ids[-1]))
            req.pending_logprobs = None
        if self.tokenizer is not None and req.sampling_params.detokenize:
            delta = detokenize_incrementally(self.tokenizer, req)
            stop = find_stop_string(req, len(delta))
            if stop is not None:
                req.stop_reason = stop
                if req.is_finished:  # it also hit max_tokens (or a stop token) this step: the string is why
                    req.status = RequestStatus.FINISHED_STOPPED
                else:
                    self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED)
        if req.is_finished:
            req.metrics.finished_time = now
            reason = req.status.finish_reason
            self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1

    def _fail_request(self, req: Request, e: Exception, now: float) -> None:
        """End `req` with finish reason "error" and its siblings (n > 1) as aborted; log it briefly."""
        req.error = str(e) if isinstance(e, _RequestFailed) else f"processing the output failed: {e!r}"
        logger.warning("request %s failed: %s", req.parent_id, req.error)
        for c in self._parents.get(req.parent_id, [req]):
            if not c.is_finished or c is req:
                status = RequestStatus.FINISHED_ERROR if c is req else RequestStatus.FINISHED_ABORTED
                self.scheduler.finish_request(c.request_id, status)
                c.status = status  # one the scheduler already finished (a sampling error) keeps its error
                c.metrics.finished_time = now
                self.stats.finished[status.finish_reason] = self.stats.finished.get(status.finish_reason, 0) + 1

    def _make_output(self, parent_id: str) -> RequestOutput | None:
        children = self._parents.get(parent_id)
        if not children:
            return None
        finished = all(c.is_finished for c in children)
        if finished:
            del self._parents[parent_id]
        first = children[0]
        # AsyncLLM hands outputs to another thread while this one goes on appending to the request's lists: the
        # token ids are a slice (a copy); a running request's logprobs a snapshot of the entries so far (no copy:
        # the list only grows, and a copy per step would be quadratic in the output length)
        outs = [CompletionOutput(c.index, visible_text(c), c.output_token_ids, c.status.finish_reason,
                                 c.stop_reason, _logprobs_out(c), c.error)
                for c in children]
        metrics = first.metrics if len(children) == 1 else _parent_metrics(children)
        return RequestOutput(parent_id, first.prompt, first.prompt_token_ids, outs, finished, metrics,
                             first.num_cached_tokens, make_prompt_logprobs(self.tokenizer, first))

    def snapshot(self, healthy: bool = True, poll_memory: bool = True) -> EngineSnapshot:
        """The engine's gauges and counters now, for /metrics (EngineSnapshot). Device memory per rank and the MoE
        expert load are re-read at most every _MEMORY_POLL_S and only when `poll_memory` (not from a failed
        engine's workers); otherwise the last values."""
        now = time.monotonic()
        if poll_memory and now - self._memory_time >= _MEMORY_POLL_S:
            try:
                self._memory = tuple(self.memory_in_use())
                self._expert_load = self.executor.expert_load()
            except Exception:
                logger.debug("memory_in_use failed", exc_info=True)
            self._memory_time = now
        stats, kv = self.stats, self.kv_cache_manager
        return EngineSnapshot(
            num_requests_running=len(self.scheduler.running), num_requests_waiting=len(self.scheduler.waiting),
            kv_cache_usage=kv.usage, num_kv_blocks=kv.num_blocks, prompt_tokens=stats.prompt_tokens,
            kv_cache_capacity_tokens=kv.capacity_tokens, generation_tokens=stats.generation_tokens,
            finished=dict(stats.finished), preemptions=stats.preemptions, prefix_cache_queries=kv.prefix_queries,
            prefix_cache_hits=kv.prefix_hits, memory_in_use=self._memory, expert_load=self._expert_load,
            is_healthy=healthy)

    def memory_in_use(self) -> list[int]:
        return self.executor.memory_in_use()

    def shutdown(self) -> None:
        self.executor.shutdown()
