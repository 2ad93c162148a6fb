"""Metric-learning losses, picked by name: ``build(name, **kwargs)`` and ``available()``.

See ``docs/losses.md`` for the table of losses and the calling convention, and
:mod:`dmlkit.losses.base` for the base classes new losses derive from.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from dmlkit.losses import combine, margin_softmax, pair, proxy, ranking, softmax_family
from dmlkit.losses.base import (
    PAIRS_AND_TRIPLETS,
    REDUCTIONS,
    REGISTRY,
    BaseLoss,
    MatrixPairLoss,
    PairLoss,
    TripletLoss,
    reduce,
    register,
)
from dmlkit.losses.pair import ContrastiveLoss, TripletMarginLoss
from dmlkit.losses.softmax_family import MultiSimilarityLoss


def build(name: str, /, **kwargs: Any) -> nn.Module:
    """Instantiate the loss registered as ``name``; unknown names/keywords raise ``UnknownNameError``."""
    return REGISTRY.build(name, **kwargs)


def available() -> list[str]:
    """Sorted names of every registered loss."""
    return REGISTRY.available()


__all__ = [
    "PAIRS_AND_TRIPLETS",
    "REDUCTIONS",
    "REGISTRY",
    "BaseLoss",
    "ContrastiveLoss",
    "MatrixPairLoss",
    "MultiSimilarityLoss",
    "PairLoss",
    "TripletLoss",
    "TripletMarginLoss",
    "available",
    "build",
    "combine",
    "margin_softmax",
    "pair",
    "proxy",
    "ranking",
    "reduce",
    "register",
    "softmax_family",
]
