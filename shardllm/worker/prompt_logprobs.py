"""Prompt logprobs (SamplingParams.prompt_logprobs): the log-probability of each prompt token given the tokens
before it, read from the logits at the prompt's positions as each prefill chunk computes them.

    prompt      t0   t1   t2   t3   t4          a chunk [start, end) computes the hidden states of
    position     0    1    2    3    4          positions start..end-1; position p predicts t(p+1),
    predicts    t1   t2   t3   t4   (output)    so a chunk yields the entries of t(start+1)..t(min(end, P-1))
"""

from __future__ import annotations

import torch

from shardllm.step_io import SchedulerOutput

_MAX_ROWS = 256  # logits rows per slice: (rows, V) fp32 is 50 MB at a 49k vocabulary


def compute_prompt_logprobs(model, hidden: torch.Tensor, so: SchedulerOutput, requests: dict
                            ) -> dict[str, list[tuple[float, list[tuple[int, float]]]]] | None:
    """Per request of the step that asked for prompt logprobs: one (logprob, [(token id, logprob)] * k) per
    prompt token its chunk predicts, in position order. None when no request of the step needs any.

    Runs on every tp rank of the last stage (the LM head gathers over tp). `hidden` is the step's (N, H)
    hidden states in the plan's order; `requests` maps id -> CachedRequestState (with prompt_token_ids).
    Values are log_softmax of the raw logits in fp32 (no temperature or penalties, as vLLM's).
    """
    rows: list[int] = []
    targets: list[int] = []
    spans: list[tuple[str, int, int]] = []  # (request id, first row in `rows`, count)
    offset = 0
    k_max = 0
    for s in so.scheduled:
        st = requests.get(s.req_id)
        k = st.sampling_params.prompt_logprobs if st is not None else None
        prompt = getattr(st, "prompt_token_ids", None)
        start, n = s.num_computed_tokens, len(s.token_ids)
        if k is not None and prompt is not None:
            end = min(start + n, len(prompt) - 1)  # the last prompt position predicts the first output token
            if end > start:
                spans.append((s.req_id, len(rows), end - start))
                rows.extend(range(offset, offset + end - start))
                targets.extend(prompt[start + 1:end + 1])
                k_max = max(k_max, k)
        offset += n
    if not spans:
        return None
    dev = hidden.device
    chosen: list[float] = []
    top_ids: list[list[int]] = []
    top_vals: list[list[float]] = []
    for a in range(0, len(rows), _MAX_ROWS):
        idx = torch.tensor(rows[a:a + _MAX_ROWS], device=dev)
        tgt = torch.tensor(targets[a:a + _MAX_ROWS], device=dev)
        logprobs = torch.log_softmax(model.compute_logits(hidden[idx]).float(), dim=-1)  # (R, V)
        chosen += logprobs.gather(1, tgt[:, None])[:, 0].tolist()
        if k_max:
            vals, ids = logprobs.topk(k_max, dim=-1)
            top_vals += vals.tolist()
            top_ids += ids.tolist()
    out = {}
    for rid, first, count in spans:
        k = requests[rid].sampling_params.prompt_logprobs
        out[rid] = [(chosen[i], list(zip(top_ids[i][:k], top_vals[i][:k])) if k else [])
                    for i in range(first, first + count)]
    return out
