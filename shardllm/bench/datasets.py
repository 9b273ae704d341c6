"""Prompts for `shardllm bench serve`: random token ids of exact length, or conversations of a ShareGPT file."""

from __future__ import annotations

import functools
import json
import os
import random
from dataclasses import dataclass


@dataclass
class RequestSpec:
    prompt: str | list[int]  # text, or token ids (sent as the completions API's list-of-ints prompt)
    prompt_len: int | None  # tokens, when known on the client
    output_len: int  # max_tokens


@functools.lru_cache(maxsize=4)
def load_bench_tokenizer(name: str, need_tokenizer: bool = True):
    """(tokenizer or None, vocabulary size or None) for a model name: the embedded default, a checkpoint dir
    or .gguf (as the engine resolves them), a Hugging Face repo id (its tokenizer files: the cache first, then
    a download), or a shipped config (llama-3-8b, ...: what a dummy server runs) for its vocabulary size only.
    need_tokenizer=False: a shipped config's vocabulary is enough, without looking for its tokenizer."""
    from shardllm.engine.detokenizer import load_tokenizer
    from shardllm.model_loader.default_model import DEFAULT_MODEL_NAME
    from shardllm.model_loader.resolve import resolve_model, shipped_config_name

    if name in ("default", DEFAULT_MODEL_NAME) or os.path.exists(name):
        try:
            resolved = resolve_model(name)
        except ValueError:
            return None, None
        tok = load_tokenizer(resolved.tokenizer_path) if resolved.tokenizer_path else None
        vocab = resolved.hf_config.vocab_size
        return tok, min(len(tok), vocab) if tok is not None else vocab
    shipped = shipped_config_name(name)
    if shipped is None or need_tokenizer:
        if name.count("/") == 1:  # a repo id
            from transformers import AutoTokenizer

            for local_files_only in (True, False):
                try:
                    tok = AutoTokenizer.from_pretrained(name, local_files_only=local_files_only)
                    return tok, len(tok)
                except Exception:  # not cached / not reachable: try the next way
                    continue
    if shipped is not None:
        return None, resolve_model(name, "dummy").hf_config.vocab_size
    return None, None


def random_requests(n: int, input_len: int, output_len: int, tokenizer_name: str, seed: int) -> list[RequestSpec]:
    """`n` prompts of exactly `input_len` token ids, drawn uniformly from the vocabulary without its special
    tokens and its first 100 ids (byte and control tokens in most vocabularies). Raises ValueError when the
    vocabulary size cannot be found (the fix: --tokenizer)."""
    tok, vocab = load_bench_tokenizer(tokenizer_name, need_tokenizer=False)
    if not vocab:
        raise ValueError(f"cannot find the vocabulary of {tokenizer_name!r} for random prompts: give "
                         "--tokenizer (a checkpoint directory, a .gguf file or a Hugging Face repo id)")
    special = set(getattr(tok, "all_special_ids", None) or ())
    low = min(100, vocab // 4)
    ids = [i for i in range(low, vocab) if i not in special]
    rng = random.Random(seed)
    return [RequestSpec([rng.choice(ids) for _ in range(input_len)], input_len, output_len) for _ in range(n)]


def load_sharegpt(path: str, n: int, output_len: int | None, tokenizer_name: str, seed: int) -> list[RequestSpec]:
    """`n` requests from a ShareGPT-format JSON file (a list of {"conversations": [{"from", "value"}, ...]}):
    each conversation's first turn as the prompt (text), its second turn's token count as the output length
    unless `output_len` is given. Conversations are shuffled with `seed`; with fewer than `n`, they repeat.
    Raises ValueError for a file that is not ShareGPT JSON or has no usable conversation."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise ValueError(f"--dataset {path}: {e.strerror} (use 'random' or a ShareGPT JSON file)") from None
    except ValueError as e:
        raise ValueError(f"--dataset {path} is not JSON: {e}") from None
    pairs = []
    for conv in data if isinstance(data, list) else ():
        turns = conv.get("conversations") if isinstance(conv, dict) else None
        if isinstance(turns, list) and len(turns) >= 2 and all(isinstance(t, dict) and isinstance(
                t.get("value"), str) for t in turns[:2]) and turns[0]["value"]:
            pairs.append((turns[0]["value"], turns[1]["value"]))
    if not pairs:
        raise ValueError(f"--dataset {path}: no conversation with two turns found (expected a ShareGPT list of "
                         '{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]})')
    tok = None
    if output_len is None:
        tok, _ = load_bench_tokenizer(tokenizer_name)
        if tok is None:
            raise ValueError(f"no tokenizer for {tokenizer_name!r} to measure the replies: give --tokenizer or "
                             "--output_len")
    rng = random.Random(seed)
    rng.shuffle(pairs)
    specs = []
    for i in range(n):
        prompt, reply = pairs[i % len(pairs)]
        out = output_len or max(1, len(tok.encode(reply, add_special_tokens=False)))
        specs.append(RequestSpec(prompt, len(tok.encode(prompt)) if tok is not None else None, out))
    return specs
