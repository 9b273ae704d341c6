"""The wire format between the driver and the workers: a step's plan (`SchedulerOutput`) and its result
(`ModelRunnerOutput`). The scheduler, every executor (uniproc, multiproc, Ray) and the workers import this
module, so no worker imports the scheduler and no executor imports the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shardllm.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """Sent to the workers the first time a request is scheduled."""

    req_id: str
    num_prompt_tokens: int
    sampling_params: SamplingParams
    prompt_token_ids: list[int] | None = None  # only with prompt_logprobs (the targets of the prompt's logits)


PLACEHOLDER = -1  # a token an in-flight step samples, not yet known to the scheduler (async scheduling)


@dataclass(slots=True)
class ScheduledRequest:
    req_id: str
    token_ids: list[int]  # the tokens whose KV this step computes; a last PLACEHOLDER is filled on the device
    num_computed_tokens: int  # position of token_ids[0]
    block_ids: list[int]  # the request's block table from index block_start on (the blocks new to the workers)
    do_sample: bool  # the chunk reaches the end of the known tokens: sample the next one
    block_start: int = 0  # workers cut their copy of the table here, then append block_ids (0: the whole table)


@dataclass
class SchedulerOutput:
    """One step's plan. It travels to every worker each step, so it pickles as columns of plain lists
    (several times faster to load than one object per request) and block tables travel as deltas."""

    new_requests: list[NewRequestData] = field(default_factory=list)
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    finished_req_ids: list[str] = field(default_factory=list)  # workers drop their state for these
    num_batched_tokens: int = 0
    num_preempted: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    def __getstate__(self):
        sc = self.scheduled
        cols = ([s.req_id for s in sc], [s.token_ids for s in sc], [s.num_computed_tokens for s in sc],
                [s.block_ids for s in sc], [s.do_sample for s in sc], [s.block_start for s in sc])
        return self.new_requests, self.finished_req_ids, self.num_batched_tokens, self.num_preempted, cols

    def __setstate__(self, state) -> None:
        self.new_requests, self.finished_req_ids, self.num_batched_tokens, self.num_preempted, cols = state
        self.scheduled = list(map(ScheduledRequest, *cols))


@dataclass
class ModelRunnerOutput:
    """The sampled tokens of a step, in the order of the scheduled requests that sampled."""

    req_ids: list[str]
    sampled_token_ids: list[int]
    # Per sampled request: (logprob of the chosen token, [(token id, logprob) of the top k]) or None.
    logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None
    # Requests whose sampling failed this step (a bad parameter, a raising logits processor): id -> message.
    # Their entry in sampled_token_ids is a filler; the engine fails those requests alone.
    errors: dict[str, str] | None = None
    # prompt_logprobs: request id -> one (logprob, top k) per prompt token this step's chunk predicts, the first
    # being the token after the chunk's first position (scheduled num_computed_tokens + 1).
    prompt_logprobs: dict[str, list[tuple[float, list[tuple[int, float]]]]] | None = None
