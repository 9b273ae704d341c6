"""The executor interface: hand a step's plan to every worker, return the sampled tokens.

The engine never knows which executor it has: uniproc (in-process), multiproc (a process per rank on
this host) or Ray (actors on any number of nodes).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from shardllm.config import EngineConfig
from shardllm.step_io import ModelRunnerOutput, SchedulerOutput


class Executor(ABC):
    def __init__(self, config: EngineConfig):
        self.config = config

    @staticmethod
    def create(config: EngineConfig) -> Executor:
        backend = config.parallel_config.distributed_executor_backend
        if backend in (None, "uni") and config.parallel_config.world_size == 1:
            from shardllm.executor.uniproc import UniprocExecutor

            return UniprocExecutor(config)
        if backend in (None, "mp"):
            from shardllm.executor.multiproc import MultiprocExecutor

            return MultiprocExecutor(config)
        if backend == "ray":
            from shardllm.executor.ray import RayExecutor

            return RayExecutor(config)
        raise ValueError(f"unknown distributed_executor_backend {backend!r}: use 'uni', 'mp' or 'ray'")

    @abstractmethod
    def initialize(self) -> int:
        """Start the workers, load the model, allocate the KV cache; return the number of KV blocks."""

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step and wait for its tokens."""
        self.submit(scheduler_output)
        return self.collect()

    @abstractmethod
    def submit(self, scheduler_output: SchedulerOutput) -> None:
        """Start a step without waiting (pipeline parallelism keeps pp steps in flight)."""

    @abstractmethod
    def collect(self) -> ModelRunnerOutput:
        """The tokens of the oldest step submitted and not yet collected."""

    @abstractmethod
    def memory_in_use(self) -> list[int]:
        """Bytes of device memory in use, per rank."""

    def memory_report(self) -> list[dict[str, int]]:
        """Per rank: bytes of weights, KV cache, allocated and peak device memory."""
        return []

    def expert_load(self) -> dict[tuple[int, int], int]:
        """MoE models: tokens routed per (layer, expert); every tp rank routes all tokens, so rank 0 tells."""
        return {}

    def start_step_profile(self, num_steps: int, tag: str | None = None) -> None:
        """Every rank profiles its next `num_steps` steps after one warm-up step (needs SHARDLLM_PROFILE_DIR set
        before the engine starts; see worker/step_profiler.py)."""
        raise NotImplementedError(f"{type(self).__name__} has no step profiling")

    def step_profile(self) -> list[dict | None]:
        """Per rank: the last profiled window (an open one is closed now), or None."""
        raise NotImplementedError(f"{type(self).__name__} has no step profiling")

    def check_health(self) -> None:
        """Raise if a worker is gone."""

    def shutdown(self) -> None:
        pass
