"""A terminal's Ctrl-C (SIGINT to the whole process group) does not interrupt worker processes: the driver decides
how to stop. Before, a tp > 1 server's workers raised KeyboardInterrupt mid-step and failed every running request,
and clients got the worker's traceback; now clients get one line."""

from __future__ import annotations

import os
import signal

from shardllm import LLM, SamplingParams
from shardllm.engine.async_llm import failure_summary
from shardllm.executor.multiproc import WorkerError


def test_workers_ignore_sigint(tiny_checkpoints):
    llm = LLM(tiny_checkpoints["llama"], device="cpu", num_kv_blocks=200, block_size=4, tensor_parallel_size=2)
    try:
        sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        before = llm.generate([[5, 9, 13]], sp)[0].outputs[0].token_ids
        for p in llm.engine.executor.procs:
            os.kill(p.pid, signal.SIGINT)
        after = llm.generate([[5, 9, 13]], sp)[0].outputs[0].token_ids
        assert after == before
        assert all(p.poll() is None for p in llm.engine.executor.procs)
    finally:
        llm.shutdown()


def test_failure_summary_is_one_line_without_the_traceback():
    tb = ('Traceback (most recent call last):\n  File "/srv/shardllm/executor/multiproc.py", line 291\n'
          "KeyboardInterrupt\n")
    s = failure_summary(WorkerError(f"worker rank 2 failed:\n{tb}"))
    assert s == "worker rank 2 failed (KeyboardInterrupt)"
    assert failure_summary(RuntimeError("out of memory")) == "out of memory"
    assert failure_summary(KeyboardInterrupt()) == "KeyboardInterrupt"
