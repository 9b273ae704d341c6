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


def write_text_checkpoint(path: str, vocab_size: int = 49152, **overrides) -> str:
    """A tiny random Llama whose vocabulary is the default model's (pair it with that tokenizer for varied text).

    Its LM head is scaled up 8x so that the top two logits are far apart (about 1.5 rather than 0.2): greedy
    tokens then do not flip with the float rounding of different batch make-ups, which tests that compare
    requests run in different batches rely on.
    """
    import safetensors.torch

    from tests.conftest import write_tiny_checkpoint

    write_tiny_checkpoint(path, "llama", vocab_size=vocab_size, **overrides)
    file = f"{path}/model.safetensors"
    weights = safetensors.torch.load_file(file)
    weights["lm_head.weight"] *= 8
    safetensors.torch.save_file(weights, file, metadata={"format": "pt"})
    return path


def greedy_tokens_then_batch1(path: str, num_prompts: int, max_tokens: int, **llm_kwargs) -> list[list[int]]:
    """Greedy tokens of `num_prompts` short prompts run together, then of the first one alone (a batch-1 step), from
    a fresh engine on `path` (small cache and batch) that is shut down after; for on / off comparisons of a path."""
    from shardllm import LLM, SamplingParams

    llm = LLM(path, num_kv_blocks=64, max_batch_size=8, **llm_kwargs)
    try:
        prompts = [[1 + (7 * i + j) % 300 for j in range(6 + i)] for i in range(num_prompts)]
        sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
        tokens += [o.outputs[0].token_ids for o in llm.generate(prompts[:1], sp, use_tqdm=False)]  # batch 1
    finally:
        llm.shutdown()
    return tokens


def cli_usage_error(argv: list[str], capsys) -> str:
    """argparse's error for `shardllm ARGV` (exit status 2, no traceback): its last line."""
    import pytest

    from shardllm.entrypoints import cli

    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]
