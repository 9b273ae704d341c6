"""A request as the scheduler sees it: token ids, how many are computed, and why it finished."""

from __future__ import annotations

import enum
import time

from shardllm.outputs import Logprob, RequestMetrics
from shardllm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_ERROR = enum.auto()  # processing this request's inputs or outputs raised: it alone fails

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length",
                   RequestStatus.FINISHED_ABORTED: "abort", RequestStatus.FINISHED_ERROR: "error"}


class Request:
    """One sequence. `token_ids` is the prompt followed by the generated tokens.

    The scheduler advances `num_computed_tokens` (tokens whose KV is in the cache); the sampled token
    of a step is appended by `append_token`. `num_in_flight` counts the batches holding the request that
    have not come back yet: pipeline parallelism keeps several batches in flight but a request joins only
    one; async scheduling lets a decoding request join the next batch too. `num_pending` counts the tokens
    its in-flight batches will sample that are not known here yet (a later batch feeds one as a placeholder).
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 arrival_time: float | None = None, prompt: str | None = None, parent_id: str | None = None,
                 index: int = 0):
        self.request_id = request_id
        self.parent_id = parent_id if parent_id is not None else request_id
        self.index = index
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at first schedule
        self.num_preemptions = 0
        self.num_in_flight = 0
        self.num_pending = 0
        self.num_blocks_sent = 0  # block ids of its table the workers already hold (tables travel as deltas)
        self.num_blocks_offered = 0  # its full blocks the KV manager has offered to the prefix cache
        self.block_hashes: list[int] = []
        self.stop_reason: str | int | None = None
        self.error: str | None = None  # why it finished with FINISHED_ERROR
        # detokenizer state
        self.output_text = ""
        self.prefix_offset = 0
        self.read_offset = 0
        self.decode_stream = None  # (tokenizers' DecodeStream, its Tokenizer) where the tokenizer allows
        self.stream_fed = 0  # tokens fed to decode_stream
        self.logprobs: list[dict[int, Logprob]] | None = [] if sampling_params.logprobs is not None else None
        # prompt_logprobs: per prompt position, (logprob, top k) as the workers send it (None: the first, or not
        # computed yet); the engine turns it into RequestOutput.prompt_logprobs
        self.prompt_logprobs: list | None = ([None] * self.num_prompt_tokens
                                             if sampling_params.prompt_logprobs is not None else None)
        self.metrics = RequestMetrics(arrival_time=arrival_time if arrival_time is not None else time.time())

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status in _FINISH_REASONS

    @property
    def is_in_flight(self) -> bool:
        return self.num_in_flight > 0

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Request({self.request_id}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
                f"{self.status.name})")
