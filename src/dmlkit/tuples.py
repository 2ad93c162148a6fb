"""Batch structure shared by every loss and miner: the validated call (:class:`Batch`), index tuples and
label masks.

An *indices tuple* is what a miner returns and a loss consumes (the pytorch-metric-learning format):

- triplets ``(a, p, n)``: anchor ``a[i]`` with positive ``p[i]`` and negative ``n[i]``;
- pairs ``(a1, p, a2, n)``: positive pairs ``(a1[i], p[i])`` and negative pairs ``(a2[j], n[j])``.

Anchors index the query embeddings; positives and negatives index the reference set, which is the batch
itself unless ``ref_emb``/``ref_labels`` are given. Throughout this module ``ref_labels=None`` means
"the reference set is the batch", and only then are self pairs ``(i, i)`` excluded: with an explicit
reference set every anchor × reference pair counts, as in PML's ``get_all_pairs_indices``.

Conversions follow PML (``loss_and_miner_utils.convert_to_pairs`` / ``convert_to_triplets``):

- triplets → pairs: ``(a, p, n) ↦ (a, p, a, n)`` (a pair repeated by several triplets stays repeated);
- pairs → triplets: every positive pair joined with every negative pair that shares its anchor,
  ``{(a1[i], p[i], n[j]) : a1[i] = a2[j]}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeAlias

import torch

from dmlkit.distances import upcast
from dmlkit.errors import ConfigError, DataError

Triplets: TypeAlias = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Pairs: TypeAlias = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
IndicesTuple: TypeAlias = Triplets | Pairs
TupleKind: TypeAlias = Literal["pairs", "triplets"]

PAIRS: TupleKind = "pairs"
TRIPLETS: TupleKind = "triplets"
TUPLE_KINDS: frozenset[str] = frozenset({PAIRS, TRIPLETS})


def tuple_kind(indices_tuple: IndicesTuple) -> TupleKind:
    """``"triplets"`` for a 3-tuple, ``"pairs"`` for a 4-tuple; anything else raises ``ConfigError``."""
    if not isinstance(indices_tuple, tuple | list) or len(indices_tuple) not in (3, 4):
        size = len(indices_tuple) if hasattr(indices_tuple, "__len__") else "?"
        raise ConfigError(
            "indices_tuple must be triplets (a, p, n) or pairs (a1, p, a2, n), got "
            f"{type(indices_tuple).__name__} of length {size}"
        )
    return TRIPLETS if len(indices_tuple) == 3 else PAIRS


def check_indices_tuple(indices_tuple: IndicesTuple) -> TupleKind:
    """Check shapes and dtypes of an indices tuple (no device sync: index ranges are not checked)."""
    kind = tuple_kind(indices_tuple)
    for i, t in enumerate(indices_tuple):
        if not isinstance(t, torch.Tensor) or t.ndim != 1 or t.dtype not in (torch.int64, torch.int32):
            raise DataError(
                f"indices_tuple[{i}] must be a 1-D int64 tensor, got "
                f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}"
                f"{' of shape ' + str(tuple(t.shape)) if isinstance(t, torch.Tensor) else ''}"
            )
    groups = [indices_tuple] if kind == TRIPLETS else [indices_tuple[:2], indices_tuple[2:]]
    for group in groups:
        if len({t.numel() for t in group}) != 1:
            raise DataError(
                f"indices_tuple ({kind}) has mismatched lengths {[t.numel() for t in indices_tuple]}"
            )
    return kind


def check_batch(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref_emb: torch.Tensor | None,
    ref_labels: torch.Tensor | None,
    who: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Validate a call's inputs; return them with the reference set set to ``None`` when it is the batch.

    The reference set is the batch itself when ``ref_emb`` is None, or when the caller passes the very
    same tensor objects (PML decides by identity too). Labels are moved to the embeddings' device, never
    cast: they must already be an integer tensor.
    """
    if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 2:
        shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
        raise DataError(f"{who}: embeddings must be a 2-D (batch, dim) tensor, got {shape}")
    _check_labels(labels, embeddings, "labels", who)
    if ref_emb is None and ref_labels is None:
        return embeddings, labels.to(embeddings.device), None, None
    if ref_emb is None or ref_labels is None:
        raise ConfigError(f"{who}: ref_emb and ref_labels must be given together")
    if ref_emb is embeddings and ref_labels is labels:
        return embeddings, labels.to(embeddings.device), None, None
    if ref_emb.ndim != 2 or ref_emb.shape[1] != embeddings.shape[1]:
        raise DataError(
            f"{who}: ref_emb must be 2-D with the embeddings' width {embeddings.shape[1]}, "
            f"got {tuple(ref_emb.shape)}"
        )
    _check_labels(ref_labels, ref_emb, "ref_labels", who)
    return embeddings, labels.to(embeddings.device), ref_emb, ref_labels.to(embeddings.device)


