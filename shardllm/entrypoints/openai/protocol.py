"""OpenAI API request models (pydantic, strict types), errors in OpenAI's shape, and response pieces."""

from __future__ import annotations

from itertools import takewhile
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shardllm.llm import CHAT_ROLES, join_text_parts
from shardllm.sampling_params import LOGIT_BIAS_MAX, SEED_MAX, SEED_MIN, SamplingParams


class APIError(Exception):
    """An error answered to the client as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, status_code: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status_code, self.type, self.param, self.code = message, status_code, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_UNION_HINTS = {"prompt": "a string, a list of strings, a list of token ids or a list of such lists",
                "stop": "a string or a list of strings", "content": "a string or a list of text parts"}


def validation_error(e: ValidationError, data: Any = None) -> APIError:
    """The first problem pydantic found in `data`, named by its top-level field."""
    errors = e.errors(include_url=False)
    first = errors[0]
    loc = list(first["loc"])
    field = str(loc[0]) if loc else None
    union = [err["loc"] for err in errors if err["loc"][:1] == first["loc"][:1]]
    if len(union) > 1:  # every alternative of a union failed: name the union, not its first branch
        path = list(union[0])
        for other in union[1:]:
            path = [a for a, _ in takewhile(lambda ab: ab[0] == ab[1], zip(path, other))]
        names = [str(x) for x in path if isinstance(x, str)]
        value = data
        for key in path:
            value = value[key] if isinstance(value, (dict, list)) and _has(value, key) else None
        msg = (f"'{'.'.join(map(str, path))}' must be {_UNION_HINTS.get(names[-1] if names else '', 'of another type')}"
               f" (got {_short(value)})")
    elif first["type"] == "missing":
        msg = f"'{'.'.join(map(str, loc))}' is a required field"
    else:
        msg = f"'{'.'.join(map(str, loc))}': {first['msg']} (got {_short(first.get('input'))})"
    return APIError(msg, param=field, code="missing_required_parameter" if first["type"] == "missing" else None)


def _has(container: dict | list, key: Any) -> bool:
    return key in container if isinstance(container, dict) else isinstance(key, int) and 0 <= key < len(container)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Strict(BaseModel):
    # Strict: "5" is not an integer, 1 is not a boolean. Unknown top-level fields are refused before validation
    # (validation.check_supported_fields, which lets a null through), so here they are ignored.
    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        """A field sent as null takes its default, as OpenAI documents its nullable parameters ("max_tokens":
        null on completions is 16, not the rest of the context; "n": null is 1); a required one is then missing."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(_Strict):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False


class _SamplingFields(_Strict):
    """The sampling fields shared by completions and chat; the extensions after `user` are vLLM's."""

    model: str
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)  # signed 64-bit, as vLLM
    logit_bias: dict[str, float] | None = None  # token id (a decimal string, as JSON keys are) -> [-100, 100]
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    user: str | None = None
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        try:
            return SamplingParams(
                max_tokens=max_tokens, min_tokens=self.min_tokens,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0,
                min_p=self.min_p or 0.0, seed=self.seed, n=self.n, stop=self.stop,
                stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, logprobs=logprobs,
                presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
                repetition_penalty=self.repetition_penalty or 1.0, skip_special_tokens=self.skip_special_tokens,
                logit_bias=self.token_logit_bias())
        except (ValueError, TypeError) as e:
            raise APIError(str(e), param=str(e).split(" ", 1)[0]) from e

    def token_logit_bias(self, vocab_size: int | None = None) -> dict[int, float] | None:
        """logit_bias with integer keys; APIError for a key that is not a token id (of the vocabulary, if given)
        or a bias outside [-100, 100]."""
        if not self.logit_bias:
            return None
        out = {}
        for key, bias in self.logit_bias.items():
            if (not (key.isascii() and key.isdigit()) or len(key) > 19  # int() of 4,301+ digits raises
                    or (vocab_size is not None and int(key) >= vocab_size)):
                raise APIError(f"logit_bias keys must be token ids in [0, {vocab_size or 'vocab size'}), got {key!r}",
                               param="logit_bias")
            if not -LOGIT_BIAS_MAX <= bias <= LOGIT_BIAS_MAX:
                raise APIError(f"logit_bias values must be in [-100, 100], got {bias!r} for token {key}",
                               param="logit_bias")
            out[int(key)] = bias
        return out


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_Strict):
    type: Literal["text"]  # other keys of a part (cache_control, ...) are ignored, as vLLM does
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # tool_calls, name, ... pass to the template
    role: Literal[CHAT_ROLES]  # the offline LLM.chat checks the same
    content: str | list[TextPart] | None = None

    def template_dict(self) -> dict:
        d = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            d["content"] = join_text_parts([p.text for p in self.content])
        d.setdefault("content", "")
        return d


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


# ---- response pieces -------------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
