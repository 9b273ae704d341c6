"""Incremental detokenization, stop strings, and the logprob pieces that need the tokenizer.

Decoding only the tail of a sequence each step keeps the cost flat: the text of tokens
[prefix_offset, read_offset) was already emitted, so the new text is decode([prefix_offset:]) minus it,
held back while it ends in an incomplete UTF-8 character. Output text only grows, and a stream is shown
all of it but a tail that could still become a stop string (`visible_text`), so streams are append-only.
Where the tokenizer is a fast one (a `tokenizers` backend) that does not clean up spaces after decoding, tokenizers'
DecodeStream does the same in Rust, a few microseconds a token instead of two Python-level decodes (~10 us: at a
GPU's ~28k tokens/s that was a third of a core; SHARDLLM_DECODE_STREAM=0 keeps the Python form everywhere).
"""

from __future__ import annotations

import re

from shardllm import envs
from shardllm.engine.request import Request
from shardllm.outputs import Logprob

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers < 0.21
    DecodeStream = None

_CONTEXT_TOKENS = 5  # prompt tokens decoded before the first output token (its leading space depends on them)


def load_tokenizer(path: str | None, trust_remote_code: bool = False):
    if path is None:
        return None
    if path.endswith(".gguf"):
        from shardllm.model_loader.gguf import build_tokenizer, open_gguf

        return build_tokenizer(open_gguf(path))
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ValueError(f"cannot load the tokenizer from {path!r}: {e}") from e


_PROBE_TEXT = "hello , world . don 't stop ; it 's ok ! yes ?"  # what a space clean-up would change


def _stream_backend(tokenizer):
    """The `tokenizers.Tokenizer` a DecodeStream may decode with for `tokenizer`, or None: not a fast tokenizer, or
    one whose own decode differs from its backend's (a space clean-up, which transformers applies or not by version
    and model kind even where the config asks for it, or a tokenizer class with its own decoding), or
    SHARDLLM_DECODE_STREAM=0. Probed once per tokenizer: both decodes of a text that a clean-up would change."""
    if DecodeStream is None or not envs.SHARDLLM_DECODE_STREAM:
        return None
    cached = getattr(tokenizer, "_shardllm_stream_backend", False)
    if cached is not False:
        return cached
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        try:
            ids = tokenizer.encode(_PROBE_TEXT, add_special_tokens=False)
            if any(tokenizer.decode(ids, skip_special_tokens=skip) != backend.decode(ids, skip_special_tokens=skip)
                   for skip in (True, False)):
                backend = None
        except Exception:  # a tokenizer that cannot run the probe keeps the Python form
            backend = None
    try:
        tokenizer._shardllm_stream_backend = backend
    except AttributeError:
        pass
    return backend


def init_offsets(req: Request, tokenizer=None) -> None:
    """Set up `req`'s detokenization; with `tokenizer` (fast, see `_stream_backend`) a DecodeStream primed with the
    prompt's last tokens."""
    req.read_offset = req.num_prompt_tokens
    req.prefix_offset = max(req.num_prompt_tokens - _CONTEXT_TOKENS, 0)
    backend = (_stream_backend(tokenizer) if tokenizer is not None and req.sampling_params.detokenize else None)
    req.decode_stream = None
    if backend is not None and not tokenizer.decode(req.token_ids[req.prefix_offset:req.read_offset]).endswith(
            "\ufffd"):  # a token-id prompt that ends inside a character: the Python form, which drops that part
        stream = DecodeStream(skip_special_tokens=req.sampling_params.skip_special_tokens)
        try:
            for t in req.token_ids[req.prefix_offset:req.read_offset]:
                stream.step(backend, t)
        except Exception:  # DecodeStream refuses some id sequences ("Invalid prefix"): the Python form takes them
            return
        req.decode_stream = (stream, backend)
        req.stream_fed = req.read_offset


