"""Incremental detokenization and stop strings.

Decoding only the tail of a sequence each step keeps the cost flat: the text of tokens
[prefix_offset, read_offset) was already emitted, so the new text is decode([prefix_offset:]) minus it,
held back while it ends in an incomplete UTF-8 character.
"""

from __future__ import annotations

from shardllm.engine.request import Request
from shardllm.outputs import Logprob


def load_tokenizer(path: str | None, trust_remote_code: bool = False):
    if path is None:
        return None
    if path.endswith(".gguf"):
        from shardllm.model_loader.gguf import GGUFFile, build_tokenizer

        return build_tokenizer(GGUFFile(path))
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ValueError(f"cannot load the tokenizer from {path!r}: {e}") from e


def init_offsets(req: Request) -> None:
    req.read_offset = req.num_prompt_tokens
    req.prefix_offset = max(req.num_prompt_tokens - 5, 0)


def detokenize_incrementally(tokenizer, req: Request) -> str:
    """Append the text of the request's newest tokens to req.output_text and return that delta."""
    skip = req.sampling_params.skip_special_tokens
    ids = req.token_ids
    prefix = tokenizer.decode(ids[req.prefix_offset:req.read_offset], skip_special_tokens=skip)
    full = tokenizer.decode(ids[req.prefix_offset:], skip_special_tokens=skip)
    if len(full) > len(prefix) and not full.endswith("\ufffd"):
        delta = full[len(prefix):]
        req.prefix_offset, req.read_offset = req.read_offset, len(ids)
        req.output_text += delta
        return delta
    return ""


def find_stop_string(req: Request, new_chars: int) -> str | None:
    """If a stop string appears in the text that includes the newest `new_chars`, cut the text before it."""
    stops = req.sampling_params.stop
    if not stops or not new_chars:
        return None
    text = req.output_text
    for s in stops:
        start = max(0, len(text) - new_chars - len(s) + 1)
        idx = text.find(s, start)
        if idx != -1:
            req.output_text = text[:idx]
            return s
    return None


def visible_text(req: Request) -> str:
    """Text safe to show a streaming client: hold back a tail that could still grow into a stop string."""
    stops = req.sampling_params.stop
    if req.is_finished or not stops:
        return req.output_text
    hold = max(len(s) for s in stops) - 1
    return req.output_text[: len(req.output_text) - hold] if hold else req.output_text


def make_logprobs(tokenizer, entry: tuple[float, list[tuple[int, float]]], token: int) -> dict[int, Logprob]:
    lp, top = entry

    def text(t: int) -> str | None:
        return tokenizer.decode([t]) if tokenizer is not None else None

    d = {t: Logprob(v, text(t)) for t, v in top}
    if token not in d:
        d[token] = Logprob(lp, text(token))
    return d
