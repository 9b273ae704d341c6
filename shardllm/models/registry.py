"""Architecture name (config.json's `architectures[0]`) -> model class."""

from __future__ import annotations

import importlib

_MODELS = {
    "LlamaForCausalLM": ("shardllm.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("shardllm.models.llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("shardllm.models.llama", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("shardllm.models.llama", "Qwen3ForCausalLM"),
    "MixtralForCausalLM": ("shardllm.models.mixtral", "MixtralForCausalLM"),
    "Qwen2MoeForCausalLM": ("shardllm.models.qwen_moe", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("shardllm.models.qwen_moe", "Qwen3MoeForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def check_architecture(arch: str) -> None:
    if arch not in _MODELS:
        raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(supported_architectures())}")


def get_model_class(arch: str):
    check_architecture(arch)
    module, name = _MODELS[arch]
    return getattr(importlib.import_module(module), name)
