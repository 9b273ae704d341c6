"""Mixtral: the Mistral decoder with a sparse MoE block (softmax top-2 of 8 experts, renormalised)."""

from __future__ import annotations

from torch import nn

from shardllm.layers.moe import FusedMoE, moe_packed_names
from shardllm.models.llama import LlamaDecoderLayer, LlamaForCausalLM


class MixtralDecoderLayer(LlamaDecoderLayer):
    def make_mlp(self, config) -> nn.Module:
        return FusedMoE(config.num_local_experts, config.num_experts_per_tok, config.hidden_size,
                        config.intermediate_size, renormalize=True)


class MixtralForCausalLM(LlamaForCausalLM):
    decoder_layer = MixtralDecoderLayer

    def __init__(self, config, max_model_len: int):
        super().__init__(config, max_model_len)
        # checkpoints name the block block_sparse_moe, with experts.{e}.w1 (gate), w3 (up), w2 (down)
        self.packed = {**moe_packed_names(config.num_local_experts, "block_sparse_moe.experts", "mlp",
                                          ("w1", "w3", "w2")),
                       "block_sparse_moe.gate": ("mlp.gate", None), **LlamaForCausalLM.packed}
