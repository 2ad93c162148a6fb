"""Embedding heads: map pooled ``B × C`` features to ``B × D`` embeddings.

Heads are registered in :data:`REGISTRY` and built with :func:`build` ``(name, in_features=...,
embedding_size=..., **head_args)``:

- ``linear``: ``e = W f + b``, optionally batch-normalised (``bn=True``: ``e = BN(W f)``);
- ``mlp``: ``e = W₂ ReLU(BN(W₁ f)) + b₂`` (two layers, ``hidden_size`` wide; ``bn=False`` drops the BN);
- ``none``: no head, ``e = f`` (``D = C``; the embedding size is the backbone's).

:func:`for_embedding_size` picks the head :func:`dmlkit.models.build_model` uses. Every head is a
:class:`Head` and exposes ``out_features`` (``D``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from dmlkit.errors import ConfigError
from dmlkit.registry import Registered, Registry

#: The head name meaning "no head" (raw pooled features).
NO_HEAD = "none"


class Head(Registered, nn.Module):
    """Base of the heads: ``out_features`` is ``D``, the embedding size the head outputs.

    ``takes_size`` says whether the head maps to an ``embedding_size`` of its own (``False`` for ``none``,
    whose output size is its input's).
    """

    out_features: int
    takes_size: ClassVar[bool] = True


REGISTRY: Registry[Head] = Registry("head")


@REGISTRY.register("linear")
class LinearHead(Head):
    """``e = W f + b``: a linear projection of the pooled features to the embedding size.

    ``bn=True`` batch-normalises the projection, ``e = BN(W f)`` (a BatchNorm1d on the embedding, as in
    the "BNNeck" of re-identification models); the linear bias is then left out by default, since the
    BatchNorm's mean subtraction cancels it (``bias`` says otherwise explicitly).
    """

    def __init__(
        self, in_features: int, embedding_size: int, bias: bool | None = None, bn: bool = False
    ) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, embedding_size, bias=(not bn) if bias is None else bias)
        self.bn = nn.BatchNorm1d(embedding_size) if bn else None
        self.out_features = embedding_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return x if self.bn is None else self.bn(x)


@REGISTRY.register("mlp")
class MLPHead(Head):
    """Two layers: ``e = W₂ ReLU(BN(W₁ f + b₁)) + b₂``, ``W₁`` of ``hidden_size`` rows (default: the input
    size); ``bn=False`` leaves the BatchNorm out (the projection heads of SimCLR-style training)."""

    def __init__(
        self, in_features: int, embedding_size: int, hidden_size: int | None = None, bn: bool = True
    ) -> None:
        super().__init__()
        hidden = in_features if hidden_size is None else int(hidden_size)
        if hidden <= 0:
            raise ConfigError(f"head 'mlp' needs hidden_size > 0, got {hidden_size}")
        layers: list[nn.Module] = [nn.Linear(in_features, hidden, bias=not bn)]
        if bn:
            layers.append(nn.BatchNorm1d(hidden))
        layers += [nn.ReLU(inplace=True), nn.Linear(hidden, embedding_size)]
        self.mlp = nn.Sequential(*layers)
        self.out_features = embedding_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


@REGISTRY.register(NO_HEAD)
class IdentityHead(Head, nn.Identity):
    """No head, ``e = f``: the pooled features are the embedding (``out_features == in_features``)."""

    takes_size = False

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.out_features = in_features


def build(name: str, /, **kwargs: Any) -> Head:
    """Build the head registered as ``name`` (misspelt names and keywords raise ``UnknownNameError``)."""
    return REGISTRY.build(name, **kwargs)


def available() -> list[str]:
    """Names accepted by :func:`build`."""
    return REGISTRY.available()


def check(name: str, embedding_size: int | None, args: dict[str, Any] | None = None) -> None:
    """Raise if ``name`` with ``args`` cannot make an ``embedding_size`` head (before building it).

    Unknown names or arguments raise ``UnknownNameError``; ``embedding_size`` inside ``args``, a size for
    the ``none`` head or no size for another head raise ``ConfigError``.
    """
    args = dict(args or {})
    REGISTRY.check_kwargs(name, args, provided_by_caller=("in_features", "embedding_size"))
    for key in ("in_features", "embedding_size"):
        if key in args:
            raise ConfigError(f"head_args: {key} is set by dmlkit (--embedding-size for the size), not here")
    size = embedding_size or 0
    if size < 0:
        raise ConfigError(f"embedding_size must be positive, 0 or None, got {embedding_size}")
    takes_size = REGISTRY.get(name).takes_size  # type: ignore[attr-defined]
    if not takes_size and size:
        raise ConfigError(
            f"head '{name}' outputs the pooled features, so embedding_size must be 0, got {embedding_size}"
        )
    if takes_size and not size and (name != "linear" or args):
        raise ConfigError(f"head '{name}' needs an embedding_size > 0 (0 means no head: head 'none')")


def for_embedding_size(
    in_features: int, embedding_size: int | None, head: str = "linear", args: dict[str, Any] | None = None
) -> Head:
    """The ``head`` to ``embedding_size`` with ``args``; ``embedding_size`` ``0``/``None`` with the default
    ``linear`` head (no arguments) means no head (``none``), as before heads were named."""
    check(head, embedding_size, args)
    if not embedding_size:
        return build(NO_HEAD, in_features=in_features)
    return build(head, in_features=in_features, embedding_size=int(embedding_size), **(args or {}))


__all__ = [
    "NO_HEAD",
    "REGISTRY",
    "Head",
    "IdentityHead",
    "LinearHead",
    "MLPHead",
    "available",
    "build",
    "check",
    "for_embedding_size",
]
