"""How many bytes a model's weights take, from its config alone (start-up checks, and later the planner)."""

from __future__ import annotations

from shardllm.config import moe_intermediate_size, num_experts


def _is_moe_layer(c, i: int) -> bool:
    """Qwen MoE configs may keep some layers dense (mlp_only_layers, decoder_sparse_step)."""
    return i not in (getattr(c, "mlp_only_layers", None) or []) and (i + 1) % (
        getattr(c, "decoder_sparse_step", None) or 1) == 0


def count_parameters(hf_config) -> int:
    c = hf_config
    h, layers, vocab = c.hidden_size, c.num_hidden_layers, c.vocab_size
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    hd = getattr(c, "head_dim", None) or h // heads
    attn = h * (heads + 2 * kv) * hd + heads * hd * h
    dense_mlp = 3 * h * c.intermediate_size
    experts = num_experts(c)
    moe_mlp = dense_mlp
    if experts:
        shared = getattr(c, "shared_expert_intermediate_size", None) or 0
        moe_mlp = (h * experts  # router
                   + 3 * h * moe_intermediate_size(c) * experts  # routed experts: gate, up, down
                   + (3 * h * shared + h if shared else 0))  # shared expert and its sigmoid gate
    mlp = sum(moe_mlp if experts and _is_moe_layer(c, i) else dense_mlp for i in range(layers))
    embed = vocab * h * (1 if getattr(c, "tie_word_embeddings", False) else 2)
    return layers * (attn + 2 * h) + mlp + embed + h


def weight_bytes(hf_config, bytes_per_param: float) -> int:
    return int(count_parameters(hf_config) * bytes_per_param)
