"""Embedding heads: map pooled ``B × C`` features to ``B × D`` embeddings."""

from __future__ import annotations

import torch
from torch import nn

from dmlkit.errors import ConfigError


class LinearHead(nn.Module):
    """``e = W f + b``: a linear projection of the pooled features to the embedding size."""

    def __init__(self, in_features: int, embedding_size: int, bias: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, embedding_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def build_head(in_features: int, embedding_size: int | None) -> nn.Module:
    """A :class:`LinearHead` to ``embedding_size``, or ``nn.Identity`` when it is ``0`` or ``None``."""
    if embedding_size is None or embedding_size == 0:
        return nn.Identity()
    if embedding_size < 0:
        raise ConfigError(f"embedding_size must be positive, 0 or None, got {embedding_size}")
    return LinearHead(in_features, int(embedding_size))


__all__ = ["LinearHead", "build_head"]
