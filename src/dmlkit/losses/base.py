"""Foundations of every loss: the registry, the calling convention, reductions and pair/triplet bases.

A loss is the composition of four orthogonal choices, as in pytorch-metric-learning (PML):

- a **distance** (a :class:`dmlkit.distances.Distance`: ``euclidean``, ``squared_euclidean``, ``cosine``,
  ``dot`` or ``snr``), applied after L2-normalising the embeddings when ``normalize_embeddings=True``
  (PML's default);
- the **tuples** it is computed on: a miner's ``indices_tuple`` or, without one, all valid pairs/triplets;
- a **reduction** of the per-element losses to a scalar (:mod:`dmlkit.losses.reducers`: ``mean``,
  ``avg_non_zero``, ``sum``);
- the **loss formula** itself, the only thing a concrete loss writes (:meth:`BaseLoss.compute_loss` on the
  validated call, a :class:`dmlkit.tuples.Batch`).

Every loss is called as ``loss(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None,
ref_exclude=None)`` and returns a scalar; ``ref_exclude`` (a boolean ``batch × reference`` mask) names
pairs that are neither positives nor negatives, e.g. an anchor and its own copy in a cross-batch
memory. Class attributes tell the trainer how to use it (the :class:`Loss` protocol):
:attr:`BaseLoss.tuple_kinds`, :attr:`BaseLoss.accepts_ref`, :attr:`BaseLoss.needs`; trainable parameters
(proxies, class centres) are ordinary ``nn.Parameter`` attributes, so ``loss.parameters()`` yields them.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Protocol, TypedDict, Unpack, runtime_checkable

import torch
from torch import nn

from dmlkit import distances
from dmlkit.distances import full_precision
from dmlkit.errors import ConfigError
from dmlkit.losses import reducers
from dmlkit.losses.reducers import reduce
from dmlkit.registry import Registered, Registry, SharedOptions
from dmlkit.tuples import (
    PAIRS,
    TRIPLETS,
    TUPLE_KINDS,
    Batch,
    IndicesTuple,
    Pairs,
    Triplets,
    check_indices_tuple,
    checked_batch,
    drop_excluded,
    pair_masks,
)

REGISTRY: Registry[nn.Module] = Registry("loss")

PAIRS_AND_TRIPLETS: frozenset[str] = TUPLE_KINDS
#: The similarities among the distances (for losses whose formula needs one).
SIMILARITIES: tuple[str, ...] = tuple(n for n in distances.available() if distances.build(n).is_similarity)


#: Class decorator registering a loss under a name (the class learns it as ``registry_name``).
register = REGISTRY.register


class LossInputs(TypedDict, total=False):
    """The optional inputs of a loss call, by keyword (each None when absent): see
    :meth:`BaseLoss.forward`."""

    indices_tuple: IndicesTuple | None
    ref_emb: torch.Tensor | None
    ref_labels: torch.Tensor | None
    ref_exclude: torch.Tensor | None


@runtime_checkable
class Loss(Protocol):
    """What the trainer uses of a loss (every :class:`BaseLoss` is one; :meth:`BaseLoss.forward` implements
    the call): called with the embeddings, the labels and, by keyword, the :class:`LossInputs` it has, it
    returns a scalar; it declares the miner outputs it takes (``tuple_kinds``), whether it takes a reference
    set (``accepts_ref``) and which constructor arguments the trainer supplies (``needs``); ``last_stats``
    are the last call's statistics. A module without these (a foreign loss) is called as
    ``loss(embeddings, labels, indices_tuple)``."""

    def __call__(
        self, embeddings: torch.Tensor, labels: torch.Tensor, **inputs: Unpack[LossInputs]
    ) -> torch.Tensor: ...

    @property
    def tuple_kinds(self) -> frozenset[str]: ...

    @property
    def accepts_ref(self) -> bool: ...

    @property
    def needs(self) -> frozenset[str]: ...

    @property
    def last_stats(self) -> dict[str, float]: ...


def check_choice(who: str, key: str, value: object, allowed: tuple[object, ...], why: str = "") -> None:
    """Raise ``ConfigError`` naming ``who`` and ``key`` unless ``value`` is one of ``allowed`` (``why``: what
    needs the restriction)."""
    if value not in allowed:
        because = f" ({why})" if why else ""
        raise ConfigError(
            f"{who}: {key} must be one of {', '.join(map(repr, allowed))}{because}, got {value!r}"
        )


def check_positive(who: str, **values: float) -> None:
    """Raise ``ConfigError`` naming ``who`` and the keyword unless every value is > 0."""
    for key, value in values.items():
        if not value > 0:
            raise ConfigError(f"{who}: {key} must be > 0, got {value}")


def sample_weights(
    indices_tuple: IndicesTuple | None, batch_size: int, dtype: torch.dtype, anchors_only: bool = False
) -> torch.Tensor | None:
    """Per-sample weights from a miner's output (PML ``convert_to_weights``), None meaning "all 1".

    ``wᵢ = countᵢ / maxⱼ countⱼ`` where ``countᵢ`` is how often sample ``i`` occurs in the indices tuple:
    anywhere (anchors, positives and negatives alike), or only as an anchor with ``anchors_only`` (PML's
    ``using_ref``). Samples that never occur get 0. An absent or empty indices tuple weighs every sample 1.
    """
    if indices_tuple is None or all(t.numel() == 0 for t in indices_tuple):
        return None
    if anchors_only:
        parts = [indices_tuple[0]] if len(indices_tuple) == 3 else [indices_tuple[0], indices_tuple[2]]
    else:
        parts = list(indices_tuple)
    counts = torch.bincount(torch.cat([t.reshape(-1).long() for t in parts]), minlength=batch_size)
    counts = counts.to(dtype)
    return counts / counts.max()


def anchor_weights(batch: Batch, like: torch.Tensor) -> torch.Tensor:
    """Per-anchor weights from the call's miner output: :func:`sample_weights` (counting anchors only with a
    reference set, PML's ``using_ref``), all ones (``like``'s dtype) without one."""
    weights = sample_weights(batch.indices_tuple, len(batch.labels), like.dtype, not batch.own_reference)
    return like.new_ones(len(batch.labels)) if weights is None else weights


def masked_logsumexp(x: torch.Tensor, mask: torch.Tensor, add_one: bool = True) -> torch.Tensor:
    """Row-wise ``log(1·[add_one] + Σ_{j: mask[i,j]} exp(x[i,j]))``; rows with an empty mask give 0.

    PML ``lmu.logsumexp``: masked entries are set to the dtype's lowest finite value rather than −inf, so
    a fully masked row never produces ``exp(−inf + inf)`` = NaN in the backward pass.
    """
    x = x.masked_fill(~mask, torch.finfo(x.dtype).min)
    if add_one:
        x = torch.cat([x, x.new_zeros(x.shape[0], 1)], dim=1)
    out = torch.logsumexp(x, dim=1)
    return out.masked_fill(~mask.any(dim=1), 0.0)


# ---------------------------------------------------------------------------------------------- base class


class BaseLoss(Registered, SharedOptions, nn.Module):
    """Common calling convention, validation, distance, reduction and statistics.

    Subclasses set the class attributes below and implement :meth:`compute_loss`. The options every loss
    takes (``distance``, ``normalize_embeddings``, ``reduction``) are declared once, by
    :meth:`shared_options`; a loss declares only its own hyperparameters, as the parameters of
    :meth:`configure`, and its default distance and reduction in :attr:`defaults`
    (:class:`dmlkit.registry.SharedOptions`). The constructor's signature is computed from both, the
    shared options keyword-only, so the registry catches a misspelt option. The ``distance`` name is
    turned into a :class:`dmlkit.distances.Distance` once (``self.distance``, None for a loss without
    one), the ``reduction`` name into a :class:`~dmlkit.losses.reducers.Reducer` (``self.reducer``).
    """

    #: Kinds of miner output the loss consumes, conversions included (``{"pairs", "triplets"}`` for PML
    #: pair and triplet losses, which convert one into the other). Empty: the loss takes no miner.
    tuple_kinds: ClassVar[frozenset[str]] = frozenset()
    #: Whether ``ref_emb``/``ref_labels`` (e.g. a cross-batch memory) may be passed. False for proxy and
    #: classification losses.
    accepts_ref: ClassVar[bool] = True
    #: Constructor arguments the trainer must supply: a subset of ``{"num_classes", "embedding_size"}``.
    needs: ClassVar[frozenset[str]] = frozenset()
    #: The distance names the loss's formula is defined for (None: any), and why, for the error message.
    allowed_distances: ClassVar[tuple[str, ...] | None] = None
    distance_reason: ClassVar[str] = ""
    #: False for a loss that takes none of the shared options (the ``multiple`` combiner: its members do);
    #: its constructor is then its :meth:`configure` alone.
    takes_shared_options: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.takes_shared_options:
            own = inspect.signature(cls.configure).parameters.values()
            cls.__signature__ = inspect.Signature([p for p in own if p.name != "self"])  # type: ignore[attr-defined]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self._stats: dict[str, torch.Tensor | float] = {}
        self.apply_arguments(args, kwargs)

    def shared_options(
        self, *, distance: str | None = None, normalize_embeddings: bool = True, reduction: str = "mean"
    ) -> None:
        """Build the distance (None: the loss has none, e.g. ``multiple``) and the reducer, and check the
        distance is one of :attr:`allowed_distances`."""
        self.normalize_embeddings = bool(normalize_embeddings)
        self.distance: distances.Distance = (
            None  # type: ignore[assignment]
            if distance is None
            else distances.build(distance, normalize_embeddings=normalize_embeddings)
        )
        self.reducer = reducers.build(reduction)
        self.reduction = reduction
        if self.allowed_distances is not None:
            check_choice(self.who, "distance", distance, self.allowed_distances, self.distance_reason)

    @classmethod
    def capabilities(cls, args: Mapping[str, Any]) -> tuple[frozenset[str], bool]:
        """``(tuple_kinds, accepts_ref)`` of the loss built with the keyword arguments ``args``, without
        building it: the class attributes, unless the configuration decides them (``multiple``)."""
        return cls.tuple_kinds, cls.accepts_ref

    # -- calling convention ------------------------------------------------------------------------------

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: IndicesTuple | None = None,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
        ref_exclude: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scalar loss of ``embeddings`` (B × d) with int64 ``labels`` (B,).

        ``indices_tuple``: a miner's output, triplets ``(a, p, n)`` or pairs ``(a1, p, a2, n)``; anchors
        index ``embeddings``, positives/negatives index ``ref_emb`` (the batch when not given).
        ``ref_exclude``: boolean ``B × R`` mask (R the reference set's size) of pairs to leave out, as
        positives and as negatives; mined tuples that use such a pair are dropped.
        Half-precision embeddings are computed on in float32 with autocast disabled.
        """
        batch = checked_batch(embeddings, labels, ref_emb, ref_labels, ref_exclude, "loss", self.who)
        if batch.ref_emb is not None and not self.accepts_ref:
            raise ConfigError(f"loss '{self.who}' does not accept ref_emb/ref_labels")
        if indices_tuple is not None:
            kind = check_indices_tuple(indices_tuple)
            if kind not in self.tuple_kinds:
                takes = " or ".join(sorted(self.tuple_kinds)) or "no miner output"
                raise ConfigError(
                    f"loss '{self.who}' cannot use an indices_tuple of {kind}; it takes {takes}"
                )
            if batch.exclude is not None:
                indices_tuple = drop_excluded(indices_tuple, batch.exclude)
            batch = dataclasses.replace(batch, indices_tuple=indices_tuple)
        self._stats = {}
        with full_precision(embeddings):
            return self.compute_loss(batch)

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        """The loss proper, on a validated call (its reference set ``None`` when it is the batch)."""
        raise NotImplementedError

    # -- helpers for subclasses --------------------------------------------------------------------------

    @property
    def is_similarity(self) -> bool:
        """True when the loss's distance grows with similarity (``cosine``, ``dot``)."""
        return self.distance is not None and self.distance.is_similarity

    def matrix(self, batch: Batch, scale: float = 1.0) -> torch.Tensor:
        """``scale ×`` the ``batch × reference`` matrix of the loss's distance (:meth:`Distance.matrix`)."""
        if self.distance is None:
            raise NotImplementedError(f"{type(self).__name__} has no distance")
        return self.distance.matrix(batch.embeddings, batch.ref_emb, scale)

    def reduce(self, losses: torch.Tensor) -> torch.Tensor:
        """Reduce with the configured ``reduction``."""
        return self.reducer(losses)

    @staticmethod
    def zero_loss(embeddings: torch.Tensor) -> torch.Tensor:
        """A 0 that stays connected to the graph, so ``backward()`` works and yields zero gradients."""
        return (embeddings * 0).sum()

    def record(self, **stats: torch.Tensor | float) -> None:
        """Store statistics for :attr:`last_stats`; tensors are detached and read only on access."""
        for key, val in stats.items():
            self._stats[key] = val.detach() if isinstance(val, torch.Tensor) else float(val)

    @property
    def last_stats(self) -> dict[str, float]:
        """Statistics of the last call (converted lazily, so a GPU sync happens only when read)."""
        return {key: float(val) for key, val in self._stats.items()}

    def extra_repr(self) -> str:
        distance = None if self.distance is None else str(self.distance)
        return (
            f"distance={distance!r}, normalize_embeddings={self.normalize_embeddings}, "
            f"reduction={self.reduction!r}"
        )


