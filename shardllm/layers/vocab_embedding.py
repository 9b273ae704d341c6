"""Token embedding and LM head split over the vocabulary; the vocabulary is padded to a multiple of tp."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shardllm.distributed.communication import tp_all_gather, tp_all_reduce
from shardllm.distributed.parallel_state import get_parallel_context
from shardllm.layers.gemv import maybe_small_m_linear_bf16
from shardllm.model_loader.weight_utils import copy_weight, narrow, weight_shape


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype | None = None):
        super().__init__()
        ctx = get_parallel_context()
        self.tp_rank, self.tp_size = ctx.tp_rank, ctx.tp_size
        self.num_embeddings = num_embeddings
        self.num_embeddings_padded = -(-num_embeddings // self.tp_size) * self.tp_size
        self.num_per_rank = self.num_embeddings_padded // self.tp_size
        self.vocab_start = self.tp_rank * self.num_per_rank
        self.vocab_end = self.vocab_start + self.num_per_rank
        self.weight = nn.Parameter(torch.zeros(self.num_per_rank, embedding_dim, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, w: Any) -> None:
        vocab = weight_shape(w)[0]
        if vocab != self.num_embeddings:
            raise ValueError(f"vocabulary size mismatch: config {self.num_embeddings}, checkpoint {vocab}")
        n = max(0, min(self.vocab_end, vocab) - self.vocab_start)
        if n:
            copy_weight(param.data[:n], narrow(w, 0, self.vocab_start, n))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        mask = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        x = F.embedding((input_ids - self.vocab_start) * mask, self.weight)  # (N, H)
        x = x * mask.unsqueeze(-1).to(x.dtype)
        return tp_all_reduce(x)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection to the vocabulary; every rank ends with the full logits."""

    def tie_weights(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = maybe_small_m_linear_bf16(hidden_states, self.weight, None)  # decode GEMV where it beat cuBLAS
        if logits is None:
            logits = F.linear(hidden_states, self.weight)  # (N, V / tp)
        logits = tp_all_gather(logits, dim=-1)  # (N, V padded)
        return logits[..., : self.num_embeddings]
