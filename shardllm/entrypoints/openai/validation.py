"""Request checks before pydantic sees a body: JSON that is too deep, fields we do not support, and the cap on
sequences per request. Each failure is an APIError (400 in OpenAI's shape) that names the field and the fix."""

from __future__ import annotations

import json
from typing import Any

from shardllm.entrypoints.openai.protocol import APIError

MAX_JSON_DEPTH = 64  # nested arrays/objects; OpenAI requests (tool schemas included) stay far below
DEFAULT_MAX_SEQS_PER_REQUEST = 256  # prompts x n of one request
SUPPORTED_FIELDS_DOC = "docs/openai_api.md"


def parse_json_object(body: bytes) -> dict:
    """The body as a JSON object. Raises APIError (400) for invalid JSON, a non-object, or arrays/objects nested
    deeper than MAX_JSON_DEPTH (deeper still, json's own recursion ends in a RecursionError: a 400 too)."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(f"The request body is not valid JSON ({e}).", code="invalid_json") from None
    except RecursionError:
        raise _too_deep() from None
    if not isinstance(data, dict):
        raise APIError("The request body must be a JSON object.", code="invalid_json")
    _check_depth(data)
    return data


def _too_deep() -> APIError:
    return APIError(f"The request body nests JSON arrays/objects deeper than {MAX_JSON_DEPTH} levels.",
                    code="invalid_json")


def _check_depth(data: Any) -> None:
    """Walk the parsed containers with an explicit stack (no recursion), failing past MAX_JSON_DEPTH."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise _too_deep()
        children = value.values() if isinstance(value, dict) else value
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))


def check_supported_fields(data: dict[str, Any], model_cls) -> None:
    """An OpenAI field we do not implement is a 400, never silently dropped. A field sent as null asks for nothing,
    so it passes (some clients send every field)."""
    known = set(model_cls.model_fields)
    unknown = sorted(k for k, v in data.items() if k not in known and v is not None)
    opts = data.get("stream_options")
    if not unknown and isinstance(opts, dict) and "stream_options" in known:  # one level down, the same rule
        sub = model_cls.model_fields["stream_options"].annotation
        fields = next((set(t.model_fields) for t in getattr(sub, "__args__", (sub,)) if hasattr(t, "model_fields")),
                      set())
        unknown = sorted(f"stream_options.{k}" for k, v in opts.items() if k not in fields and v is not None)
    if unknown:
        name = unknown[0]
        raise APIError(f"'{name}' is not supported by this server (see {SUPPORTED_FIELDS_DOC} for the fields it "
                       "implements); remove it from the request.", param=name, code="unsupported_parameter")


def check_num_seqs(num_prompts: int, n: int, max_seqs: int) -> None:
    """prompts x n sequences must not pass the operator's cap (--max_seqs_per_request)."""
    if num_prompts * n > max_seqs:
        raise APIError(f"This request asks for {num_prompts} prompt(s) x n={n} = {num_prompts * n} sequences; this "
                       f"server allows at most {max_seqs} per request (--max_seqs_per_request). Send fewer prompts "
                       "or a smaller n, or split the request.", param="n" if num_prompts == 1 else "prompt")


def split_prompts(prompt: Any) -> list:
    """The prompts a completions `prompt` holds: a string or a list of token ids is one, else a list of either."""
    return [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
