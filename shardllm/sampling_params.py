"""Sampling parameters of one request, validated at construction (OpenAI/vLLM semantics)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# A seed is a signed 64-bit integer, as in vLLM (torch.Generator.manual_seed takes no more).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
LOGIT_BIAS_MAX = 100.0  # OpenAI's range for a logit_bias value: [-100, 100]


@dataclass
class SamplingParams:
    """How to pick tokens for one request.

    `temperature=0` is greedy. Stop strings are cut from the returned text, as OpenAI does.
    `logprobs=k` returns, for each generated token, its log-probability and the k most likely tokens.
    `prompt_logprobs=k` does the same for each prompt token (vLLM's: None for the first, which has no context);
    such a request skips the prefix cache, whose hits would skip the positions that make them.
    `seed` is a signed 64-bit integer; with n > 1 sample i uses seed + i (wrapped into that range).
    `logit_bias` maps token id -> a bias in [-100, 100] added to its logit before sampling (OpenAI's).
    `logits_processors` are callables `(output_token_ids: list[int], logits: Tensor (V,) float32) -> Tensor (V,)`
    run on the sampling rank before sampling (vLLM's offline API; they must pickle with more than one rank).
    An exception raised by one fails that request only.
    """

    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    skip_special_tokens: bool = True
    detokenize: bool = True
    logit_bias: dict[int, float] | None = None
    logits_processors: list[Callable[[list[int], Any], Any]] | None = None
    # Filled by the engine: the model's end-of-sequence ids (empty with ignore_eos).
    eos_token_ids: tuple[int, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = dict(self.logit_bias) if self.logit_bias else None
        self.logits_processors = list(self.logits_processors) if self.logits_processors else None
        self._validate()

    def _validate(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
              f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        check(isinstance(self.min_tokens, int) and self.min_tokens >= 0,
              f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
              f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        check(isinstance(self.temperature, (int, float)) and 0.0 <= self.temperature <= 100.0,
              f"temperature must be in [0, 100] (0 is greedy), got {self.temperature!r}")
        check(isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0,
              f"top_p must be in (0, 1], got {self.top_p!r}")
        check(isinstance(self.top_k, int) and self.top_k >= -1,
              f"top_k must be 0 or -1 (disabled) or a positive integer, got {self.top_k!r}")
        check(isinstance(self.min_p, (int, float)) and 0.0 <= self.min_p <= 1.0,
              f"min_p must be in [0, 1], got {self.min_p!r}")
        check(isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
        check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
              f"logprobs must be an integer in [0, 20], got {self.logprobs!r}")
        check(self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int)
                                               and 0 <= self.prompt_logprobs <= 20),
              f"prompt_logprobs must be an integer in [0, 20], got {self.prompt_logprobs!r}")
        check(-2.0 <= self.presence_penalty <= 2.0,
              f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}")
        check(-2.0 <= self.frequency_penalty <= 2.0,
              f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}")
        check(0.0 < self.repetition_penalty <= 2.0,
              f"repetition_penalty must be in (0, 2], got {self.repetition_penalty!r}")
        check(all(isinstance(s, str) and s for s in self.stop), "stop must be a non-empty string or list of them")
        check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
              "stop_token_ids must be a list of non-negative integers")
        check(self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)
                                    and SEED_MIN <= self.seed <= SEED_MAX),
              f"seed must be an integer in [-2**63, 2**63 - 1], got {self.seed!r}")
        check(all(_is_real(v) for v in (self.temperature, self.top_p, self.min_p, self.presence_penalty,
                                        self.frequency_penalty, self.repetition_penalty)),
              "temperature, top_p, min_p and the penalties must be finite numbers")
        for t, b in (self.logit_bias or {}).items():
            check(isinstance(t, int) and not isinstance(t, bool) and t >= 0,
                  f"logit_bias keys must be token ids (non-negative integers), got {t!r}")
            check(_is_real(b) and -LOGIT_BIAS_MAX <= b <= LOGIT_BIAS_MAX,
                  f"logit_bias values must be in [-100, 100], got {b!r} for token {t}")
        check(all(callable(f) for f in self.logits_processors or ()), "logits_processors must be callables")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def needs_output_tokens(self) -> bool:
        """Does sampling read the tokens before (penalties, logits processors)? Such a request is never
        scheduled ahead of its last token (async scheduling)."""
        return self.needs_penalties or bool(self.logits_processors)

    def child_seed(self, index: int) -> int | None:
        """The seed of sample `index` of n: seed + index, wrapped into the signed 64-bit range."""
        if self.seed is None:
            return None
        return (self.seed + index - SEED_MIN) % 2**64 + SEED_MIN

    def clone(self, **changes) -> SamplingParams:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d.update(changes)
        return SamplingParams(**d)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
