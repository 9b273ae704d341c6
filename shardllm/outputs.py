"""What `LLM.generate` returns: one RequestOutput per prompt, one CompletionOutput per sample."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any


class Logprob:
    """A token's log-probability and its text (vLLM's Logprob).

    `decoded_token` is decoded on first read when built with `tokenizer` and `token_id`: the engine thread makes
    k + 1 of these per token, and the server never reads them (it names tokens by their bytes), so the decode is
    paid only by a caller who asks. None when there is no tokenizer.
    """

    __slots__ = ("logprob", "_decoded_token", "_tokenizer", "_token_id")

    def __init__(self, logprob: float, decoded_token: str | None = None, *, tokenizer: Any = None,
                 token_id: int | None = None):
        self.logprob = logprob
        self._decoded_token = decoded_token
        self._tokenizer = tokenizer if decoded_token is None and token_id is not None else None
        self._token_id = token_id

    @property
    def decoded_token(self) -> str | None:
        if self._tokenizer is not None:
            self._decoded_token = self._tokenizer.decode([self._token_id])
            self._tokenizer = None
        return self._decoded_token

    @decoded_token.setter
    def decoded_token(self, value: str | None) -> None:
        self._decoded_token, self._tokenizer = value, None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Logprob):
            return NotImplemented
        return self.logprob == other.logprob and self.decoded_token == other.decoded_token

    __hash__ = None  # mutable, as the dataclass it replaces

    def __repr__(self) -> str:
        return f"Logprob(logprob={self.logprob!r}, decoded_token={self.decoded_token!r})"

    def __reduce__(self):  # pickled decoded, never with its tokenizer
        return Logprob, (self.logprob, self.decoded_token)


class LogprobsSnapshot(Sequence):
    """The first `n` entries of a list that only grows (a running request's logprobs), without copying it.

    A running request's output is handed to another thread (AsyncLLM) while the engine appends to the list: a
    copy per step would cost O(tokens so far) each step, O(n^2) over a request; this costs O(1). Reads as a
    read-only list of n entries (len, index, slices as lists, iteration, == with a list).
    """

    __slots__ = ("_entries", "_n")

    def __init__(self, entries: list, n: int | None = None):
        self._entries = entries
        self._n = len(entries) if n is None else n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._entries[i] for i in range(*index.indices(self._n))]
        i = index + self._n if index < 0 else index
        if not 0 <= i < self._n:
            raise IndexError("logprobs index out of range")
        return self._entries[i]

    def __iter__(self) -> Iterator:
        entries = self._entries
        return (entries[i] for i in range(self._n))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, (list, tuple, LogprobsSnapshot)):
            return NotImplemented
        return len(other) == self._n and all(a == b for a, b in zip(self, other))

    __hash__ = None

    def __repr__(self) -> str:
        return repr(list(self))


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: str | int | None = None  # the stop string or token that ended it
    # One dict per generated token: token id -> Logprob (the chosen token and the top-k). A list once finished;
    # while running, a LogprobsSnapshot (a read-only sequence of the entries so far, shared, not copied).
    logprobs: list[dict[int, Logprob]] | LogprobsSnapshot | None = None
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
