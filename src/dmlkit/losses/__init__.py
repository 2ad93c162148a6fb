"""Metric-learning losses, picked by name: ``build(name, **kwargs)``, ``available()`` and, for a
configuration not built yet, ``capabilities(name, args)``.

See ``docs/losses.md`` for the table of losses and the calling convention, :mod:`dmlkit.losses.base` for
the base classes new losses derive from (and the :class:`Loss` protocol the trainer relies on), and
:mod:`dmlkit.losses.reducers` for the reductions and :mod:`dmlkit.losses.regularizers` for the regularizers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from torch import nn

from dmlkit.losses import (
    combine,
    margin_softmax,
    pair,
    proxy,
    ranking,
    reducers,
    regularizers,
    self_supervised,
    softmax_family,
)
from dmlkit.losses.base import (
    PAIRS_AND_TRIPLETS,
    REGISTRY,
    BaseLoss,
    Loss,
    LossInputs,
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


def capabilities(name: str, args: Mapping[str, Any]) -> tuple[frozenset[str], bool]:
    """``(tuple_kinds, accepts_ref)`` of the loss ``name`` built with the keyword arguments ``args``,
    without building it (no data needed): the class's, or for a combination (``multiple``) those its
    members give it (:meth:`BaseLoss.capabilities`). Unknown names raise ``UnknownNameError``."""
    return cast(type[BaseLoss], REGISTRY.get(name)).capabilities(args)


__all__ = [
    "PAIRS_AND_TRIPLETS",
    "REGISTRY",
    "BaseLoss",
    "ContrastiveLoss",
    "Loss",
    "LossInputs",
    "MatrixPairLoss",
    "MultiSimilarityLoss",
    "PairLoss",
    "TripletLoss",
    "TripletMarginLoss",
    "available",
    "build",
    "capabilities",
    "combine",
    "margin_softmax",
    "pair",
    "proxy",
    "ranking",
    "reduce",
    "reducers",
    "register",
    "regularizers",
    "self_supervised",
    "softmax_family",
]
