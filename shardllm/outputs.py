"""What `LLM.generate` returns: one RequestOutput per prompt, one CompletionOutput per sample."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: str | int | None = None  # the stop string or token that ended it
    # One dict per generated token: token id -> Logprob (the chosen token and the top-k).
    logprobs: list[dict[int, Logprob]] | None = None
    error: str | None = None  # finish_reason "error": what failed (this request alone; the engine runs on)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(0.0))
    num_cached_tokens: int = 0
    # SamplingParams.prompt_logprobs: one dict per prompt token (None for the first), as `logprobs` has.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
