"""One rank, in this process."""

from __future__ import annotations

from shardllm.executor.base import Executor
from shardllm.step_io import ModelRunnerOutput, SchedulerOutput
from shardllm.utils import release_memory
from shardllm.worker.model_runner import resolve
from shardllm.worker.worker import Worker


class UniprocExecutor(Executor):
    def initialize(self) -> int:
        self._pending: list = []  # PendingOutputs, oldest first
        self.worker = Worker(self.config)
        self.worker.init_device()
        self.worker.load_model()
        num_blocks = self.worker.determine_num_blocks()
        self.worker.initialize_kv_cache(num_blocks)
        return num_blocks

    def submit(self, scheduler_output: SchedulerOutput) -> None:
        self._pending.append(self.worker.execute_model(scheduler_output, wait=False))

    def collect(self) -> ModelRunnerOutput:
        return resolve(self._pending.pop(0))

    def memory_in_use(self) -> list[int]:
        return [self.worker.memory_in_use()]

    def memory_report(self) -> list[dict[str, int]]:
        return [self.worker.memory_report()]

    def expert_load(self) -> dict[tuple[int, int], int]:
        return self.worker.expert_load()

    def start_step_profile(self, num_steps: int, tag: str | None = None) -> None:
        self.worker.start_step_profile(num_steps, tag)

    def step_profile(self) -> list[dict | None]:
        return [self.worker.step_profile()]

    def shutdown(self) -> None:
        self.worker = None
        self._pending = []
        release_memory()
