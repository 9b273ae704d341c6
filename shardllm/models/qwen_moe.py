"""Qwen MoE: Qwen3-MoE (q/k norm, top-k renormalised when norm_topk_prob) and Qwen2-MoE (qkv bias, no
renormalisation by default, plus a shared expert behind a sigmoid gate)."""

from __future__ import annotations

from torch import nn

from shardllm.layers.moe import FusedMoE, moe_packed_names
from shardllm.models.llama import LlamaDecoderLayer, LlamaForCausalLM


class QwenMoeDecoderLayer(LlamaDecoderLayer):
    def make_mlp(self, config) -> nn.Module:
        return FusedMoE(config.num_experts, config.num_experts_per_tok, config.hidden_size,
                        config.moe_intermediate_size, renormalize=bool(getattr(config, "norm_topk_prob", False)),
                        shared_expert_intermediate_size=getattr(config, "shared_expert_intermediate_size", 0))


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    qk_norm = True
    decoder_layer = QwenMoeDecoderLayer

    def __init__(self, config, max_model_len: int):
        if getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1:
            # the decoder layer is not told its index, so every layer is a MoE layer here
            raise ValueError("Qwen MoE configs with dense layers (mlp_only_layers, decoder_sparse_step > 1) "
                             "are not supported yet: every layer must be a MoE layer")
        super().__init__(config, max_model_len)
        self.packed = {**moe_packed_names(config.num_experts, "mlp.experts", "mlp",
                                          ("gate_proj", "up_proj", "down_proj")), **LlamaForCausalLM.packed}


class Qwen2MoeForCausalLM(Qwen3MoeForCausalLM):
    qkv_bias = True
    qk_norm = False
