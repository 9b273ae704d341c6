"""Sampling parameters of one request, validated at construction (OpenAI/vLLM semantics)."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# A seed is a signed 64-bit integer, as in vLLM (torch.Generator.manual_seed takes no more).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
LOGIT_BIAS_MAX = 100.0  # OpenAI's range for a logit_bias value: [-100, 100]

# The scalar fields by type, checked before their ranges (TypeError naming the field). An integer field takes any
# numbers.Integral but bool (np.int64 becomes int); a number field any numbers.Real but bool; a flag only a bool.
_INTEGER_RULES = {  # field -> what it must be, as the messages say it
    "max_tokens": "an integer >= 1, or None for the rest of the context", "min_tokens": "an integer >= 0",
    "top_k": "0 or -1 (disabled) or a positive integer", "seed": "an integer in [-2**63, 2**63 - 1], or None",
    "n": "an integer >= 1", "logprobs": "an integer in [0, 20], or None",
    "prompt_logprobs": "an integer in [0, 20], or None",
}
_OPTIONAL_INTEGERS = ("max_tokens", "seed", "logprobs", "prompt_logprobs")
_NUMBER_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
_FLAG_FIELDS = ("ignore_eos", "skip_special_tokens", "detokenize")


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
    A value of the wrong type is a TypeError naming the field: an integer field takes no bool and no float (numpy
    integers are taken, as ints), a flag only True or False; a value out of range is a ValueError.
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
        self._check_types()
        self._validate()

    def _check_types(self) -> None:
        """TypeError, naming the field and what it takes, for a value of the wrong type, before any range check
        compares it (a bool is no number here: True would mean 1, silently); numpy integers become ints, numpy
        bools bools (numpy floats stay as they are: they compare and compute as floats)."""
        for name, rule in _INTEGER_RULES.items():
            value = getattr(self, name)
            if value is not None or name not in _OPTIONAL_INTEGERS:
                setattr(self, name, _integer(name, value, rule))
        for name in _NUMBER_FIELDS:
            setattr(self, name, _number(name, getattr(self, name)))
        for name in _FLAG_FIELDS:
            value = getattr(self, name)
            if isinstance(value, np.bool_):  # np.True_: a bool
                setattr(self, name, value := bool(value))
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {_show(value)}")
        stop = [self.stop] if isinstance(self.stop, str) else _items("stop", self.stop, "a string or a list of strings")
        for s in stop:
            if not isinstance(s, str):
                raise TypeError(f"stop must be a string or a list of strings, got {_show(s)} in it")
        self.stop = stop
        rule = "a list of token ids (non-negative integers)"
        self.stop_token_ids = [_integer("stop_token_ids", t, rule, " in it")
                               for t in _items("stop_token_ids", self.stop_token_ids, rule)]
        if self.logit_bias is not None and not isinstance(self.logit_bias, Mapping):
            raise TypeError(f"logit_bias must be a dict of token id -> bias in [-100, 100], got "
                            f"{_show(self.logit_bias)}: pass {{token_id: bias}}")
        bias = {}
        for t, b in (self.logit_bias or {}).items():
            t = _integer("logit_bias", t, "a dict whose keys are token ids (integers)", " as a key")
            bias[t] = _number("logit_bias values", b, f" for token {t}", "numbers")
        self.logit_bias = bias or None
        rule = "a list of callables"
        if callable(self.logits_processors):
            raise TypeError(f"logits_processors must be {rule}, got the single callable "
                            f"{_show(self.logits_processors)}: wrap it in a list")
        procs = _items("logits_processors", self.logits_processors, rule)
        for f in procs:
            if not callable(f):
                raise TypeError(f"logits_processors must be {rule}, got {_show(f)} in it")
        self.logits_processors = procs or None

    def _validate(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        check(self.max_tokens is None or self.max_tokens >= 1,
              f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        check(self.min_tokens >= 0, f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
              f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        check(0.0 <= self.temperature <= 100.0,
              f"temperature must be in [0, 100] (0 is greedy), got {self.temperature!r}")
        check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p!r}")
        check(self.top_k >= -1, f"top_k must be 0 or -1 (disabled) or a positive integer, got {self.top_k!r}")
        check(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p!r}")
        check(self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
        check(self.logprobs is None or 0 <= self.logprobs <= 20,
              f"logprobs must be an integer in [0, 20], got {self.logprobs!r}")
        check(self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
              f"prompt_logprobs must be an integer in [0, 20], got {self.prompt_logprobs!r}")
        # NaN fails every range below, as it fails those above
        check(-2.0 <= self.presence_penalty <= 2.0,
              f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}")
        check(-2.0 <= self.frequency_penalty <= 2.0,
              f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}")
        check(0.0 < self.repetition_penalty <= 2.0,
              f"repetition_penalty must be in (0, 2], got {self.repetition_penalty!r}")
        check(all(self.stop), f"stop strings must not be empty, got {self.stop!r}: drop the empty one")
        check(all(t >= 0 for t in self.stop_token_ids),
              f"stop_token_ids must be a list of non-negative integers, got {self.stop_token_ids!r}")
        check(self.seed is None or SEED_MIN <= self.seed <= SEED_MAX,
              f"seed must be an integer in [-2**63, 2**63 - 1], got {self.seed!r}")
        for t, b in (self.logit_bias or {}).items():
            check(t >= 0, f"logit_bias keys must be token ids (non-negative integers), got {t!r}")
            check(-LOGIT_BIAS_MAX <= b <= LOGIT_BIAS_MAX,
                  f"logit_bias values must be in [-100, 100], got {b!r} for token {t}")

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


def _show(value: Any) -> str:
    """The type (module-qualified outside the builtins: numpy.bool is not bool) and value of a bad input."""
    text = repr(value)
    kind = type(value).__name__ if type(value).__module__ == "builtins" else \
        f"{type(value).__module__}.{type(value).__name__}"
    return f"{kind} {text if len(text) <= 60 else text[:57] + '...'}"


def _integer(name: str, value: Any, rule: str, where: str = "") -> int:
    """value as an int; TypeError naming the field for a bool, a float or a non-number."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return value if isinstance(value, int) else int(value)
    hint = " (a bool is not a number here)" if isinstance(value, bool) else ""
    raise TypeError(f"{name} must be {rule}, got {_show(value)}{where}{hint}: pass an int")


def _number(name: str, value: Any, where: str = "", noun: str = "a number") -> int | float:
    """value as an int or a float; TypeError naming the field for a bool or a non-number. The range is the caller's."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return value if isinstance(value, (int, float)) else float(value)
    hint = " (a bool is not a number here)" if isinstance(value, bool) else ""
    raise TypeError(f"{name} must be {noun} (int or float), got {_show(value)}{where}{hint}")


def _items(name: str, value: Any, rule: str) -> list:
    """A list of the items of a container field (None: empty); TypeError naming the field for a non-container,
    or for a string, bytes or a dict, whose items are never what the field means."""
    if value is None:
        return []
    if isinstance(value, (str, bytes, bytearray, Mapping)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be {rule}, got {_show(value)}")
    return list(value)
