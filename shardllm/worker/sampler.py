"""Turn a step's logits into tokens: penalties, temperature, top-k/top-p/min-p, seeded sampling, logprobs.

Sampling uses the exponential race (argmax of p / Exp(1) draws a token with probability p), which needs
no sort and runs on the GPU without a host sync; seeded requests draw their noise from their own generator.
Whatever the settings, the most likely token (after penalties and biases) always stays a candidate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from shardllm.layers.argmax import greedy_argmax

# float32 rounds a repetition penalty below ~1.2e-38 to 0 and a logit divided by less than this overflows
# to inf (ties that greedy breaks by token id); penalties below it act as it.
MIN_REPETITION_PENALTY = 1e-30


@dataclass
class SamplingBatch:
    """Per-row sampling settings of the rows that sample this step (B rows)."""

    all_greedy: bool
    # None when all_greedy (greedy rows need none of them)
    temperature: torch.Tensor | None = None  # (B,) float, 0 for greedy rows
    top_p: torch.Tensor | None = None  # (B,)
    top_k: torch.Tensor | None = None  # (B,) long, 0 = off
    min_p: torch.Tensor | None = None  # (B,)
    any_top_k_top_p: bool = True  # known on the host, so that the sampler needs no sync to skip the sort
    any_min_p: bool = True
    generators: dict[int, torch.Generator] = field(default_factory=dict)
    # penalties: None when no row uses them
    presence: torch.Tensor | None = None  # (B,)
    frequency: torch.Tensor | None = None
    repetition: torch.Tensor | None = None
    prompt_token_ids: list[list[int]] | None = None
    output_token_ids: list[list[int]] | None = None
    # rows that may not end yet (min_tokens): row -> token ids to forbid
    banned_tokens: dict[int, list[int]] = field(default_factory=dict)
    max_num_logprobs: int | None = None  # largest `logprobs` asked for, None when nobody asked
    # logit_bias of every row, flattened: (rows, token ids, biases), each (K,); None when nobody asked
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    # row -> (the row's logits processors, its output token ids so far)
    logits_processors: dict[int, tuple[list[Callable], list[int]]] = field(default_factory=dict)


def is_plain_greedy(batch: SamplingBatch) -> bool:
    """Whether a `SamplingBatch` is the argmax of the raw logits (so that the sampler, or a CUDA graph's argmax,
    may take it from the logits as they are): every row greedy, and no logprobs, penalties, biases, banned tokens
    or logits processors."""
    return (batch.all_greedy and batch.max_num_logprobs is None and batch.presence is None
            and batch.logit_bias is None and not batch.banned_tokens and not batch.logits_processors)


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # (B,)
    logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None


class Sampler:
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch, num_logprobs: list[int | None] | None = None
                 ) -> SamplerOutput:
        if is_plain_greedy(batch):
            # greedy and nothing else: the arg-max of the logits as they are (a 16-bit value and its exact fp32
            # widening order the same, first index on ties), without the (B, V) fp32 copy: at batch 1024 x 128k
            # vocabulary that copy and its read were 0.49 ms of a 20.7 ms step on an H200 (fifth session profile)
            return SamplerOutput(greedy_argmax(logits))  # small batches on a GPU: layers/argmax.py
        given = logits
        logits = logits.float()  # (B, V)
        if (batch.logits_processors or batch.banned_tokens) and logits is given:
            logits = logits.clone()  # written in place below: leave the caller's logits as they were
        raw_logprobs = torch.log_softmax(logits, dim=-1) if batch.max_num_logprobs is not None else None
        if batch.presence is not None:
            logits = apply_penalties(logits, batch)
        if batch.logit_bias is not None:
            rows, ids, bias = batch.logit_bias
            logits = logits.index_put((rows, ids), bias, accumulate=True)
        for row, (procs, output_ids) in batch.logits_processors.items():
            for proc in procs:
                logits[row] = proc(output_ids, logits[row])
        for row, ids in batch.banned_tokens.items():
            logits[row, ids] = float("-inf")
        greedy = logits.argmax(dim=-1)
        if batch.all_greedy:
            tokens = greedy
        else:
            tokens = torch.where(batch.temperature < 1e-5, greedy, self._random(logits, batch))
        out = SamplerOutput(tokens)
        if raw_logprobs is not None:
            out.logprobs = gather_logprobs(raw_logprobs, tokens, batch.max_num_logprobs, num_logprobs)
        return out

    def _random(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        temp = torch.where(batch.temperature < 1e-5, torch.ones_like(batch.temperature), batch.temperature)
        logits = logits / temp[:, None]
        if batch.any_top_k_top_p:
            logits = apply_top_k_top_p(logits, batch.top_k, batch.top_p)
        probs = torch.softmax(logits, dim=-1)
        if batch.any_min_p:
            keep = probs >= batch.min_p[:, None] * probs.max(dim=-1, keepdim=True).values
            probs = torch.where(keep, probs, torch.zeros_like(probs))
        q = torch.empty_like(probs).exponential_()
        for row, g in batch.generators.items():
            q[row].exponential_(generator=g)
        # a draw of exactly 0 would make a masked token 0/0 = NaN, which argmax takes
        return (probs / q.clamp_(min=torch.finfo(q.dtype).tiny)).argmax(dim=-1)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    drop = ranks >= k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above
    drop |= before >= top_p[:, None]
    drop[:, 0] = False  # the top token always survives, even a top_p that rounds to 0 in float32
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    b, vocab = logits.shape
    dev = logits.device

    def counts(seqs: list[list[int]]) -> torch.Tensor:
        c = torch.zeros(b, vocab + 1, device=dev)
        width = max((len(s) for s in seqs), default=0)
        if width:
            idx = torch.tensor([s + [vocab] * (width - len(s)) for s in seqs], device=dev)
            c.scatter_add_(1, idx, torch.ones_like(idx, dtype=c.dtype))
        return c[:, :vocab]

    out_counts = counts(batch.output_token_ids)
    seen = (counts(batch.prompt_token_ids) + out_counts) > 0
    rep = batch.repetition.clamp(min=MIN_REPETITION_PENALTY)[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - batch.frequency[:, None] * out_counts
    return logits - batch.presence[:, None] * (out_counts > 0).to(logits.dtype)


def gather_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor, k_max: int,
                    num_logprobs: list[int | None] | None):
    chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
    top_vals, top_ids = logprobs.topk(max(k_max, 1), dim=-1) if k_max > 0 else (None, None)
    top_vals = top_vals.tolist() if top_vals is not None else None
    top_ids = top_ids.tolist() if top_ids is not None else None
    out = []
    for row, lp in enumerate(chosen):
        k = num_logprobs[row] if num_logprobs is not None else k_max
        if k is None:
            out.append(None)
            continue
        top = list(zip(top_ids[row][:k], top_vals[row][:k])) if k > 0 else []
        out.append((lp, top))
    return out
