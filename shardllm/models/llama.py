"""The Llama family: Llama 2/3/3.1, Mistral, Qwen2 (qkv bias) and Qwen3 (q/k norm).

Reads like single-GPU code: the parallel layers hide the sharding, and `make_layers` the pipeline stage.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from shardllm.distributed.parallel_state import get_parallel_context
from shardllm.layers import microbatch_overlap
from shardllm.layers.activation import SiluAndMul
from shardllm.layers.attention import Attention, AttentionMetadata
from shardllm.layers.layernorm import RMSNorm
from shardllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from shardllm.layers.rotary import RotaryEmbedding, rope_parameters
from shardllm.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding
from shardllm.models.utils import load_weights_strict, make_layers


class LlamaAttention(nn.Module):
    def __init__(self, config, max_position: int, qkv_bias: bool, qk_norm: bool, o_bias: bool):
        super().__init__()
        self.total_num_heads = config.num_attention_heads
        total_kv = getattr(config, "num_key_value_heads", None) or self.total_num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.total_num_heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, self.total_num_heads, total_kv,
                                          bias=qkv_bias)
        self.o_proj = RowParallelLinear(self.total_num_heads * self.head_dim, config.hidden_size,
                                        bias=o_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        theta, scaling = rope_parameters(config)
        self.rotary_emb = RotaryEmbedding(self.head_dim, max_position, theta, scaling)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm:  # over each head, before the rotary
            q = self.q_norm(q.view(n, self.num_heads, self.head_dim)).reshape(n, self.q_size)
            k = self.k_norm(k.view(n, self.num_kv_heads, self.head_dim)).reshape(n, self.kv_size)
        o = self.attn(q, k, v, meta, self.rotary_emb, positions)  # rotates q, k (with the KV write on Triton)
        return self.o_proj(o)  # o: (N, nh * D)


class LlamaMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias=bias)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, max_position: int, qkv_bias: bool, qk_norm: bool, o_bias: bool):
        super().__init__()
        self.self_attn = LlamaAttention(config, max_position, qkv_bias, qk_norm, o_bias)
        self.mlp = self.make_mlp(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def make_mlp(self, config) -> nn.Module:
        return LlamaMLP(config.hidden_size, config.intermediate_size, getattr(config, "mlp_bias", False))

    def forward(self, positions, hidden_states, residual, meta):
        return self.mlp_block(*self.attention_block(positions, hidden_states, residual, meta))

    def attention_block(self, positions, hidden_states, residual, meta):
        """The layer's first half, ending in the attention output (o_proj's all-reduce under tp)."""
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        return self.self_attn(positions, hidden_states, meta), residual

    def mlp_block(self, hidden_states, residual):
        """The layer's second half, ending in the MLP output (down_proj's all-reduce under tp)."""
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LlamaForCausalLM(nn.Module):
    qkv_bias = False
    qk_norm = False
    decoder_layer = LlamaDecoderLayer
    packed = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
              "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
    # per decoder layer, {producer: the linear it feeds}: FP8 linears take their input quantized by the producer
    fp8_act_quant_inputs = {"input_layernorm": "self_attn.qkv_proj", "post_attention_layernorm": "mlp.gate_up_proj",
                            "mlp.act_fn": "mlp.down_proj"}
    # {FP8 linear: the module its output goes to}, "next:" the next decoder layer's: those quantizers apply the
    # linear's route scales as they load its product (fp8_fused.link_deferred_scale)
    fp8_scale_readers = {"self_attn.o_proj": "post_attention_layernorm", "mlp.gate_up_proj": "mlp.act_fn",
                         "mlp.down_proj": "next:input_layernorm"}

    def __init__(self, config, max_model_len: int):
        super().__init__()
        ctx = get_parallel_context()
        self.config = config
        self.is_first_stage, self.is_last_stage = ctx.is_first_stage, ctx.is_last_stage
        self.model = nn.Module()
        if self.is_first_stage:
            self.model.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        attention_bias = bool(getattr(config, "attention_bias", False))
        qkv_bias = self.qkv_bias or attention_bias
        o_bias = attention_bias and not self.qkv_bias  # Qwen2: bias on q, k, v only
        self.model.layers, self.start_layer, self.end_layer = make_layers(
            config.num_hidden_layers,
            lambda i: self.decoder_layer(config, max_model_len, qkv_bias, self.qk_norm, o_bias))
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.is_last_stage:
            self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
            if self.tie_word_embeddings and self.is_first_stage:
                self.lm_head.tie_weights(self.model.embed_tokens)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, meta: AttentionMetadata,
                intermediate: dict[str, torch.Tensor] | None = None):
        """First stage: input_ids (N,). Later stages: `intermediate` from the stage before.

        Returns final hidden states (N, H) on the last stage, else {"hidden_states", "residual"}.
        """
        if self.is_first_stage:
            hidden_states, residual = self.model.embed_tokens(input_ids), None
        else:
            hidden_states, residual = intermediate["hidden_states"], intermediate["residual"]
        tp, n = get_parallel_context().tp_size, positions.shape[0]
        split_at = microbatch_overlap.prefill_split(meta, n, tp)  # off by default, as the decode split below
        if split_at is not None or microbatch_overlap.applies(meta, n, tp):
            hidden_states, residual = microbatch_overlap.run_layers(
                self.model.layers[self.start_layer:self.end_layer], positions, hidden_states, residual, meta,
                split_at)
        else:
            for i in range(self.start_layer, self.end_layer):
                hidden_states, residual = self.model.layers[i](positions, hidden_states, residual, meta)
        if not self.is_last_stage:
            return {"hidden_states": hidden_states, "residual": residual}
        hidden_states, _ = self.model.norm(hidden_states, residual)
        return hidden_states

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        ignored = ["rotary_emb.inv_freq"]
        if self.tie_word_embeddings or not self.is_last_stage:
            ignored.append("lm_head.")
        if not self.is_first_stage:
            ignored.append("embed_tokens.")
        if not self.is_last_stage:
            ignored.append("model.norm.")
        if self.tie_word_embeddings and self.is_last_stage and not self.is_first_stage:
            # the last stage holds its own copy of the tied matrix: read the embedding as the LM head
            ignored.remove("lm_head.")
            weights = (("lm_head.weight" if n == "model.embed_tokens.weight" else n, w)
                       for n, w in weights if n != "lm_head.weight")
        load_weights_strict(self, weights, self.packed, ignored,
                            skip_layer=lambda i: not self.start_layer <= i < self.end_layer)


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
