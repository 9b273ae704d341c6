"""Request checks before pydantic sees a body: JSON that is too deep, fields we do not support, and the cap on
sequences per request. Each failure is an APIError (400 in OpenAI's shape) that names the field and the fix."""

from __future__ import annotations

import json
from typing import Any

from shardllm.entrypoints.openai.protocol import APIError

MAX_JSON_DEPTH = 64  # nested arrays/objects; OpenAI requests (tool schemas included) stay far below
DEFAULT_MAX_SEQS_PER_REQUEST = 256  # prompts x n of one request
SUPPORTED_FIELDS_DOC = "docs/openai_api.md"
# Stop conditions are checked for every sequence at every step on the engine thread, so their size is bounded:
# OpenAI allows 4 stop strings, TGI 4 by default; vLLM sets no bound.
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 1024


def parse_json_object(body: bytes) -> dict:
    """The body as a JSON object. Raises APIError (400) for invalid JSON, a number past Python's 4,300-digit
    conversion limit, a non-object, arrays/objects nested deeper than MAX_JSON_DEPTH (deeper still, json's own
    recursion ends in a RecursionError: a 400 too), or a string (key or value) holding a lone UTF-16 surrogate
    (valid in JSON's escapes, not in Unicode text: no tokenizer or UTF-8 response can carry it)."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(f"The request body is not valid JSON ({e}).", code="invalid_json") from None
    except RecursionError:
        raise _too_deep() from None
    except ValueError:  # int() past sys.get_int_max_str_digits()
        raise APIError("The request body holds a number with more than 4,300 digits.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError("The request body must be a JSON object.", code="invalid_json")
    _check_structure(data)
    return data


def _too_deep() -> APIError:
    return APIError(f"The request body nests JSON arrays/objects deeper than {MAX_JSON_DEPTH} levels.",
                    code="invalid_json")


def _lone_surrogate(text: str) -> bool:
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _check_structure(data: Any) -> None:
    """Walk the parsed containers with an explicit stack (no recursion), failing past MAX_JSON_DEPTH or at a
    string with a lone surrogate (the error names where: param is the top-level field)."""
    stack: list[tuple[Any, tuple]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        if len(path) >= MAX_JSON_DEPTH:
            raise _too_deep()
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, child in items:
            if isinstance(key, str) and _lone_surrogate(key):
                raise _surrogate(path, key)
            if isinstance(child, str):
                if _lone_surrogate(child):
                    raise _surrogate((*path, key))
            elif isinstance(child, (dict, list)):
                stack.append((child, (*path, key)))


def _surrogate(path: tuple, key: str | None = None) -> APIError:
    """The error for a lone surrogate at `path` (in a key of the object there, if `key`); param is the top-level
    field (None for a top-level key: the field's name is what cannot be shown)."""
    where = ".".join(map(str, path))
    what = (f"a key ({ascii(key)})" + (f" in '{where}'" if where else "")) if key is not None else f"'{where}'"
    return APIError(f"{what} holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), which is not "
                    "Unicode text: send the character itself or a valid surrogate pair.",
                    param=str(path[0]) if path else None, code="invalid_json")


def check_stop(stop: str | list[str] | None, stop_token_ids: list[int] | None, vocab_size: int | None = None
               ) -> None:
    """Stop strings and stop token ids within this server's bounds (MAX_STOP_*), the ids within the vocabulary if
    given; APIError (400) naming them."""
    stops = [stop] if isinstance(stop, str) else stop or []
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(f"'stop' holds {len(stops)} strings; this server takes at most {MAX_STOP_STRINGS}.",
                       param="stop")
    long = next((s for s in stops if len(s) > MAX_STOP_STRING_CHARS), None)
    if long is not None:
        raise APIError(f"'stop' strings may be at most {MAX_STOP_STRING_CHARS} characters, got one of {len(long)}.",
                       param="stop")
    if stop_token_ids and len(stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise APIError(f"'stop_token_ids' holds {len(stop_token_ids)} ids; this server takes at most "
                       f"{MAX_STOP_TOKEN_IDS}.", param="stop_token_ids")
    bad = [t for t in stop_token_ids or () if vocab_size is not None and t >= vocab_size]
    if bad:
        raise APIError(f"'stop_token_ids' {bad[:5]} are outside the vocabulary [0, {vocab_size}).",
                       param="stop_token_ids")


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


def max_prompt_chars(tokenizer, max_model_len: int) -> int | None:
    """How much of a long prompt the server tokenizes first: max_model_len x L characters, L the longest vocabulary
    entry's own spelling in characters, or None (no vocabulary to read).

    Most tokenizers' tokens cover at most L characters of text (byte-level BPE spells each byte as one character, and
    a character is at least one byte; SentencePiece spells a space as U+2581 and a fallback byte as `<0xNN>`), so a
    longer prompt usually has more than max_model_len tokens; but normalizers that collapse whitespace and special
    tokens that absorb it break that rule. So a prompt longer than this is not refused by its length: its first
    max_model_len x L characters are tokenized, and only if they alone make more than max_model_len tokens is it
    refused (the whole has as many, but for a token merged across the cut: still as many as the context, which
    admits fewer), without tokenizing the rest (a multi-megabyte body would otherwise hold the tokenizer thread for
    seconds)."""
    get_vocab = getattr(tokenizer, "get_vocab", None)
    try:
        vocab = get_vocab() if get_vocab is not None else None
    except Exception:  # a tokenizer without a readable vocabulary: no bound
        vocab = None
    if not vocab:
        return None
    return max_model_len * max(max(len(t) for t in vocab), 1)


def check_num_seqs(num_prompts: int, n: int, max_seqs: int) -> None:
    """prompts x n sequences must not pass the operator's cap (--max_seqs_per_request)."""
    if num_prompts * n > max_seqs:
        raise APIError(f"This request asks for {num_prompts} prompt(s) x n={n} = {num_prompts * n} sequences; this "
                       f"server allows at most {max_seqs} per request (--max_seqs_per_request). Send fewer prompts "
                       "or a smaller n, or split the request.", param="n" if num_prompts == 1 else "prompt")


def split_prompts(prompt: Any) -> list:
    """The prompts a completions `prompt` holds: a string or a list of token ids is one, else a list of either."""
    return [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
