"""The scheduler: picks each step's requests under a token budget (no prefill/decode phases).

Every request chases `num_computed_tokens` towards `num_tokens`; a step gives each one a chunk of up
to the remaining budget, so chunked prefill, prefix-cache hits and decode are the same loop. Running
requests go first; when the KV cache is full the newest running request is preempted (its blocks
freed, recomputed later). Waiting requests are admitted while budget, batch slots and blocks last.
"""

from __future__ import annotations

from collections import deque

from shardllm.config import SchedulerConfig
from shardllm.engine.kv_cache_manager import KVCacheManager
from shardllm.engine.request import Request, RequestStatus
from shardllm.step_io import PLACEHOLDER, ModelRunnerOutput, NewRequestData, ScheduledRequest, SchedulerOutput


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager):
        self.config = config
        self.kv = kv_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._sent: set[str] = set()  # requests whose NewRequestData the workers have
        self._finished_ids: list[str] = []
        self.num_preemptions_total = 0
        # requests running at once (SchedulerConfig.max_num_running_seqs; batches split them evenly, see schedule)
        self.max_running = config.max_num_running_seqs or config.max_num_seqs * config.num_microbatches

    # ---- queue management ----------------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def has_schedulable(self) -> bool:
        """Is there a request that a new batch could take (not already in flight)?"""
        return bool(self.waiting) or any(self._num_schedulable(r) > 0 for r in self.running)

    def _num_schedulable(self, req: Request) -> int:
        """Tokens of `req` a new batch could take now (0: none, e.g. it is in flight and may not overlap)."""
        if req.num_in_flight:
            p = req.sampling_params
            if not self.config.async_scheduling or req.num_in_flight > 1 or p.needs_output_tokens:
                return 0  # penalties and logits processors read the tokens before: they wait for them
            if req.num_pending and (req.num_output_tokens + req.num_pending >= (p.max_tokens or 1 << 62)
                                    or req.num_tokens + req.num_pending >= self.config.max_model_len):
                return 0  # the pending token ends it by length: do not compute past it
        return req.num_tokens + req.num_pending - req.num_computed_tokens

    @property
    def num_in_flight(self) -> int:
        return sum(r.is_in_flight for r in self.running)

    def finish_request(self, req_id: str, status: RequestStatus) -> Request | None:
        """End a request (abort, or a stop string found by the detokenizer) and free its blocks."""
        req = self.requests.pop(req_id, None)
        if req is None:
            return None
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = status
        self.kv.free(req)
        if req_id in self._sent:
            self._sent.discard(req_id)
            self._finished_ids.append(req_id)
        return req

    # ---- one step ------------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        out = SchedulerOutput(finished_req_ids=self._finished_ids)
        self._finished_ids = []
        chosen: list[tuple[Request, int]] = []
        # With a pipeline, split the requests evenly over the batches kept in flight (num_microbatches: pp, or
        # pp + 1 when synchronous), each at most max_num_seqs, so that every stage has a batch to work on.
        active = len(self.running) + len(self.waiting)
        cap = min(cfg.max_num_seqs, -(-active // cfg.num_microbatches)) if cfg.num_microbatches > 1 else None

        # A pipeline with async scheduling fills a batch with requests that are not in flight (and new ones)
        # first, and only then runs in-flight ones ahead: else one micro-batch would chase itself.
        ahead_last = cap is not None and cfg.async_scheduling
        i = 0
        while i < len(self.running) and budget > 0 and (cap is None or len(chosen) < cap):
            req = self.running[i]
            num_new = min(self._num_schedulable(req), budget)
            if num_new <= 0 or (ahead_last and req.is_in_flight):
                i += 1
                continue
            while not self.kv.allocate_slots(req, num_new):
                victim = self._pick_victim(i)
                if victim is None:  # every candidate is in flight: wait for a batch to come back
                    break
                self._preempt(victim)
                out.num_preempted += 1
                if victim is req:
                    break
            else:
                chosen.append((req, num_new))
                budget -= num_new
                i += 1
                continue
            if victim is None:
                break

        if out.num_preempted == 0:
            while (self.waiting and budget > 0 and len(self.running) < self.max_running
                   and (cap is None or len(chosen) < cap)):
                req = self.waiting[0]
                computed_blocks, num_cached = [], 0
                if req.num_computed_tokens == 0 and req.sampling_params.prompt_logprobs is None:
                    # (prompt logprobs come from the prompt's positions: a cache hit would skip them, as in vLLM)
                    computed_blocks, num_cached = self.kv.get_computed_blocks(req)
                num_new = req.num_tokens - num_cached
                if not cfg.enable_chunked_prefill and num_new > budget:
                    break
                num_new = min(num_new, budget)
                if not self.kv.allocate_slots(req, num_new, computed_blocks):
                    break
                self.waiting.popleft()
                if req.status == RequestStatus.WAITING:
                    req.num_cached_tokens = num_cached
                req.num_computed_tokens = num_cached
                req.status = RequestStatus.RUNNING
                self.running.append(req)
                chosen.append((req, num_new))
                budget -= num_new

        if ahead_last and out.num_preempted == 0:
            for req in self.running:
                if budget <= 0 or len(chosen) >= cap:
                    break
                num_new = min(self._num_schedulable(req), budget) if req.is_in_flight else 0
                if num_new > 0 and self.kv.allocate_slots(req, num_new):
                    chosen.append((req, num_new))
                    budget -= num_new

        # one-token rows first (stable): a step that mixes them with longer chunks runs them in the decode kernel;
        # then chunks over cached context, then prompts from their start (with a pipeline's async scheduling an
        # in-flight request's chunk is chosen after new prompts): the step's tail without context may attend over
        # its own k, v (AttentionMetadata.fresh_from, layers/attention/flash_prefill.py)
        chosen.sort(key=lambda c: (c[1] > 1, c[0].num_computed_tokens == 0))
        for req, num_new in chosen:
            if req.request_id not in self._sent:
                self._sent.add(req.request_id)
                prompt = req.prompt_token_ids if req.sampling_params.prompt_logprobs is not None else None
                out.new_requests.append(NewRequestData(req.request_id, req.num_prompt_tokens, req.sampling_params,
                                                       prompt))
            start = req.num_computed_tokens
            end = start + num_new
            token_ids = req.token_ids[start:end]
            if end > req.num_tokens:  # async scheduling: the pending token is fed as a placeholder
                token_ids.append(PLACEHOLDER)
            do_sample = end == req.num_tokens + req.num_pending
            table = self.kv.get_block_ids(req.request_id)
            block_start = req.num_blocks_sent  # the workers hold the table up to here
            req.num_blocks_sent = len(table)
            out.scheduled.append(ScheduledRequest(req.request_id, token_ids, start, table[block_start:], do_sample,
                                                  block_start))
            req.num_computed_tokens = end
            req.num_in_flight += 1
            req.num_pending += do_sample
        out.num_batched_tokens = cfg.max_num_batched_tokens - budget
        self.num_preemptions_total += out.num_preempted
        return out

    def _pick_victim(self, current: int) -> Request | None:
        """The newest running request that is not in flight (possibly the current one); None if all are."""
        for j in range(len(self.running) - 1, current - 1, -1):
            if not self.running[j].is_in_flight:
                return self.running[j]
        return None

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_blocks_sent = 0  # its blocks are gone: the next schedule sends a whole new table
        req.num_preemptions += 1
        self.waiting.appendleft(req)

    # ---- results -------------------------------------------------------------------------------------------
    def update_from_output(self, sched_out: SchedulerOutput, runner_out: ModelRunnerOutput) -> list[Request]:
        """Append sampled tokens, apply token-level stops, free finished requests.

        Returns the requests that got a new token (finished ones included).
        """
        sampled = dict(zip(runner_out.req_ids, range(len(runner_out.req_ids))))
        updated: list[Request] = []
        block_size, prefix_caching = self.kv.block_size, self.kv.enable_prefix_caching
        for s in sched_out.scheduled:
            req = self.requests.get(s.req_id)
            if req is None:  # aborted while in flight
                continue
            req.num_in_flight -= 1
            if runner_out.prompt_logprobs and s.req_id in runner_out.prompt_logprobs:
                first = s.num_computed_tokens + 1  # the chunk's first position predicts the token after it
                entries = runner_out.prompt_logprobs[s.req_id]
                req.prompt_logprobs[first:first + len(entries)] = entries  # a recompute writes the same again
            k = sampled.get(s.req_id)
            if k is not None and runner_out.errors and s.req_id in runner_out.errors:
                req.num_pending -= 1  # its sampling failed on the workers: it ends here, alone
                req.error = runner_out.errors[s.req_id]
                self.finish_request(s.req_id, RequestStatus.FINISHED_ERROR)
                updated.append(req)
                continue
            if k is not None:
                req.num_pending -= 1
                req.append_token(runner_out.sampled_token_ids[k])
            if (min(req.num_computed_tokens, req.num_tokens) >= (req.num_blocks_offered + 1) * block_size
                    and prefix_caching):  # a block filled up: offer it to the prefix cache
                self.kv.cache_full_blocks(req)
            if k is None:
                continue
            token = req.token_ids[-1]
            if runner_out.logprobs is not None and runner_out.logprobs[k] is not None:
                req.pending_logprobs = runner_out.logprobs[k]
            updated.append(req)
            status = self._check_stop(req, token)
            if status is not None:
                self.finish_request(req.request_id, status)
        return updated

    def _check_stop(self, req: Request, token: int) -> RequestStatus | None:
        p = req.sampling_params
        if req.num_output_tokens >= p.min_tokens:
            if not p.ignore_eos and token in p.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token in p.stop_token_ids:
                req.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if p.max_tokens is not None and req.num_output_tokens >= p.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if req.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
