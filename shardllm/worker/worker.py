"""A worker owns one rank: its device, its parallel context, its model shard and KV cache."""

from __future__ import annotations

import torch

from shardllm.config import EngineConfig
from shardllm.step_io import SchedulerOutput
from shardllm.worker.model_runner import ModelRunner, resolve
from shardllm.worker.step_profiler import StepProfiler


class Worker:
    def __init__(self, config: EngineConfig, rank: int = 0, local_rank: int = 0):
        self.config = config
        self.rank, self.local_rank = rank, local_rank
        self.model_runner: ModelRunner | None = None
        self.step_profiler = StepProfiler.from_env(rank)  # None unless SHARDLLM_PROFILE_DIR is set

    def init_device(self) -> None:
        if self.config.device == "cuda":
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        torch.manual_seed(self.config.model_config.seed)

    def init_fast_all_reduce(self) -> None:
        """After the process groups, before any forward: the tp all-reduce the config asks for (every tp rank)."""
        from shardllm.distributed import communication, fast_all_reduce
        from shardllm.distributed.parallel_state import get_parallel_context

        ctx = get_parallel_context()
        if ctx.tp_size > 1:
            communication.set_fast_all_reduce(fast_all_reduce.create(
                self.config.parallel_config.all_reduce, ctx.tp_group, self.device, self.config.model_config.dtype))

    def load_model(self) -> None:
        if self.device.type == "cuda":
            self._check_fits()
        self.model_runner = ModelRunner(self.config, self.device)
        self.weights_bytes = sum(p.numel() * p.element_size() for p in self.model_runner.model.parameters())

    def _check_fits(self) -> None:
        """Fail before loading when this rank's share of the weights cannot fit in free GPU memory."""
        from shardllm.model_loader.size import weight_bytes

        mc, pc = self.config.model_config, self.config.parallel_config
        elem = 1 if mc.quantization is not None else torch.empty((), dtype=mc.dtype).element_size()  # FP8: 1 byte
        need = weight_bytes(mc.hf_config, elem) / pc.world_size
        free, _ = torch.cuda.mem_get_info(self.device)
        if need > 0.95 * free:
            raise ValueError(
                f"{mc.model} needs about {need / 2**30:.1f} GiB of weights per GPU at tp_size="
                f"{pc.tensor_parallel_size}, pp_size={pc.pipeline_parallel_size}, but GPU {self.local_rank} has "
                f"{free / 2**30:.1f} GiB free: raise tp_size, use dtype='fp8', lower max_batch_size, or add "
                "pipeline stages (pp_size)")

    def determine_num_blocks(self) -> int:
        n = self.model_runner.determine_num_blocks()
        from shardllm.layers.moe import reset_expert_load

        reset_expert_load(self.model_runner.model)  # the profiling forward routed dummy tokens
        return n

    def expert_load(self) -> dict[tuple[int, int], int]:
        """Tokens routed per (layer, expert) since start; empty for dense models."""
        from shardllm.layers.moe import collect_expert_load

        return collect_expert_load(self.model_runner.model)

    def kv_bytes_per_block(self) -> int:
        return self.model_runner.kv_bytes_per_block()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.model_runner.initialize_kv_cache(num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput, wait: bool = True):
        """Run a step; with wait=False return a PendingOutput (or None) without waiting for the device."""
        if self.step_profiler is not None:
            return self.step_profiler.run_step(self.model_runner, self._execute_model, scheduler_output, wait)
        out = self.model_runner.execute_model(scheduler_output)
        return resolve(out) if wait else out

    def _execute_model(self, scheduler_output: SchedulerOutput, wait: bool):
        out = self.model_runner.execute_model(scheduler_output)
        return resolve(out) if wait else out

    def start_step_profile(self, num_steps: int, tag: str | None = None) -> None:
        """Profile this rank's next `num_steps` steps (after one warm-up step); see worker/step_profiler.py."""
        if self.step_profiler is None:
            from shardllm.worker.step_profiler import ENV_DIR

            raise ValueError(f"step profiling is off: set {ENV_DIR}=<dir> in the environment before the engine starts")
        self.step_profiler.arm(num_steps, tag)

    def step_profile(self) -> dict | None:
        """The last closed window's profile of this rank (closing an open one now), or None."""
        if self.step_profiler is None:
            return None
        return self.step_profiler.flush(self.model_runner)

    def memory_report(self) -> dict[str, int]:
        """Bytes on this rank's device: weights, KV cache, and (GPU) allocated now and at peak, and its total."""
        kv = sum(c.numel() * c.element_size() for c in self.model_runner.kv_caches)
        rep = {"weights": self.weights_bytes, "kv_cache": kv}
        if self.device.type == "cuda":
            rep["allocated"] = torch.cuda.memory_allocated(self.device)
            rep["peak"] = torch.cuda.max_memory_allocated(self.device)
            rep["total"] = torch.cuda.mem_get_info(self.device)[1]  # the GPU's memory (start-up summary, planner)
        return rep

    def memory_in_use(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return sum(p.numel() * p.element_size() for p in self.model_runner.model.parameters()) + sum(
            c.numel() * c.element_size() for c in self.model_runner.kv_caches)
