"""Test helpers: run our model directly over a batch of sequences fed in chunks, returning logits."""

from __future__ import annotations

import torch

from shardllm.step_io import ScheduledRequest, SchedulerOutput


def chunked_logits(runner, prompts: list[list[int]], chunk: int) -> list[torch.Tensor]:
    """Feed every prompt through the runner `chunk` tokens per step (all prompts in each step).

    Returns, per prompt, the logits of every position (T, V), as the engine computes them over the cache.
    """
    bs = runner.block_size
    next_block = 1
    tables = []
    for p in prompts:
        n = -(-len(p) // bs)
        tables.append(list(range(next_block, next_block + n)))
        next_block += n
    done = [0] * len(prompts)
    logits = [[] for _ in prompts]
    while any(d < len(p) for d, p in zip(done, prompts)):
        rows = [i for i, p in enumerate(prompts) if done[i] < len(p)]
        so = SchedulerOutput(scheduled=[
            ScheduledRequest(str(i), prompts[i][done[i]:done[i] + chunk], done[i], tables[i],
                             done[i] + chunk >= len(prompts[i])) for i in rows])
        inputs = runner.prepare_inputs(so)
        with torch.inference_mode():
            hidden = runner.model(inputs.input_ids, inputs.positions, inputs.meta)
            out = runner.model.compute_logits(hidden).float()
        qsl = inputs.meta.query_start_loc.tolist()
        for k, i in enumerate(rows):
            logits[i].append(out[qsl[k]:qsl[k + 1]])
            done[i] += len(so.scheduled[k].token_ids)
    return [torch.cat(x) for x in logits]