class PairLoss(BaseLoss):
    """A loss on individual pairs (PML ``GenericPairLoss(mat_based_loss=False)``).

    Each positive pair value ``m[a1, p]`` and negative pair value ``m[a2, n]`` gets its own loss from
    :meth:`pair_losses`; the two sets are reduced separately and summed (PML's per-sub-loss reducers).
    Pairs repeated in the indices tuple count repeatedly. Triplets are used as ``(a, p, a, n)``.

    Statistics: ``num_pos_pairs``, ``num_neg_pairs`` (pairs considered) and ``num_active_pos_pairs``,
    ``num_active_neg_pairs`` (pairs with a non-zero loss).
    """

    tuple_kinds = PAIRS_AND_TRIPLETS

    def pair_losses(self, pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pair losses of positive and negative pair values (distances or similarities)."""
        raise NotImplementedError

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        a1, p, a2, n = batch.to_pairs()
        mat = self.matrix(batch)
        pos_loss, neg_loss = self.pair_losses(mat[a1, p], mat[a2, n])
        self.record(
            num_pos_pairs=a1.numel(),
            num_neg_pairs=a2.numel(),
            num_active_pos_pairs=(pos_loss > 0).sum(),
            num_active_neg_pairs=(neg_loss > 0).sum(),
        )
        return self.reduce(pos_loss) + self.reduce(neg_loss)


class MatrixPairLoss(BaseLoss):
    """A loss computed per anchor from the whole distance matrix and boolean pair masks.

    PML ``GenericPairLoss(mat_based_loss=True)``: mined pairs only select entries of the masks, so a
    pair repeated in the indices tuple counts once. :meth:`matrix_loss` returns one loss per anchor
    (row); anchors without pairs are 0 and still count in a ``mean`` reduction, as in PML.

    Statistics: ``num_pos_pairs``, ``num_neg_pairs`` (distinct pairs in the masks).
    """

    tuple_kinds = PAIRS_AND_TRIPLETS

    def matrix_loss(self, mat: torch.Tensor, pos_mask: torch.Tensor, neg_mask: torch.Tensor) -> torch.Tensor:
        """Per-anchor losses (shape ``(B,)``) from the matrix and the positive/negative masks."""
        raise NotImplementedError

    @staticmethod
    def masks(batch: Batch, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean ``(pos, neg)`` masks of the ``shape`` matrix: from labels (no miner) or from the mined
        pairs."""
        if batch.indices_tuple is None:
            return batch.label_masks()
        return pair_masks(batch.to_pairs(), shape, batch.embeddings.device)

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        mat = self.matrix(batch)
        pos_mask, neg_mask = self.masks(batch, tuple(mat.shape))  # type: ignore[arg-type]
        self.record(num_pos_pairs=pos_mask.sum(), num_neg_pairs=neg_mask.sum())
        return self.reduce(self.matrix_loss(mat, pos_mask, neg_mask))


class TripletLoss(BaseLoss):
    """A loss on ``(anchor, positive, negative)`` triplets.

    Without a miner: all triplets, or ``triplets_per_anchor`` random ones per anchor (an option every
    triplet loss takes, keyword-only, like the loss options); mined pairs are joined on their anchor into
    triplets (PML ``convert_to_triplets``).

    Statistics: ``num_triplets``, ``num_active_triplets`` (non-zero loss).
    """

    tuple_kinds = PAIRS_AND_TRIPLETS

    def shared_options(self, *, triplets_per_anchor: int | Literal["all"] = "all", **shared: Any) -> None:
        """The loss options plus ``triplets_per_anchor``: ``"all"`` or a positive int."""
        super().shared_options(**shared)
        if triplets_per_anchor != "all" and not (
            isinstance(triplets_per_anchor, int)
            and not isinstance(triplets_per_anchor, bool)
            and triplets_per_anchor > 0
        ):
            raise ConfigError(
                f"triplets_per_anchor must be 'all' or a positive int, got {triplets_per_anchor!r}"
            )
        self.triplets_per_anchor = triplets_per_anchor

    def triplets(self, batch: Batch) -> Triplets:
        """The call's triplets: mined (pairs joined on their anchor), all, or ``triplets_per_anchor``
        random ones per anchor."""
        return batch.to_triplets(self.triplets_per_anchor)


__all__ = [
    "PAIRS",
    "PAIRS_AND_TRIPLETS",
    "REGISTRY",
    "SIMILARITIES",
    "TRIPLETS",
    "BaseLoss",
    "Batch",
    "Loss",
    "LossInputs",
    "MatrixPairLoss",
    "PairLoss",
    "Pairs",
    "TripletLoss",
    "anchor_weights",
    "check_choice",
    "check_positive",
    "masked_logsumexp",
    "reduce",
    "register",
    "sample_weights",
]
