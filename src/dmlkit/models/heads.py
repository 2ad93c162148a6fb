"""Embedding heads: map pooled ``B × C`` features to ``B × D`` embeddings.

Heads are registered in :data:`REGISTRY` (``linear``, ``identity``) and built with :func:`build`
``(name, in_features=..., **kwargs)``; :func:`for_embedding_size` picks the head that
:func:`dmlkit.models.build_model` uses. Every head is a :class:`Head` and exposes ``out_features`` (``D``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dmlkit.errors import ConfigError
from dmlkit.registry import Registry


class Head(nn.Module):
    """Base of the heads: ``out_features`` is ``D``, the embedding size the head outputs."""

    out_features: int


REGISTRY: Registry[Head] = Registry("head")


@REGISTRY.register("linear")
class LinearHead(Head):
    """``e = W f + b``: a linear projection of the pooled features to the embedding size."""

    def __init__(self, in_features: int, embedding_size: int, bias: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, embedding_size, bias=bias)
        self.out_features = embedding_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


@REGISTRY.register("identity")
class IdentityHead(Head, nn.Identity):
    """No head, ``e = f``: the pooled features are the embedding (``out_features == in_features``)."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.out_features = in_features


def build(name: str, /, **kwargs: Any) -> Head:
    """Build the head registered as ``name`` (misspelt names and keywords raise ``UnknownNameError``)."""
    return REGISTRY.build(name, **kwargs)


def available() -> list[str]:
    """Names accepted by :func:`build`."""
    return REGISTRY.available()


def for_embedding_size(in_features: int, embedding_size: int | None) -> Head:
    """A ``linear`` head to ``embedding_size``, or the ``identity`` head when it is ``0`` or ``None``."""
    if embedding_size is None or embedding_size == 0:
        return build("identity", in_features=in_features)
    if embedding_size < 0:
        raise ConfigError(f"embedding_size must be positive, 0 or None, got {embedding_size}")
    return build("linear", in_features=in_features, embedding_size=int(embedding_size))


__all__ = ["REGISTRY", "Head", "IdentityHead", "LinearHead", "available", "build", "for_embedding_size"]
