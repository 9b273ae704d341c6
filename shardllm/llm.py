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

    _shut_down = False  # shutdown() sets it (a class default: an LLM made without __init__ has it too)

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
        """Generate for every prompt; outputs come back in the prompts' order.

        prompts: a string, a list of token ids, a dict {"prompt": str} or {"prompt_token_ids": [...]} (vLLM's
        TextPrompt / TokensPrompt), or a list of any of these. Raises TypeError / ValueError naming what is wrong;
        if a step fails (or is interrupted) this call's requests are aborted and the error raised, and the LLM
        serves the next call."""
        self._check_open()
        prompts = _as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            if not isinstance(sampling_params, (list, tuple)) or not all(
                    isinstance(p, SamplingParams) for p in sampling_params):
                raise TypeError(f"sampling_params must be a SamplingParams or a list of them (one a prompt), got "
                                f"{_short(sampling_params)}" + (": build one with SamplingParams(**d)"
                                                                if isinstance(sampling_params, dict) else ""))
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
        """Apply the model's chat template to one conversation or a list of them, then generate.

        A message is a dict with a 'role' (one of CHAT_ROLES) and a 'content': a string, a list of
        {"type": "text", "text": ...} parts (joined, as the server does), or absent / None (empty). Raises
        TypeError / ValueError naming the message and the fix, ValueError if the template fails on them."""
        self._check_open()
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("chat needs a tokenizer with a chat template; this model has none")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise TypeError(f"messages must be a non-empty list of message dicts, or a list of such lists, got "
                            f"{_short(messages)}" + (": wrap the message in a list" if isinstance(messages, dict)
                                                     else ""))
        if chat_template is not None and not isinstance(chat_template, str):
            raise TypeError(f"chat_template must be a Jinja template string, got {_short(chat_template)}")
        convs = [messages] if isinstance(messages[0], dict) else messages
        prompts = []
        for conv in convs:
            if not isinstance(conv, (list, tuple)) or not conv:
                raise TypeError(f"a conversation must be a non-empty list of message dicts, got {_short(conv)}")
            conv = [_chat_message(m) for m in conv]
            try:
                ids = tok.apply_chat_template(conv, add_generation_prompt=add_generation_prompt, tokenize=True,
                                              chat_template=chat_template)
            except Exception as e:  # jinja's TemplateError and kin: the template cannot render these messages
                raise ValueError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from e
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
        except BaseException:  # an error in a step, or Ctrl-C: this call's requests end, the engine serves on
            self.engine.abort_all_after_failure()
            raise
        finally:
            if bar is not None:
                bar.close()
        return [done[i] for i in ids]

    def _check_open(self) -> None:
        if self._shut_down:
            raise RuntimeError("this LLM was shut down (LLM.shutdown()): create a new LLM to generate again")

    def shutdown(self) -> None:
        self._shut_down = True
        self.engine.shutdown()


CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
# vLLM's LLM() argument names that mean the same as ours
VLLM_ARG_NAMES = {"max_model_len": "max_seq_len", "max_num_seqs": "max_batch_size",
                  "max_num_batched_tokens": "max_num_tokens"}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def join_text_parts(texts: list[str]) -> str:
    """A message's text content parts as the one string its chat template gets: joined by newlines, as vLLM joins
    them (the server's messages and LLM.chat's alike)."""
    return "\n".join(texts)


def _chat_message(m: Any) -> dict:
    """A chat message checked and with its content made a string (text parts joined; absent or None: "")."""
    # the roles the server's API takes (entrypoints/openai/protocol.py)
    if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
        raise ValueError(f"chat message {_short(m)}: each message is a dict whose 'role' is one of {list(CHAT_ROLES)}")
    content = m.get("content")
    if isinstance(content, (list, tuple)):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise TypeError(f"chat message content {_short(content)}: a list of content parts must hold "
                            "{'type': 'text', 'text': str} parts only")
        content = join_text_parts([p["text"] for p in content])
    elif content is None:
        content = ""
    elif not isinstance(content, str):
        raise TypeError(f"chat message content must be a string or a list of text parts, got {_short(content)}")
    return {**m, "content": content}


def _as_prompt(p: Any) -> Prompt:
    if isinstance(p, dict):
        if "prompt_token_ids" in p:  # with both, the ids win (vLLM's rule)
            return p["prompt_token_ids"]
        if "prompt" in p:
            return p["prompt"]
        raise TypeError(f"a prompt dict holds 'prompt' (a string) or 'prompt_token_ids' (a list of ints), got keys "
                        f"{sorted(p)}")
    return p


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, (str, dict)):
        return [_as_prompt(prompts)]
    if isinstance(prompts, (list, tuple)):
        if prompts and all(isinstance(t, int) for t in prompts):
            return [list(prompts)]
        return [_as_prompt(p) for p in prompts]
    raise TypeError(f"prompts must be a string, a list of token ids, or a list of either; got {type(prompts)}")