def detokenize_incrementally(tokenizer, req: Request) -> str:
    """Append the text of the request's newest tokens to req.output_text and return that delta."""
    delta = _stream_delta(req) if req.decode_stream is not None else ""
    return delta if req.decode_stream is not None else delta + _python_delta(tokenizer, req)


def _stream_delta(req: Request) -> str:
    """The DecodeStream form: feed the tokens not fed yet; read_offset ends after the last token that gave text (the
    ones after it wait inside the stream: an incomplete character). If the stream refuses a token, the Python form
    takes over from read_offset for this request (the caller goes on with it)."""
    stream, backend = req.decode_stream
    ids, pieces = req.token_ids, []
    for i in range(req.stream_fed, len(ids)):
        try:
            piece = stream.step(backend, ids[i])
        except Exception:
            req.decode_stream = None
            req.prefix_offset = max(req.read_offset - _CONTEXT_TOKENS, 0)
            break
        req.stream_fed = i + 1
        if piece:
            pieces.append(piece)
            req.read_offset = i + 1
    delta = "".join(pieces)
    req.output_text += delta
    return delta


def _python_delta(tokenizer, req: Request) -> str:
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


class IncrementalText:
    """One sequence's text, detokenized where it is read rather than in the engine: the server's API process
    (engine/async_mp.py) for requests without stop strings, so that the engine process, the serving bound at GPU
    rates, spends no time on text, and several API servers share the work. The same steps as the engine's
    (`init_offsets`, `detokenize_incrementally`) on the attributes of a Request they read; so the same text.

    Args:
        prompt_ids: the prompt's token ids (the first output token's leading space depends on its last ones).
        params: the request's SamplingParams (`skip_special_tokens`).
        tokenizer: the model's tokenizer.
    """

    __slots__ = ("token_ids", "num_prompt_tokens", "sampling_params", "read_offset", "prefix_offset",
                 "decode_stream", "stream_fed", "output_text")

    def __init__(self, prompt_ids: list[int], params, tokenizer):
        self.token_ids = list(prompt_ids[-(_CONTEXT_TOKENS + 1):])  # (a DecodeStream needs no more than these)
        self.num_prompt_tokens = len(self.token_ids)
        self.sampling_params = params
        self.output_text = ""
        init_offsets(self, tokenizer)

    def add(self, tokenizer, new_ids: list[int]) -> str:
        """Take the sequence's new token ids; return the text they add (str, possibly empty)."""
        self.token_ids.extend(new_ids)
        return detokenize_incrementally(tokenizer, self)


def find_stop_string(req: Request, new_chars: int) -> str | None:
    """If a stop string ends in the newest `new_chars` characters, cut the text before it; return the string.

    Of several, the one that ends first wins (the one a character-by-character reader meets first), the longer
    at a tie. Before `min_tokens` tokens no stop string counts (vLLM's rule): one that ended earlier stays.
    """
    stops = req.sampling_params.stop
    if not stops or not new_chars or req.num_output_tokens < req.sampling_params.min_tokens:
        return None
    text = req.output_text
    best: tuple[int, int, str] | None = None  # (end, start, stop string)
    for s in stops:
        start = max(0, len(text) - new_chars - len(s) + 1)  # a match starting here or later ends in new text
        idx = text.find(s, start)
        if idx != -1 and (best is None or (idx + len(s), idx) < best[:2]):
            best = (idx + len(s), idx, s)
    if best is None:
        return None
    req.output_text = text[:best[1]]
    return best[2]