def _check_labels(labels: torch.Tensor, emb: torch.Tensor, name: str, who: str) -> None:
    if not isinstance(labels, torch.Tensor):
        raise DataError(f"{who}: {name} must be a tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise DataError(f"{who}: {name} must be an integer (int64) tensor, got {labels.dtype}")
    if labels.ndim != 1 or labels.shape[0] != emb.shape[0]:
        raise DataError(
            f"{who}: {name} must have shape ({emb.shape[0]},) to match the embeddings, "
            f"got {tuple(labels.shape)}"
        )


@dataclass(frozen=True, eq=False)
class Batch:
    """The inputs of one loss or miner call, validated by :func:`checked_batch`.

    ``ref_emb``/``ref_labels`` are None when the reference set is the batch itself; ``exclude`` (boolean,
    ``len(batch) × len(reference)``) names pairs that are neither positives nor negatives (e.g. an anchor
    and its own copy in a cross-batch memory); ``indices_tuple`` is a miner's output handed to a loss. The
    pair helpers below leave the excluded pairs out, so every loss and miner built on them honours
    ``exclude``.
    """

    embeddings: torch.Tensor
    labels: torch.Tensor
    ref_emb: torch.Tensor | None = None
    ref_labels: torch.Tensor | None = None
    exclude: torch.Tensor | None = None
    indices_tuple: IndicesTuple | None = None

    @property
    def own_reference(self) -> bool:
        """True when the reference set is the batch itself (self pairs ``(i, i)`` are then no pairs)."""
        return self.ref_labels is None

    @property
    def reference(self) -> torch.Tensor:
        """The reference embeddings: ``ref_emb``, or the batch's own."""
        return self.embeddings if self.ref_emb is None else self.ref_emb

    @property
    def reference_labels(self) -> torch.Tensor:
        """The reference labels: ``ref_labels``, or the batch's own."""
        return self.labels if self.ref_labels is None else self.ref_labels

    def same_labels(self) -> torch.Tensor:
        """Boolean ``batch × reference`` matrix: same label (self pairs and excluded pairs included)."""
        return self.labels.unsqueeze(1) == self.reference_labels.unsqueeze(0)

    def label_masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`label_masks` without the excluded pairs."""
        return label_masks(self.labels, self.ref_labels, self.exclude)

    def all_pairs(self) -> Pairs:
        """:func:`all_pairs` without the excluded pairs."""
        return all_pairs(self.labels, self.ref_labels, self.exclude)

    def to_pairs(self) -> Pairs:
        """:func:`to_pairs` of :attr:`indices_tuple` (all pairs but the excluded ones when None)."""
        return to_pairs(self.indices_tuple, self.labels, self.ref_labels, self.exclude)

    def to_triplets(self, per_anchor: int | Literal["all"] = "all") -> Triplets:
        """:func:`to_triplets` of :attr:`indices_tuple` (when None: all, or ``per_anchor`` random, triplets
        without the excluded pairs)."""
        return to_triplets(self.indices_tuple, self.labels, self.ref_labels, per_anchor, self.exclude)

    def same_label_entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rows, cols, is_pos)``: every same-label entry of the ``batch × reference`` matrix in row-major
        order (:func:`same_label_entries`) and whether it is a positive pair (not the diagonal of the batch
        against itself, not excluded). Entries not listed are negative pairs unless excluded."""
        rows, cols = same_label_entries(self.labels, self.ref_labels)
        is_pos = rows != cols if self.own_reference else torch.ones_like(rows, dtype=torch.bool)
        if self.exclude is not None:
            is_pos &= ~self.exclude[rows, cols]
        return rows, cols, is_pos


def checked_batch(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref_emb: torch.Tensor | None,
    ref_labels: torch.Tensor | None,
    ref_exclude: torch.Tensor | None,
    role: str,
    name: str,
) -> Batch:
    """A :class:`Batch` of a call's inputs, checked (:func:`check_batch`, :func:`check_exclude`) and with the
    embeddings upcast to float32 at least (:func:`dmlkit.distances.upcast`); ``role`` and ``name`` (e.g.
    ``"loss"``, ``"triplet"``) say who is called, in errors."""
    embeddings, labels, ref_emb, ref_labels = check_batch(embeddings, labels, ref_emb, ref_labels, name)
    if ref_exclude is not None:
        if ref_emb is None:
            raise ConfigError(f"{role} '{name}': ref_exclude needs ref_emb/ref_labels")
        ref_exclude = check_exclude(ref_exclude, len(embeddings), len(ref_emb), name).to(embeddings.device)
    ref = None if ref_emb is None else upcast(ref_emb)
    return Batch(upcast(embeddings), labels, ref, ref_labels, ref_exclude)


def label_masks(
    labels: torch.Tensor, ref_labels: torch.Tensor | None = None, exclude: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean ``(pos, neg)`` masks of shape ``(len(labels), len(ref))``.

    ``pos[i, j]``: same label (the diagonal excluded when ``ref_labels`` is None); ``neg[i, j]``: different
    labels. ``exclude`` (boolean, same shape): pairs that are neither, e.g. an anchor and its own copy
    in a cross-batch memory.
    """
    ref = labels if ref_labels is None else ref_labels
    same = labels.unsqueeze(1) == ref.unsqueeze(0)
    neg = ~same
    if ref_labels is None:
        same.fill_diagonal_(False)
    if exclude is not None:
        keep = ~exclude
        same &= keep
        neg &= keep
    return same, neg


def check_exclude(exclude: torch.Tensor, num_rows: int, num_cols: int, name: str) -> torch.Tensor:
    """Check a pair-exclusion mask: boolean, shape ``(num_rows, num_cols)``; returns it."""
    if not isinstance(exclude, torch.Tensor) or exclude.dtype != torch.bool:
        kind = exclude.dtype if isinstance(exclude, torch.Tensor) else type(exclude).__name__
        raise DataError(f"{name}: ref_exclude must be a boolean tensor, got {kind}")
    if tuple(exclude.shape) != (num_rows, num_cols):
        raise DataError(
            f"{name}: ref_exclude has shape {tuple(exclude.shape)}, expected (batch, reference) = "
            f"({num_rows}, {num_cols})"
        )
    return exclude


def drop_excluded(indices_tuple: IndicesTuple, exclude: torch.Tensor) -> IndicesTuple:
    """The tuples of ``indices_tuple`` that use no excluded pair (a triplet goes if either of its pairs
    is excluded)."""
    if len(indices_tuple) == 3:
        a, p, n = indices_tuple
        keep = ~(exclude[a, p] | exclude[a, n])
        return a[keep], p[keep], n[keep]
    a1, p, a2, n = indices_tuple
    keep_pos, keep_neg = ~exclude[a1, p], ~exclude[a2, n]
    return a1[keep_pos], p[keep_pos], a2[keep_neg], n[keep_neg]


def all_pairs(
    labels: torch.Tensor, ref_labels: torch.Tensor | None = None, exclude: torch.Tensor | None = None
) -> Pairs:
    """Every positive and negative pair, in row-major order (PML ``get_all_pairs_indices``)."""
    return masked_pairs(*label_masks(labels, ref_labels, exclude))


def masked_pairs(pos: torch.Tensor, neg: torch.Tensor) -> Pairs:
    """The pairs ``(a1, p, a2, n)`` of two boolean masks (``pos[a1, p]``, ``neg[a2, n]``), row-major order."""
    a1, p = torch.nonzero(pos, as_tuple=True)
    a2, n = torch.nonzero(neg, as_tuple=True)
    return a1, p, a2, n


def all_triplets(
    labels: torch.Tensor, ref_labels: torch.Tensor | None = None, exclude: torch.Tensor | None = None
) -> Triplets:
    """Every ``(a, p, n)`` with ``p`` a positive and ``n`` a negative of ``a``, lexicographic order.

    Same triplets, same order as ``nonzero(pos[:, :, None] & neg[:, None, :])`` (PML's vectorised
    method) without the ``B × R × R`` mask: each positive pair is repeated once per negative of its
    anchor, and the negatives are read from the row-major negative pairs, which are grouped by anchor.
    """
    pos, neg = label_masks(labels, ref_labels, exclude)
    a1, p = torch.nonzero(pos, as_tuple=True)
    n_of_anchor = torch.nonzero(neg, as_tuple=True)[1]
    num_neg = neg.sum(1)
    reps = num_neg[a1]
    first_neg = torch.repeat_interleave((torch.cumsum(num_neg, 0) - num_neg)[a1], reps)
    run_start = torch.repeat_interleave(torch.cumsum(reps, 0) - reps, reps)
    offset = torch.arange(first_neg.numel(), device=labels.device) - run_start
    n = n_of_anchor[first_neg + offset]
    return torch.repeat_interleave(a1, reps), torch.repeat_interleave(p, reps), n


# Below this many matrix entries a label comparison and nonzero find the same-label entries fastest.
_SMALL_MATRIX = 1 << 16


def same_label_entries(
    labels: torch.Tensor, ref_labels: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of every same-label entry of the ``query × reference`` matrix, in row-major
    order (the diagonal included when the reference set is the batch, ``ref_labels=None``).

    For a large matrix, from the sorted reference labels without a ``B × R`` mask: each query's class is
    a contiguous run of them.
    """
    ref_l = labels if ref_labels is None else ref_labels
    if labels.numel() * ref_l.numel() <= _SMALL_MATRIX:
        rows, cols = torch.nonzero(labels.unsqueeze(1) == ref_l.unsqueeze(0), as_tuple=True)
        return rows, cols
    sorted_l, order = torch.sort(ref_l, stable=True)
    start = torch.searchsorted(sorted_l, labels)
    size = torch.searchsorted(sorted_l, labels, right=True) - start
    rows = torch.repeat_interleave(torch.arange(labels.numel(), device=labels.device), size)
    first = torch.cumsum(size, 0) - size
    offsets = torch.arange(rows.numel(), device=labels.device) - first[rows]
    return rows, order[start[rows] + offsets]


def random_triplets(
    labels: torch.Tensor,
    ref_labels: torch.Tensor | None,
    per_anchor: int,
    generator: torch.Generator | None = None,
    exclude: torch.Tensor | None = None,
) -> Triplets:
    """``per_anchor`` triplets for every anchor that has a positive and a negative.

    Positives and negatives are drawn uniformly with replacement among the anchor's valid ones, the
    distribution of PML's ``get_random_triplet_indices`` (the draws themselves differ).
    """
    pos, neg = label_masks(labels, ref_labels, exclude)
    anchors = torch.nonzero(pos.any(1) & neg.any(1), as_tuple=True)[0]
    if anchors.numel() == 0:
        return _empty(labels.device, 3)  # type: ignore[return-value]
    p = torch.multinomial(pos[anchors].float(), per_anchor, replacement=True, generator=generator)
    n = torch.multinomial(neg[anchors].float(), per_anchor, replacement=True, generator=generator)
    return anchors.repeat_interleave(per_anchor), p.reshape(-1), n.reshape(-1)


def triplets_to_pairs(triplets: Triplets) -> Pairs:
    """``(a, p, n) ↦ (a, p, a, n)`` (PML ``convert_to_pairs``)."""
    a, p, n = triplets
    return a, p, a, n


def pairs_to_triplets(pairs: Pairs) -> Triplets:
    """Join positive and negative pairs on their anchor (PML ``convert_to_triplets``), row-major order.

    Costs ``len(a1) × len(a2)`` memory for the join, as in PML.
    """
    a1, p, a2, n = pairs
    i, j = torch.nonzero(a1.unsqueeze(1) == a2.unsqueeze(0), as_tuple=True)
    return a1[i], p[i], n[j]


def to_pairs(
    indices_tuple: IndicesTuple | None,
    labels: torch.Tensor,
    ref_labels: torch.Tensor | None = None,
    exclude: torch.Tensor | None = None,
) -> Pairs:
    """Pairs from a miner's output of either kind, or all pairs when ``indices_tuple`` is None
    (``exclude``: pairs left out of "all pairs"; a mined tuple is taken as given)."""
    if indices_tuple is None:
        return all_pairs(labels, ref_labels, exclude)
    if tuple_kind(indices_tuple) == PAIRS:
        return tuple(indices_tuple)  # type: ignore[return-value]
    return triplets_to_pairs(indices_tuple)  # type: ignore[arg-type]


def to_triplets(
    indices_tuple: IndicesTuple | None,
    labels: torch.Tensor,
    ref_labels: torch.Tensor | None = None,
    per_anchor: int | Literal["all"] = "all",
    exclude: torch.Tensor | None = None,
) -> Triplets:
    """Triplets from a miner's output of either kind, or (when None) all / ``per_anchor`` random ones
    (``exclude``: pairs left out of those; a mined tuple is taken as given)."""
    if indices_tuple is None:
        if per_anchor == "all":
            return all_triplets(labels, ref_labels, exclude)
        return random_triplets(labels, ref_labels, int(per_anchor), exclude=exclude)
    if tuple_kind(indices_tuple) == TRIPLETS:
        return tuple(indices_tuple)  # type: ignore[return-value]
    return pairs_to_triplets(indices_tuple)  # type: ignore[arg-type]


def pair_masks(
    pairs: Pairs, shape: tuple[int, int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean ``(pos, neg)`` masks with ``pos[a1, p]`` and ``neg[a2, n]`` set (duplicates collapse)."""
    return _pair_matrices(pairs, shape, device, count=False)


def pair_counts(
    pairs: Pairs, shape: tuple[int, int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 ``(pos, neg)`` matrices counting how often each pair occurs in ``pairs`` (duplicates add)."""
    return _pair_matrices(pairs, shape, device, count=True)


def _pair_matrices(
    pairs: Pairs, shape: tuple[int, int], device: torch.device, count: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = torch.long if count else torch.bool
    pos, neg = (torch.zeros(shape, dtype=dtype, device=device) for _ in range(2))
    for mat, rows, cols in ((pos, pairs[0], pairs[1]), (neg, pairs[2], pairs[3])):
        mat.index_put_((rows, cols), torch.ones_like(rows, dtype=dtype), accumulate=count)
    return pos, neg


def _empty(device: torch.device, k: int) -> tuple[torch.Tensor, ...]:
    return tuple(torch.empty(0, dtype=torch.long, device=device) for _ in range(k))


def empty_triplets(device: torch.device) -> Triplets:
    """Three empty int64 tensors."""
    return _empty(device, 3)  # type: ignore[return-value]
