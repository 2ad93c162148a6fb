"""Foundations of every miner: the registry, the calling convention and statistics.

A miner is called as ``miner(embeddings, labels, ref_emb=None, ref_labels=None, ref_exclude=None)`` and
returns an indices tuple (see :mod:`dmlkit.miners.tuples`): pairs ``(a1, p, a2, n)`` or triplets ``(a, p,
n)``, as declared by :attr:`BaseMiner.output_kind`. Anchors index ``embeddings``; positives and negatives
index ``ref_emb`` (the batch when not given); ``ref_exclude``, a boolean ``batch × reference`` mask, names
pairs that are never mined (e.g. an anchor and its own copy in a cross-batch memory). Mining runs under
``torch.no_grad()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dmlkit.distances import check_distance, is_similarity
from dmlkit.errors import ConfigError
from dmlkit.miners.tuples import (
    IndicesTuple,
    Pairs,
    TupleKind,
    all_pairs,
    check_batch,
    check_exclude,
    distance_matrix,
    drop_excluded,
    label_masks,
    upcast,
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
    anchor, PML's ``convert_to_triplets``), counted without building them. Means and fractions are
    computed when ``last_stats`` is read, from at most :data:`STATS_SAMPLE` evenly spaced tuples of each
    kind (exact below that). Subclasses may add keys to ``self._extra_stats`` inside :meth:`mine`.
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
        self._pending_stats: tuple | None = None
        # The current call's ref_exclude, read by label_masks/all_pairs below; reset after every call.
        self._exclude: torch.Tensor | None = None

    @property
    def is_similarity(self) -> bool:
        return is_similarity(self.distance)

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
        ref_exclude: torch.Tensor | None = None,
    ) -> IndicesTuple:
        """Mine an indices tuple from a batch (and optionally a reference set); ``ref_exclude`` (boolean,
        ``B × R``, with a reference set only): pairs never to mine."""
        name = self.registry_name or type(self).__name__
        with torch.no_grad():
            embeddings, labels, ref_emb, ref_labels = check_batch(
                embeddings, labels, ref_emb, ref_labels, name
            )
            if ref_exclude is not None:
                if ref_emb is None:
                    raise ConfigError(f"miner '{name}': ref_exclude needs ref_emb/ref_labels")
                ref_exclude = check_exclude(ref_exclude, len(embeddings), len(ref_emb), name)
                ref_exclude = ref_exclude.to(embeddings.device)
            mat = self.distance_matrix(embeddings, ref_emb)
            self._extra_stats = {}
            self._exclude = ref_exclude
            try:
                out = self.mine(mat, labels, ref_labels, embeddings, ref_emb)
            finally:
                self._exclude = None
            if ref_exclude is not None:  # for rules that pick pairs other than from the masks
                out = drop_excluded(out, ref_exclude)
            self._record(mat, out)
        return out

    def label_masks(
        self, labels: torch.Tensor, ref_labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`dmlkit.miners.tuples.label_masks` without the current call's excluded pairs."""
        return label_masks(labels, ref_labels, self._exclude)

    def all_pairs(self, labels: torch.Tensor, ref_labels: torch.Tensor | None) -> Pairs:
        """:func:`dmlkit.miners.tuples.all_pairs` without the current call's excluded pairs."""
        return all_pairs(labels, ref_labels, self._exclude)

    def distance_matrix(self, embeddings: torch.Tensor, ref_emb: torch.Tensor | None) -> torch.Tensor:
        """The ``B × R`` matrix handed to :meth:`mine` (:func:`dmlkit.miners.tuples.distance_matrix`).

        Euclidean distances come from ``torch.cdist``, as in PML's ``LpDistance``: mining needs no
        gradient, so the zero-distance care of the Gram form is not needed, cdist is faster, and
        thresholds and arg-min/max then see PML's very values.
        """
        if self.distance not in ("euclidean", "squared_euclidean"):
            return distance_matrix(embeddings, ref_emb, self.distance, self.normalize_embeddings)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            x = upcast(embeddings)
            y = None if ref_emb is None else upcast(ref_emb)
            if y is not None and y.dtype != x.dtype:
                common = torch.promote_types(x.dtype, y.dtype)
                x, y = x.to(common), y.to(common)
            if self.normalize_embeddings:
                x = F.normalize(x, p=2, dim=1)
                y = None if y is None else F.normalize(y, p=2, dim=1)
            mat = torch.cdist(x, x if y is None else y)
            return mat.pow(2) if self.distance == "squared_euclidean" else mat

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
            self._stats = {"num_triplets": float(out[0].numel())}
        else:
            self._stats = {"num_pos_pairs": float(out[0].numel()), "num_neg_pairs": float(out[2].numel())}
        self._stats.update(self._extra_stats)
        # Means and hardness fractions are computed when read, so a caller that never reads them (or a
        # benchmark) does not pay for gathers over millions of mined tuples.
        self._pending_stats = (mat, out, float(getattr(self, "margin", 0.2)), self.is_similarity)

    @property
    def last_stats(self) -> dict[str, float]:
        """Statistics of the last call (converted lazily, so a GPU sync happens only when read)."""
        if self._pending_stats is not None:
            self._stats.update(_tuple_stats(*self._pending_stats))
            self._pending_stats = None
        return {key: float(val) for key, val in self._stats.items()}

    def extra_repr(self) -> str:
        return f"distance={self.distance!r}, normalize_embeddings={self.normalize_embeddings}"