def num_held_back(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string (0: none).

    Streaming shows text[:len(text) - num_held_back]: a stop string found later starts inside the held-back
    tail (it ends in text that did not exist yet, so its start is within its own length of the end), hence
    nothing shown is ever cut, and the stream stays append-only and equal to the final text.
    """
    hold = 0
    for s in stops:
        m = min(len(s) - 1, len(text))
        if m <= hold:
            continue
        tail = text[len(text) - m:]
        # the longest n in (hold, m] with tail[m - n:] == s[:n]: such a tail starts with s[0], so only the places
        # of s[0] in the tail are tried, from the left (the longest first), each a C-level comparison
        i = tail.find(s[0])
        while i != -1 and m - i > hold:
            if s.startswith(tail[i:]):
                hold = m - i
                break
            i = tail.find(s[0], i + 1)
    return hold


def visible_text(req: Request) -> str:
    """Text safe to show a streaming client: all of it once finished, else less the tail that could still
    grow into a stop string."""
    stops = req.sampling_params.stop
    if req.is_finished or not stops:
        return req.output_text
    return req.output_text[: len(req.output_text) - num_held_back(req.output_text, stops)]


def make_logprobs(tokenizer, entry: tuple[float, list[tuple[int, float]]], token: int) -> dict[int, Logprob]:
    """{token id: Logprob} of one position: the top k and the chosen `token`. Nothing is decoded here (this runs
    on the engine thread, k + 1 entries per token): each Logprob decodes its text when `decoded_token` is read."""
    lp, top = entry
    d = {t: Logprob(v, tokenizer=tokenizer, token_id=t) for t, v in top}
    if token not in d:
        d[token] = Logprob(lp, tokenizer=tokenizer, token_id=token)
    return d


def make_prompt_logprobs(tokenizer, req: Request) -> list[dict[int, Logprob] | None] | None:
    """RequestOutput.prompt_logprobs of `req` (None if it did not ask): built once, when the prompt is done."""
    if req.prompt_logprobs is None or (not req.output_token_ids and not req.is_finished):
        return None
    built = getattr(req, "prompt_logprobs_out", None)
    if built is None:
        ids = req.prompt_token_ids
        built = req.prompt_logprobs_out = [None if e is None else make_logprobs(tokenizer, e, ids[i])
                                           for i, e in enumerate(req.prompt_logprobs)]
    return built


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenBytes:
    """A token's own bytes (OpenAI's logprob `bytes`): decoding one token of a character split over several
    gives U+FFFD, so the bytes come from the vocabulary instead. Byte-level BPE (GPT-2, Llama 3, Qwen) spells
    each byte as one printable character (the table of GPT-2's `bytes_to_unicode`, inverted here);
    SentencePiece spells bytes `<0xNN>` and spaces U+2581. Other tokens: the UTF-8 of their decoded text.

    `tb(token_id) -> bytes`; results are cached per id.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, bytes] = {}
        backend = getattr(tokenizer, "backend_tokenizer", None)
        try:  # the decoder's JSON names its parts (ByteLevel; Metaspace or Replace of U+2581 for SentencePiece)
            decoder = backend.decoder.__getstate__().decode()
        except Exception:
            decoder = ""
        self._byte_level = '"ByteLevel"' in decoder
        self._metaspace = '"Metaspace"' in decoder or "\u2581" in decoder
        self._special = set(getattr(tokenizer, "all_special_ids", ()) or ())
        from shardllm.model_loader.gguf import _bytes_to_unicode  # GPT-2's byte alphabet

        self._unicode_to_byte = {c: b for b, c in _bytes_to_unicode().items()}

    def __call__(self, token_id: int) -> bytes:
        b = self._cache.get(token_id)
        if b is None:
            b = self._cache[token_id] = self._bytes(token_id)
        return b

    def _bytes(self, token_id: int) -> bytes:
        tok = self.tokenizer
        piece = tok.convert_ids_to_tokens(token_id) if token_id not in self._special else None
        if isinstance(piece, str):
            m = _BYTE_FALLBACK.fullmatch(piece)
            if m:
                return bytes([int(m.group(1), 16)])
            if self._byte_level and all(c in self._unicode_to_byte for c in piece):
                return bytes(self._unicode_to_byte[c] for c in piece)
            if self._metaspace:
                return piece.replace("\u2581", " ").encode()
        return tok.decode([token_id]).encode()

