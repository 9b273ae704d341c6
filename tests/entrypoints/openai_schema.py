"""The response schemas of OpenAI's API document (github openai/openai-openapi, `openapi.yaml`), written out as
test data: for each type, its required properties and their types (nullable where the document says so), and
the optional properties we send. `check(body, SCHEMA)` raises AssertionError naming the path of a mismatch.

Where OpenAI's live API departs from its document, the live API wins, marked LIVE below: a stream chunk's
`finish_reason` and `usage` are null until the chunk that carries them, and an echoed prompt's first token
has null `token_logprobs` / `top_logprobs` (the document types their items as plain numbers / maps).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class T:
    """A type: 'string' | 'integer' | 'number' | 'boolean' | 'object' | 'array' | 'map' (values of one type)."""

    kind: str
    nullable: bool = False
    required: dict[str, T] = field(default_factory=dict)  # object
    optional: dict[str, T] = field(default_factory=dict)  # object
    items: T | None = None  # array items, map values
    enum: tuple = ()


STR, INT, NUM = T("string"), T("integer"), T("number")


def null(t: T) -> T:
    return T(t.kind, True, t.required, t.optional, t.items, t.enum)


def obj(required: dict[str, T], optional: dict[str, T] | None = None) -> T:
    return T("object", required=required, optional=optional or {})


def arr(items: T) -> T:
    return T("array", items=items)


def enum(*values: str) -> T:
    return T("string", enum=values)


def check(value: Any, t: T, path: str = "$") -> None:
    if value is None:
        assert t.nullable, f"{path} is null but not nullable"
        return
    ok = {"string": lambda v: isinstance(v, str), "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "boolean": lambda v: isinstance(v, bool), "object": lambda v: isinstance(v, dict),
          "map": lambda v: isinstance(v, dict), "array": lambda v: isinstance(v, list)}[t.kind]
    assert ok(value), f"{path} should be {t.kind}, got {type(value).__name__}: {value!r:.80}"
    if t.enum:
        assert value in t.enum, f"{path} = {value!r} is not one of {t.enum}"
    if t.kind == "object":
        for name, sub in t.required.items():
            assert name in value, f"{path}.{name} is required"
            check(value[name], sub, f"{path}.{name}")
        for name, sub in t.optional.items():
            if name in value:
                check(value[name], sub, f"{path}.{name}")
    elif t.kind == "array":
        for i, v in enumerate(value):
            check(v, t.items, f"{path}[{i}]")
    elif t.kind == "map":
        for k, v in value.items():
            check(v, t.items, f"{path}[{k!r}]")


# ---- components/schemas ---------------------------------------------------------------------------------------
CompletionUsage = obj({"completion_tokens": INT, "prompt_tokens": INT, "total_tokens": INT})

_TopLogprob = obj({"token": STR, "logprob": NUM, "bytes": null(arr(INT))})
ChatCompletionTokenLogprob = obj({"token": STR, "logprob": NUM, "bytes": null(arr(INT)),
                                  "top_logprobs": arr(_TopLogprob)})
_ChatLogprobs = null(obj({"content": null(arr(ChatCompletionTokenLogprob)),
                          "refusal": null(arr(ChatCompletionTokenLogprob))}))
_CHAT_FINISH = ("stop", "length", "tool_calls", "content_filter", "function_call")

ChatCompletionResponseMessage = obj(
    {"content": null(STR), "refusal": null(STR), "role": enum("assistant")},
    {"tool_calls": arr(obj({"id": STR, "type": STR, "function": obj({"name": STR, "arguments": STR})})),
     "annotations": arr(obj({"type": STR}))})

CreateChatCompletionResponse = obj(
    {"id": STR, "object": enum("chat.completion"), "created": INT, "model": STR,
     "choices": arr(obj({"finish_reason": enum(*_CHAT_FINISH), "index": INT,
                         "message": ChatCompletionResponseMessage, "logprobs": _ChatLogprobs}))},
    {"usage": CompletionUsage, "system_fingerprint": STR, "service_tier": null(STR)})

ChatCompletionStreamResponseDelta = obj(
    {}, {"content": null(STR), "refusal": null(STR),
         "role": enum("developer", "system", "user", "assistant", "tool"),
         "tool_calls": arr(obj({"index": INT}, {"id": STR, "type": enum("function")}))})

CreateChatCompletionStreamResponse = obj(
    {"id": STR, "object": enum("chat.completion.chunk"), "created": INT, "model": STR,
     "choices": arr(obj({"delta": ChatCompletionStreamResponseDelta,
                         "finish_reason": null(enum(*_CHAT_FINISH)),  # LIVE: null until the last chunk
                         "index": INT},
                        {"logprobs": _ChatLogprobs}))},
    {"usage": null(CompletionUsage),  # LIVE: null in every chunk but the last with include_usage
     "system_fingerprint": STR, "service_tier": null(STR)})

_CompletionLogprobs = null(obj({}, {"text_offset": arr(INT),
                                    "token_logprobs": arr(null(NUM)),  # LIVE: null for an echoed first token
                                    "tokens": arr(STR),
                                    "top_logprobs": arr(null(T("map", items=NUM)))}))  # LIVE: as token_logprobs


def _completion(finish_reason: T, usage: T) -> T:
    return obj({"id": STR, "object": enum("text_completion"), "created": INT, "model": STR,
                "choices": arr(obj({"finish_reason": finish_reason, "index": INT, "logprobs": _CompletionLogprobs,
                                    "text": STR}))},
               {"usage": usage, "system_fingerprint": STR})


_COMPLETION_FINISH = ("stop", "length", "content_filter")
CreateCompletionResponse = _completion(enum(*_COMPLETION_FINISH), CompletionUsage)
# the document gives stream chunks the same shape; LIVE: finish_reason and usage null until the chunk with them
CreateCompletionStreamResponse = _completion(null(enum(*_COMPLETION_FINISH)), null(CompletionUsage))

Model = obj({"id": STR, "created": INT, "object": enum("model"), "owned_by": STR})
ListModelsResponse = obj({"object": enum("list"), "data": arr(Model)})

ErrorResponse = obj({"error": obj({"code": null(STR), "message": STR, "param": null(STR), "type": STR})})
