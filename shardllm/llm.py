"""The offline API: `LLM(model).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import inspect
from typing import Any

from shardllm.config import EngineConfig
from shardllm.engine.llm_engine import LLMEngine
from shardllm.outputs import RequestOutput
from shardllm.sampling_params import SamplingParams

Prompt = str | list[int]


_ENGINE_ARGS = frozenset(inspect.signature(EngineConfig.create).parameters) - {"model"}


class LLM:
    """An engine for offline batched generation.

    Args:
        model: a checkpoint directory, a `.gguf` file, a Hugging Face repo id, a shipped config name
            (`llama-3-70b`, with load_format="dummy"), or None for the embedded default model.
        dtype: auto | bfloat16 | float16 | float32 (auto: bf16 on GPU, fp32 on CPU) | fp8 (FP8 linears, the rest
            in auto's dtype; the same as quantization="fp8"). kv_cache_dtype (keyword): auto | fp8 | fp8_e5m2.
        tensor_parallel_size, pipeline_parallel_size, expert_parallel_size: the parallel layout
            (tensor_parallel_size="auto": the smallest tp the planner says fits the visible GPUs).
        max_batch_size: most sequences in one step. max_num_tokens: the token budget of one step. Default:
            1024 and 16384 on a GPU of at least 70 GiB (not an A100), else 256 and 8192, as vLLM
            (config.default_batch_limits).
        max_seq_len: longest prompt + output (default: the model's context).
        kv_cache_free_gpu_memory_fraction: share of free GPU memory, after the model and activations,
            given to the KV cache.
        load_format: auto | safetensors | gguf | dummy.
    """

    def __init__(self, model: str | None = None, dtype: str = "auto", tensor_parallel_size: int | str = 1,
                 pipeline_parallel_size: int = 1, expert_parallel_size: int = 1, max_batch_size: int | None = None,
                 max_num_tokens: int | None = None, max_seq_len: int | None = None,
                 kv_cache_free_gpu_memory_fraction: float = 0.9, enable_prefix_caching: bool = True,
                 load_format: str = "auto", device: str = "auto", seed: int = 0, enforce_eager: bool = False,
                 trust_remote_code: bool = False, **kwargs: Any):
        named = {"max_seq_len": max_seq_len, "max_batch_size": max_batch_size, "max_num_tokens": max_num_tokens}
        for theirs, ours in VLLM_ARG_NAMES.items():  # vLLM's names for the same settings
            if theirs in kwargs:
                if named[ours] is not None:
                    raise TypeError(f"LLM() got both {theirs}= and {ours}=: they are one setting; give one")
                named[ours] = kwargs.pop(theirs)
        max_seq_len, max_batch_size, max_num_tokens = (named[k] for k in ("max_seq_len", "max_batch_size",
                                                                          "max_num_tokens"))
        if "gpu_memory_utilization" in kwargs:
            raise TypeError("LLM() has no gpu_memory_utilization (vLLM's share of the whole GPU): use "
                            "kv_cache_free_gpu_memory_fraction, the share of the memory left after the model and "
                            "activations that goes to the KV cache (default 0.9)")
        unknown = sorted(set(kwargs) - _ENGINE_ARGS)
        if unknown:
            raise TypeError(f"LLM() got unexpected keyword arguments {unknown}: the engine's arguments are "
                            f"{sorted(_ENGINE_ARGS)}")
        self.config = EngineConfig.create(
            model, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size, expert_parallel_size=expert_parallel_size,
            max_batch_size=max_batch_size, max_num_tokens=max_num_tokens, max_seq_len=max_seq_len,
            kv_cache_free_gpu_memory_fraction=kv_cache_free_gpu_memory_fraction,
            enable_prefix_caching=enable_prefix_caching, load_format=load_format, device=device, seed=seed,
            enforce_eager=enforce_eager, trust_remote_code=trust_remote_code, **kwargs)
        self.engine = LLMEngine(self.config)
        self._next_id = 0

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | list[Prompt], sampling_params: SamplingParams | list[SamplingParams] | None
                 = None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the prompts' order."""
        prompts = _as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts: "
                                 "pass one, or one per prompt")
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(self.engine.add_request(f"gen-{self._next_id}", prompt, p))
                self._next_id += 1
        except Exception:
            self.engine.abort_request(ids)
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True, chat_template: str | None = None
             ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("chat needs a tokenizer with a chat template; this model has none")
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = []
        for conv in convs:
            for m in conv:  # the roles the server's API takes (entrypoints/openai/protocol.py)
                if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
                    raise ValueError(f"chat message {m!r}: each message is a dict whose 'role' is one of "
                                     f"{list(CHAT_ROLES)}")
            ids = tok.apply_chat_template(conv, add_generation_prompt=add_generation_prompt, tokenize=True,
                                          chat_template=chat_template)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            prompts.append(list(ids))
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="Generating", unit="req", leave=False)
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step(final_only=True):
                    if out.finished:
                        done[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return [done[i] for i in ids]

    def shutdown(self) -> None:
        self.engine.shutdown()


CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
# vLLM's LLM() argument names that mean the same as ours
VLLM_ARG_NAMES = {"max_model_len": "max_seq_len", "max_num_seqs": "max_batch_size",
                  "max_num_batched_tokens": "max_num_tokens"}


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, dict):
        return [prompts["prompt_token_ids"]]
    if isinstance(prompts, (list, tuple)):
        if prompts and all(isinstance(t, int) for t in prompts):
            return [list(prompts)]
        return [p["prompt_token_ids"] if isinstance(p, dict) else p for p in prompts]
    raise TypeError(f"prompts must be a string, a list of token ids, or a list of either; got {type(prompts)}")
