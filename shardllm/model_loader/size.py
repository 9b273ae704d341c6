"""How many bytes a model's weights take, from its config alone (start-up checks, and later the planner)."""

from __future__ import annotations


def count_parameters(hf_config) -> int:
    c = hf_config
    h, layers, vocab = c.hidden_size, c.num_hidden_layers, c.vocab_size
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    hd = getattr(c, "head_dim", None) or h // heads
    attn = h * (heads + 2 * kv) * hd + heads * hd * h
    experts = getattr(c, "num_local_experts", None) or getattr(c, "num_experts", None) or 1
    inter = getattr(c, "moe_intermediate_size", None) if experts > 1 else None
    inter = inter or c.intermediate_size
    mlp = 3 * h * inter * experts + (h * experts if experts > 1 else 0)
    embed = vocab * h * (1 if getattr(c, "tie_word_embeddings", False) else 2)
    return layers * (attn + mlp + 2 * h) + embed + h


def weight_bytes(hf_config, bytes_per_param: float) -> int:
    return int(count_parameters(hf_config) * bytes_per_param)
