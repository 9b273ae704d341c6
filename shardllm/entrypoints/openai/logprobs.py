"""Log-probabilities in OpenAI's two shapes: chat's `{"content": [...], "refusal": null}` and the legacy
completions' parallel lists (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`).

Tokens are named by their own bytes (`TokenBytes`), so a character split over several tokens is rebuilt
by joining them: chat gives the bytes, completions spell a token that is not valid UTF-8 by itself as
`bytes:\\xNN...` (as OpenAI's legacy API does) and give every token of a split character the offset of
that character.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable

from shardllm.outputs import Logprob

TokenBytesFn = Callable[[int], bytes]


def _top(entry: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    return sorted(entry.items(), key=lambda kv: -kv[1].logprob)[:k]


def _decoded(entry: dict[int, Logprob] | None, token: int) -> str:
    lp = entry.get(token) if entry else None
    return lp.decoded_token if lp is not None and lp.decoded_token is not None else f"<{token}>"


def _token_text(entry: dict[int, Logprob] | None, token: int, token_bytes: TokenBytesFn | None) -> str:
    """A completions token string: its text, or `bytes:\\xNN..` when its bytes are not UTF-8 on their own."""
    if token_bytes is None:
        return _decoded(entry, token)
    b = token_bytes(token)
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{x:02x}" for x in b)


def chat_logprobs(out, start: int, end: int, k: int, token_bytes: TokenBytesFn | None = None) -> dict:
    """OpenAI's chat `logprobs` object for generated tokens [start, end) of `out` (a CompletionOutput).

    `bytes` are the token's own bytes when `token_bytes` is given, and `token` their text (leading space
    included; U+FFFD where the token holds part of a character); without it, the decoded text and its bytes.
    """

    def item(entry: dict[int, Logprob], t: int) -> dict:
        if token_bytes is not None:
            b = token_bytes(t)
            text = b.decode("utf-8", errors="replace")
        else:
            text = _decoded(entry, t)
            b = text.encode()
        return {"token": text, "logprob": entry[t].logprob if t in entry else None, "bytes": list(b)}

    content = []
    entries = out.logprobs or []
    for i in range(start, min(end, len(entries))):
        entry = entries[i]
        top = [item(entry, t) for t, _ in _top(entry, k)]
        content.append({**item(entry, out.token_ids[i]), "top_logprobs": top})
    return {"content": content, "refusal": None}


class CompletionLogprobs:
    """Builds the legacy completions `logprobs` lists of one choice, a piece at a time: text offsets carry on
    from piece to piece, so the pieces of a stream join into the lists of the whole text.

    Args:
        k: how many top alternatives per token (the chosen one is always added, as OpenAI does).
        token_bytes: id -> the token's bytes; None names tokens by their decoded text.
        text_offset: the offset (in characters) of the first token.
    """

    def __init__(self, k: int, token_bytes: TokenBytesFn | None = None, text_offset: int = 0):
        self.k, self.token_bytes, self.offset = k, token_bytes, text_offset
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def add(self, token_ids: list[int], entries: list[dict[int, Logprob] | None]) -> dict:
        """The lists for `token_ids` (one entry each; an entry of None, as the first prompt token has, gives
        null logprobs)."""
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        for token, entry in zip(token_ids, entries):
            text = _token_text(entry, token, self.token_bytes)
            tokens.append(text)
            offsets.append(self.offset)
            if self.token_bytes is not None:  # a split character's tokens share its offset
                self.offset += len(self._utf8.decode(self.token_bytes(token)))
            else:
                self.offset += len(text)
            if entry is None:
                token_logprobs.append(None)
                top_logprobs.append(None)
                continue
            token_logprobs.append(entry[token].logprob if token in entry else None)
            top = dict(_top(entry, self.k))
            if token in entry:
                top.setdefault(token, entry[token])
            top_logprobs.append({_token_text(entry, t, self.token_bytes): lp.logprob for t, lp in top.items()})
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": offsets}


def join_completion_logprobs(parts: list[dict]) -> dict:
    keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    return {key: [x for p in parts for x in p[key]] for key in keys}