#: Statistics are computed from at most this many mined tuples (evenly spaced) of each kind.
STATS_SAMPLE = 1 << 18


def _thin(indices: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """At most :data:`STATS_SAMPLE` evenly spaced entries of parallel index tensors."""
    size = indices[0].numel()
    if size <= STATS_SAMPLE:
        return indices
    keep = torch.arange(STATS_SAMPLE, device=indices[0].device) * size // STATS_SAMPLE
    return tuple(t[keep] for t in indices)


def _tuple_stats(
    mat: torch.Tensor, out: IndicesTuple, margin: float, similarity: bool
) -> dict[str, torch.Tensor | float]:
    """``mean_pos_distance``, ``mean_neg_distance`` and ``frac_*`` of a miner's output (see BaseMiner)."""
    if len(out) == 3:
        a, p, n = _thin(out)
        a1 = a2 = a
    else:
        a1, p = _thin(out[:2])
        a2, n = _thin(out[2:])
    # mean of an empty selection is NaN, which is what "no pair mined" should read as.
    pos_values, neg_values = mat[a1, p], mat[a2, n]
    sign = -1.0 if similarity else 1.0
    hard, semihard, easy = _hardness_fractions(
        len(out) == 3, a1, sign * pos_values, a2, sign * neg_values, margin
    )
    return {
        "mean_pos_distance": pos_values.mean(),
        "mean_neg_distance": neg_values.mean(),
        "frac_hard": hard,
        "frac_semihard": semihard,
        "frac_easy": easy,
    }


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
    ``d_p ≥ d_n − margin`` (hard or semihard) are counted, against a padded row of the anchor's
    positives when anchors have few, else by binary search in the positives sorted by ``(anchor, d_p)``
    (packed into one increasing float64 key).
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
    num_anchors = int(torch.maximum(a1.max(), a2.max())) + 1
    pos_count = torch.bincount(a1, minlength=num_anchors)
    neg_count = torch.bincount(a2, minlength=num_anchors)
    total = float(pos_count.double() @ neg_count.double())
    if total == 0:
        return (float("nan"),) * 3
    widest = int(pos_count.max())
    if widest <= 32:
        # few positives per anchor: compare each negative with a padded row of its anchor's positives
        order = torch.argsort(a1, stable=True)
        a_sorted = a1[order]
        rank = torch.arange(a1.numel(), device=a1.device) - (torch.cumsum(pos_count, 0) - pos_count)[a_sorted]
        rows = pos.new_full((num_anchors, widest), -torch.inf)
        rows[a_sorted, rank] = pos[order]
        anchor_rows = rows[a2]
        hard = float((anchor_rows >= neg.unsqueeze(1)).sum()) / total
        easy = 1.0 - float((anchor_rows >= (neg - margin).unsqueeze(1)).sum()) / total
        return hard, 1.0 - hard - easy, easy
    pos, neg = pos.double(), neg.double()
    low = torch.minimum(pos.min(), neg.min())
    # anchor a's keys lie in [a·stride, (a + 1)·stride), so one search covers every anchor's block
    stride = torch.maximum(pos.max(), neg.max()) - low + abs(margin) + 1.0
    keys, _ = torch.sort(a1 * stride + (pos - low))
    block_end = float(torch.cumsum(pos_count, 0).double() @ neg_count.double())
    block_start = a2 * stride

    def at_least(threshold: torch.Tensor) -> float:
        # Σ over negative pairs of #{positives of the same anchor with d_p >= threshold}; thresholds
        # below every d_p are raised to `low` so that the search stays inside the anchor's block
        first = torch.searchsorted(keys, block_start + (threshold.clamp_min(low) - low))
        return block_end - float(first.sum())

    hard = at_least(neg) / total
    easy = 1.0 - at_least(neg - margin) / total
    return hard, 1.0 - hard - easy, easy
