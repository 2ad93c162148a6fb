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
    anchor–negative pairs, NaN when none was mined. ``frac_hard`` / ``frac_semihard`` / ``frac_easy``
    classify each mined triplet by PML's ``TripletMarginMiner`` rule on ``m = d(a, n) − d(a, p)`` (``s(a, p)
    − s(a, n)`` for a similarity): hard ``m ≤ 0``, semihard ``0 < m ≤ margin``, easy ``m > margin``, with
    ``margin`` the miner's ``margin`` attribute if it has one, else 0.2. Pair miners are classified over
    the triplets their pairs imply (every positive pair joined with every negative pair of the same
    anchor, PML's ``convert_to_triplets``), counted without building them. Subclasses may add keys to
    ``self._extra_stats`` inside :meth:`mine`.
    """

    #: ``"pairs"`` or ``"triplets"``: the kind of indices tuple :meth:`forward` returns.
    output_kind: ClassVar[TupleKind] = "pairs"
    #: Registry name, set by :func:`register`.
    registry_name: ClassVar[str] = ""
    #: Name of the float attribute that sets how hard the mined tuples are, annealed by
    #: :class:`dmlkit.miners.schedule.MinerSchedule`; None when the miner has no such knob.
    hardness_knob: ClassVar[str | None] = None

    def __init__(self, distance: str, normalize_embeddings: bool = True) -> None:
        super().__init__()
        check_distance(distance)
        self.distance = distance
        self.normalize_embeddings = bool(normalize_embeddings)
        self._stats: dict[str, torch.Tensor | float] = {}
        self._extra_stats: dict[str, torch.Tensor | float] = {}
        self._fraction_inputs: tuple | None = None

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
            self._extra_stats = {}
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
        pos_values, neg_values = mat[a1, p], mat[a2, n]
        self._stats["mean_pos_distance"] = pos_values.mean()
        self._stats["mean_neg_distance"] = neg_values.mean()
        self._stats.update(self._extra_stats)
        # Hardness fractions are computed only when read (they cost a sort for pair miners).
        sign = -1.0 if self.is_similarity else 1.0
        margin = float(getattr(self, "margin", 0.2))
        self._fraction_inputs = (len(out) == 3, a1, sign * pos_values, a2, sign * neg_values, margin)

    @property
    def last_stats(self) -> dict[str, float]:
        """Statistics of the last call (converted lazily, so a GPU sync happens only when read)."""
        if self._fraction_inputs is not None:
            hard, semihard, easy = _hardness_fractions(*self._fraction_inputs)
            self._stats.update(frac_hard=hard, frac_semihard=semihard, frac_easy=easy)
            self._fraction_inputs = None
        return {key: float(val) for key, val in self._stats.items()}

    def extra_repr(self) -> str:
        return f"distance={self.distance!r}, normalize_embeddings={self.normalize_embeddings}"


def _hardness_fractions(
    triplets: bool,
    a1: torch.Tensor,
    pos: torch.Tensor,
    a2: torch.Tensor,
    neg: torch.Tensor,
    margin: float,
) -> tuple[float, float, float]:
    """Fractions of hard / semihard / easy triplets; ``pos``/``neg`` are distance-like (larger = farther).

    For triplets, ``pos[i]``/``neg[i]`` belong to triplet ``i``. For pairs, the triplets are the join on
    the anchor; for each negative pair the positives of its anchor with ``d_p ≥ d_n`` (hard) and
    ``d_p ≥ d_n − margin`` (hard or semihard) are counted by binary search in the positives sorted by
    ``(anchor, d_p)``, which are packed into one increasing float64 key.
    """
    if triplets:
        if pos.numel() == 0:
            return (float("nan"),) * 3
        gap = neg - pos
        total = gap.numel()
        hard = float((gap <= 0).sum()) / total
        easy = float((gap > margin).sum()) / total
        return hard, 1.0 - hard - easy, easy
    if pos.numel() == 0 or neg.numel() == 0:
        return (float("nan"),) * 3
    pos, neg = pos.double(), neg.double()
    low = torch.minimum(pos.min(), neg.min())
    stride = torch.maximum(pos.max(), neg.max()) - low + abs(margin) + 1.0
    num_anchors = int(torch.maximum(a1.max(), a2.max())) + 1
    keys, _ = torch.sort(a1 * stride + (pos - low))
    counts = torch.bincount(a1, minlength=num_anchors)
    end = torch.cumsum(counts, 0)
    start = end - counts
    total = float(counts[a2].sum())
    if total == 0:
        return (float("nan"),) * 3

    def at_least(threshold: torch.Tensor) -> float:
        # positives of anchor a2[j] with d_p >= threshold[j]; the clamp keeps the search in a2[j]'s block
        first = torch.searchsorted(keys, a2 * stride + (threshold - low)).clamp(start[a2], end[a2])
        return float((end[a2] - first).sum())

    hard = at_least(neg) / total
    easy = 1.0 - at_least(neg - margin) / total
    return hard, 1.0 - hard - easy, easy
