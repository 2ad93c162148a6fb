"""Batch samplers: ``build(name, labels, batch_size, **kwargs)`` gives a resumable, rank-aware sampler.

Use the result as ``torch.utils.data.DataLoader(dataset, batch_sampler=sampler)``. Every sampler is a
:class:`BatchSampler` (``len``, ``iter``, ``set_epoch``, ``state_dict`` / ``load_state_dict``); one whose
class declares ``needs_embeddings`` also needs ``update_embeddings(indices, embeddings)`` after every
training step (see :class:`EmbeddingBatchSampler`). See ``docs/samplers.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dmlkit.samplers.base import REGISTRY, BatchSampler, RandomBatchSampler
from dmlkit.samplers.class_balanced import (
    ClassRandomSampler,
    ClassVisitSampler,
    MPerClassSampler,
    PKBatchSampler,
)
from dmlkit.samplers.coreset import (
    D2CoresetSampler,
    DistHistBatchMatchSampler,
    EmbeddingBatchSampler,
    GreedyCoresetSampler,
)
from dmlkit.samplers.hierarchical import HierarchicalSampler, super_labels_of
from dmlkit.samplers.intra_class import IntraClassUniformSampler
from dmlkit.samplers.sharded import ShardedBatchSampler

__all__ = [
    "REGISTRY",
    "BatchSampler",
    "ClassRandomSampler",
    "ClassVisitSampler",
    "D2CoresetSampler",
    "DistHistBatchMatchSampler",
    "EmbeddingBatchSampler",
    "GreedyCoresetSampler",
    "HierarchicalSampler",
    "IntraClassUniformSampler",
    "MPerClassSampler",
    "PKBatchSampler",
    "RandomBatchSampler",
    "ShardedBatchSampler",
    "available",
    "build",
    "super_labels_of",
]


def build(
    name: str, labels: Sequence[int] | np.ndarray | torch.Tensor, batch_size: int, **kwargs: Any
) -> BatchSampler:
    """Build the sampler registered as ``name``; misspelt names or keywords raise with a suggestion."""
    return REGISTRY.build(name, labels=labels, batch_size=batch_size, **kwargs)


def available() -> list[str]:
    """Names of every registered sampler."""
    return REGISTRY.available()
