"""How many bytes a model's weights take, from its config alone (start-up checks, and later the planner)."""

from __future__ import annotations

from shardllm.config import moe_intermediate_size, num_experts


def _is_moe_layer(c, i: int) -> bool:
    """Qwen MoE configs may keep some layers dense (mlp_only_layers, decoder_sparse_step)."""
    return i not in (getattr(c, "mlp_only_layers", None) or []) and (i + 1) % (
        getattr(c, "decoder_sparse_step", None) or 1) == 0


def layer_shapes(hf_config, i: int, tp: int = 1) -> tuple[list[tuple[int, int]], int]:
    """Decoder layer i's weights on one of `tp` ranks: its Linear weights as (rows, cols), an MoE layer's experts
    stacked as one (experts x rows / tp, cols) each, and the count of its other parameters (norms, biases, router,
    the shared expert's gate: replicated and never quantized). KV heads are replicated when tp exceeds them.

    One inventory for `count_parameters` (tp 1) and the planner's per-rank bytes (shardllm/planner.py).
    """
    c = hf_config
    h, heads = c.hidden_size, c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    hd = getattr(c, "head_dim", None) or h // heads
    q_rank, kv_rank = heads // tp, max(1, kv // tp)
    linears = [((q_rank + 2 * kv_rank) * hd, h), (h, q_rank * hd)]  # qkv_proj, o_proj
    other = 2 * h  # input and post-attention RMSNorm
    model_type = getattr(c, "model_type", "")
    qkv_bias = model_type in ("qwen2", "qwen2_moe") or getattr(c, "qkv_bias", False)  # as models/llama.py builds
    attention_bias = getattr(c, "attention_bias", False)
    if qkv_bias or attention_bias:
        other += (q_rank + 2 * kv_rank) * hd
    if attention_bias and not qkv_bias:
        other += h  # o_proj's bias
    if model_type in ("qwen3", "qwen3_moe"):
        other += 2 * hd  # q_norm, k_norm
    experts = num_experts(c)
    if experts and _is_moe_layer(c, i):
        inter = moe_intermediate_size(c)
        # ep x moe_tp = tp: each rank holds experts/ep experts of width inter/moe_tp, i.e. 1/tp of them all
        linears += [(experts * 2 * inter // tp, h), (experts * h // tp, inter)]  # gate_up_proj, down_proj
        other += experts * h  # router
        shared = getattr(c, "shared_expert_intermediate_size", None) or 0
        if shared:
            linears += [(2 * shared // tp, h), (h, shared // tp)]
            other += h  # the shared expert's sigmoid gate
    else:
        inter = c.intermediate_size // tp
        linears += [(2 * inter, h), (h, inter)]  # gate_up_proj, down_proj
    return linears, other


def count_parameters(hf_config) -> int:
    """Parameters of the whole model: every decoder layer (`layer_shapes` at tp 1), the embedding, the LM head
    unless tied, and the final norm."""
    c = hf_config
    total = 0
    for i in range(c.num_hidden_layers):
        linears, other = layer_shapes(c, i)
        total += sum(n * k for n, k in linears) + other
    embed = c.vocab_size * c.hidden_size * (1 if getattr(c, "tie_word_embeddings", False) else 2)
    return total + embed + c.hidden_size


def active_linears(hf_config, i: int, tp: int = 1) -> list[tuple[int, int, float]]:
    """Decoder layer i's Linears on one of `tp` ranks as (rows, cols, share): the share of them one token uses, an
    MoE layer's routed experts num_experts_per_tok / num_experts, every other Linear 1."""
    c = hf_config
    experts, top_k = num_experts(c), getattr(c, "num_experts_per_tok", None) or 1
    moe = bool(experts) and _is_moe_layer(c, i)
    return [(n, k, top_k / experts if moe and j in (2, 3) else 1.0)  # layer_shapes' order: qkv, o, experts, shared
            for j, (n, k) in enumerate(layer_shapes(c, i, tp)[0])]


def linear_parameters(hf_config) -> tuple[int, int]:
    """Parameters of the decoder layers' Linears (the weights FP8 quantizes), whole model: (dense Linears, the
    routed experts' stacked gate_up and down). A shared expert counts as dense."""
    c, dense, routed = hf_config, 0, 0
    moe = bool(num_experts(c))
    for i in range(c.num_hidden_layers):
        for j, (n, k) in enumerate(layer_shapes(c, i)[0]):
            if moe and _is_moe_layer(c, i) and j in (2, 3):  # layer_shapes' order: qkv, o, experts, shared
                routed += n * k
            else:
                dense += n * k
    return dense, routed


def weight_bytes(hf_config, bytes_per_param: float) -> int:
    return int(count_parameters(hf_config) * bytes_per_param)


def decode_read_bytes(hf_config, linear_bytes: int, dense_bytes: int) -> int:
    """Weight bytes one decode step of one sequence reads, whole model (divide by the ranks for one rank's share):
    the decoder layers' Linears at `linear_bytes` (1: FP8, plus an fp32 scale per output row), an MoE layer's experts
    only for the num_experts_per_tok a token is routed to, the layers' other parameters and the final norm at
    `dense_bytes`, the LM head (never quantized) at `dense_bytes`, and not the input embedding table, of which a
    token reads one row (a tied table is the LM head, read whole once).

    The bytes behind `shardllm bench`'s batch-1 roofline (bench/throughput.py). Llama-3-8B: 15.01 GB in bf16 (not
    its 16.06 GB of parameters: the 1.05 GB embedding is not read), 8.04 GB in fp8.
    """
    c = hf_config
    total = 0
    for i in range(c.num_hidden_layers):
        for n, k, share in active_linears(c, i):
            total += share * (n * k * linear_bytes + (4 * n if linear_bytes == 1 else 0))
        total += layer_shapes(c, i)[1] * dense_bytes
    return int(total + (c.vocab_size * c.hidden_size + c.hidden_size) * dense_bytes)
