"""Foundations of every miner: the registry, the calling convention and statistics.

A miner is called as ``miner(embeddings, labels, ref_emb=None, ref_labels=None)`` and returns an
indices tuple (see :mod:`dmlkit.miners.tuples`): pairs ``(a1, p, a2, n)`` or triplets ``(a, p, n)``, as
declared by :attr:`BaseMiner.output_kind`. Anchors index ``embeddings``; positives and negatives index
``ref_emb`` (the batch when not given). Mining runs under ``torch.no_grad()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from dmlkit.distances import check_distance, is_similarity
from dmlkit.miners.tuples import (
    IndicesTuple,
    TupleKind,
    check_batch,
    distance_matrix,
)
from dmlkit.registry import Registry

REGISTRY: Registry[nn.Module] = Registry("miner")


def register(name: str) -> Callable[[type[BaseMiner]], type[BaseMiner]]:
    """Class decorator: register a miner under ``name`` and record the name on the class."""

    def decorator(cls: type[BaseMiner]) -> type[BaseMiner]:
        cls.registry_name = name
        REGISTRY.register(name)(cls)
        return cls

    return decorator


class BaseMiner(nn.Module):
    """Validation, distance matrix, no-grad and statistics around :meth:`mine`.

    Statistics (:attr:`last_stats`): ``num_pos_pairs`` and ``num_neg_pairs`` (pair miners) or
    ``num_triplets`` (triplet miners), and ``mean_pos_distance`` / ``mean_neg_distance``: the mean of the
    miner's distance (a similarity for ``cosine``/``dot``) over the mined anchor–positive and
    anchor–negative pairs, NaN when none was mined.
    """

    #: ``"pairs"`` or ``"triplets"``: the kind of indices tuple :meth:`forward` returns.
    output_kind: ClassVar[TupleKind] = "pairs"
    #: Registry name, set by :func:`register`.
    registry_name: ClassVar[str] = ""

    def __init__(self, distance: str, normalize_embeddings: bool = True) -> None:
        super().__init__()
        check_distance(distance)
        self.distance = distance
        self.normalize_embeddings = bool(normalize_embeddings)
        self._stats: dict[str, torch.Tensor | float] = {}

    @property
    def is_similarity(self) -> bool:
        return is_similarity(self.distance)

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> IndicesTuple:
        """Mine an indices tuple from a batch (and optionally a reference set)."""
        name = self.registry_name or type(self).__name__
        with torch.no_grad():
            embeddings, labels, ref_emb, ref_labels = check_batch(
                embeddings, labels, ref_emb, ref_labels, name
            )
            mat = distance_matrix(embeddings, ref_emb, self.distance, self.normalize_embeddings)
            out = self.mine(mat, labels, ref_labels, embeddings, ref_emb)
            self._record(mat, out)
        return out

    def mine(
        self,
        mat: torch.Tensor,
        labels: torch.Tensor,
        ref_labels: torch.Tensor | None,
        embeddings: torch.Tensor,
        ref_emb: torch.Tensor | None,
    ) -> IndicesTuple:
        """The mining rule. ``mat`` is the ``B × R`` matrix of the miner's distance; ``ref_labels`` and
        ``ref_emb`` are None when the reference set is the batch.
        """
        raise NotImplementedError

    def _record(self, mat: torch.Tensor, out: IndicesTuple) -> None:
        if len(out) == 3:
            a, p, n = out
            a1 = a2 = a
            self._stats = {"num_triplets": float(a.numel())}
        else:
            a1, p, a2, n = out
            self._stats = {"num_pos_pairs": float(a1.numel()), "num_neg_pairs": float(a2.numel())}
        # mean of an empty selection is NaN, which is what "no pair mined" should read as.
        self._stats["mean_pos_distance"] = mat[a1, p].mean()
        self._stats["mean_neg_distance"] = mat[a2, n].mean()

    @property
    def last_stats(self) -> dict[str, float]:
        """Statistics of the last call (converted lazily, so a GPU sync happens only when read)."""
        return {key: float(val) for key, val in self._stats.items()}

    def extra_repr(self) -> str:
        return f"distance={self.distance!r}, normalize_embeddings={self.normalize_embeddings}"
