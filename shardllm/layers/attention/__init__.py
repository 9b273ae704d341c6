from shardllm.layers.attention.attention import Attention, AttentionMetadata

__all__ = ["Attention", "AttentionMetadata"]
