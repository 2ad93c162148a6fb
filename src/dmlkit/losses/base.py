"""Foundations of every loss: the registry, the calling convention, reductions and pair/triplet bases.

A loss is the composition of four orthogonal choices, as in pytorch-metric-learning (PML):

- a **distance** (a :class:`dmlkit.distances.Distance`: ``euclidean``, ``squared_euclidean``, ``cosine``,
  ``dot`` or ``snr``), applied after L2-normalising the embeddings when ``normalize_embeddings=True``
  (PML's default);
- the **tuples** it is computed on: a miner's ``indices_tuple`` or, without one, all valid pairs/triplets;
- a **reduction** of the per-element losses to a scalar (:mod:`dmlkit.losses.reducers`: ``mean``,
  ``avg_non_zero``, ``sum``, ``threshold``, ``per_anchor``, ``class_weighted``, ``do_nothing``);
- the **loss formula** itself, the only thing a concrete loss writes (:meth:`BaseLoss.compute_loss` on the
  validated call, a :class:`dmlkit.tuples.Batch`);

plus, optionally, **regularizers** (:mod:`dmlkit.losses.regularizers`) whose weighted penalties of the
embeddings and of the loss's class vectors are added to its value.

Every loss is called as ``loss(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None,
ref_exclude=None)`` and returns a scalar; ``ref_exclude`` (a boolean ``batch × reference`` mask) names
pairs that are neither positives nor negatives, e.g. an anchor and its own copy in a cross-batch
memory. Class attributes tell the trainer how to use it (the :class:`Loss` protocol):
:attr:`BaseLoss.tuple_kinds`, :attr:`BaseLoss.accepts_ref`, :attr:`BaseLoss.needs`; trainable parameters
(proxies, class centres) are ordinary ``nn.Parameter`` attributes, so ``loss.parameters()`` yields them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar, Literal, Protocol, TypedDict, Unpack, runtime_checkable

import torch
from torch import nn

from dmlkit import distances
from dmlkit.distances import full_precision
from dmlkit.errors import ConfigError
from dmlkit.losses import reducers, regularizers
from dmlkit.losses.reducers import Elements, Reducer, reduce
from dmlkit.losses.regularizers import Regularizer
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


#: What each per-element loss is, for :meth:`BaseLoss.reduce`: ``"anchors"``, a tuple of index tensors
#: (``(anchors,)``, pairs ``(anchors, others)``, triplets ``(anchors, positives, negatives)``) or None.
ElementIndices = tuple[torch.Tensor, ...] | Literal["anchors"] | None

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
    takes (``distance``, ``normalize_embeddings``, ``reduction`` and the regularizers) are declared once,
    by :meth:`shared_options`; a loss declares only its own hyperparameters, as the parameters of
    :meth:`configure`, and its default distance and reduction in :attr:`defaults`
    (:class:`dmlkit.registry.SharedOptions`). The constructor's signature is computed from both, the
    shared options keyword-only, so the registry catches a misspelt option. The ``distance`` name is
    turned into a :class:`dmlkit.distances.Distance` once (``self.distance``, None for a loss without
    one), the ``reduction`` into a :class:`~dmlkit.losses.reducers.Reducer` (``self.reducer``), the
    regularizers into :class:`~dmlkit.losses.regularizers.Regularizer` objects.
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
    #: The attribute holding the loss's margin between a triplet's two distances (``triplet``, ``margin``),
    #: which a miner that mines by its loss's margin adopts unless given its own (Roth's ``semihard`` reads
    #: ``--loss_<loss>_margin``; see :attr:`dmlkit.miners.BaseMiner.takes_loss_margin`). None: no such margin
    #: (an angular or pair margin is another quantity).
    triplet_margin: ClassVar[str | None] = None
    #: Where the loss keeps its class vectors (proxies, class weights), what a ``weight_regularizer``
    #: acts on: ``(attribute, "rows")`` for a ``C × d`` parameter, ``(attribute, "columns")`` for a
    #: ``d × C`` one. None: the loss has none, and refuses a ``weight_regularizer``.
    class_vectors: ClassVar[tuple[str, Literal["rows", "columns"]] | None] = None

    # No regularizer unless the shared options set one (a loss without shared options has none).
    embedding_regularizer: Regularizer | None = None
    weight_regularizer: Regularizer | None = None
    #: False inside :meth:`without_regularization` (a second call on the same step's embeddings).
    _regularize: bool = True
    embedding_reg_weight: float = 1.0
    weight_reg_weight: float = 1.0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.takes_shared_options:
            own = inspect.signature(cls.configure).parameters.values()
            cls.__signature__ = inspect.Signature([p for p in own if p.name != "self"])  # type: ignore[attr-defined]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self._stats: dict[str, torch.Tensor | float] = {}
        self._call: Batch | None = None  # the call being computed (what reductions are told about)
        self._unreduced = 0  # reductions made in this call by a reducer that does not reduce
        self.apply_arguments(args, kwargs)

    def shared_options(
        self,
        *,
        distance: str | None = None,
        normalize_embeddings: bool = True,
        reduction: str | Mapping[str, Any] | Reducer = "mean",
        embedding_regularizer: str | Mapping[str, Any] | Regularizer | None = None,
        embedding_reg_weight: float = 1.0,
        weight_regularizer: str | Mapping[str, Any] | Regularizer | None = None,
        weight_reg_weight: float = 1.0,
    ) -> None:
        """Build the distance (None: the loss has none, e.g. ``multiple``), the reducer (a name,
        ``{name: ..., args: {...}}`` or a :class:`~dmlkit.losses.reducers.Reducer`) and the regularizers
        (likewise, or None), and check the distance is one of :attr:`allowed_distances`."""
        self.normalize_embeddings = bool(normalize_embeddings)
        self.distance: distances.Distance = (
            None  # type: ignore[assignment]
            if distance is None
            else distances.build(distance, normalize_embeddings=normalize_embeddings)
        )
        self.reducer = reducers.from_spec(reduction, f"loss '{self.who}': reduction")
        self.reduction = self.reducer.who
        if self.allowed_distances is not None:
            check_choice(self.who, "distance", distance, self.allowed_distances, self.distance_reason)
        self.set_regularizers(
            embedding_regularizer, embedding_reg_weight, weight_regularizer, weight_reg_weight
        )

    def set_regularizers(
        self,
        embedding: str | Mapping[str, Any] | Regularizer | None,
        embedding_weight: float,
        weight: str | Mapping[str, Any] | Regularizer | None,
        weight_weight: float,
    ) -> None:
        """Build the embedding and weight regularizers and keep their weights (PML's
        ``embedding_regularizer``/``embedding_reg_weight`` and ``weight_regularizer``/``weight_reg_weight``).
        A weight regularizer needs :attr:`class_vectors`; neither goes with a reduction that returns
        per-element losses."""
        who = f"loss '{self.who}'"
        self.embedding_regularizer = (
            None if embedding is None else regularizers.from_spec(embedding, f"{who}: embedding_regularizer")
        )
        self.weight_regularizer = (
            None if weight is None else regularizers.from_spec(weight, f"{who}: weight_regularizer")
        )
        self.embedding_reg_weight, self.weight_reg_weight = float(embedding_weight), float(weight_weight)
        if self.weight_regularizer is not None and self.class_vectors is None:
            having = [n for n in REGISTRY.available() if getattr(REGISTRY.get(n), "class_vectors", None)]
            raise ConfigError(
                f"{who} has no class vectors (proxies, class weights) for a weight_regularizer; the losses "
                f"that have some: {', '.join(having) or '(none)'}"
            )
        if (self.embedding_regularizer or self.weight_regularizer) and not self.reducer.reduces:
            raise ConfigError(
                f"{who}: a regularizer's term cannot be added to the per-element losses of reduction "
                f"'{self.reduction}'"
            )

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
        self._call, self._unreduced = batch, 0
        try:
            with full_precision(embeddings):
                value = self.compute_loss(batch)
                regularized = self.embedding_regularizer is not None or self.weight_regularizer is not None
                if regularized and self._regularize:
                    value = value + self.regularization(batch.embeddings)
        finally:
            self._call = None
        return value

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

    def reduce(
        self, losses: torch.Tensor, indices: ElementIndices = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Reduce with the configured ``reduction``.

        ``indices`` tell the reducer what each element of a 1-D ``losses`` is (PML's loss indices:
        :class:`~dmlkit.losses.reducers.Elements`): ``"anchors"`` (``losses[i]`` is anchor ``i``'s),
        ``(anchors,)``, ``(anchors, others)`` for pairs, ``(anchors, positives, negatives)`` for triplets;
        None: not said, and a reducer that needs it (``per_anchor``, ``class_weighted``) raises a
        ``ConfigError`` naming the loss. ``mask``: reduce only the elements it selects
        (:meth:`~dmlkit.losses.reducers.Reducer.masked`). With a reducer that does not reduce
        (``do_nothing``) the losses come back as they are, and a loss may reduce only once per call: a
        loss made of several reduced terms adds them with :meth:`reduce_terms`.
        """
        if not self.reducer.reduces:
            self._unreduced += 1
            if self._unreduced > 1:
                raise ConfigError(
                    f"loss '{self.who}' adds several reduced terms up, so reduction '{self.reduction}' "
                    "cannot return its per-element losses"
                )
        return self._reduce_one(losses, indices, mask)

    def reduce_terms(
        self, *terms: tuple[torch.Tensor, ElementIndices], weights: Sequence[float] | None = None
    ) -> torch.Tensor:
        """``Σ_k w_k · reduce(losses_k, indices_k)``: sub-losses reduced separately, then added (PML's
        reducer per sub-loss; ``weights`` default to 1). With ``do_nothing``: the weighted per-element
        losses of every term, concatenated in order."""
        factors = [1.0] * len(terms) if weights is None else [float(w) for w in weights]
        parts = [
            value if w == 1.0 else w * value
            for (losses, indices), w in zip(terms, factors, strict=True)
            for value in [self._reduce_one(losses, indices, None)]
        ]
        if not self.reducer.reduces:
            return torch.cat([part.reshape(-1) for part in parts])
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return total

    def _reduce_one(
        self, losses: torch.Tensor, indices: ElementIndices, mask: torch.Tensor | None
    ) -> torch.Tensor:
        elements = self._elements(losses, indices) if self.reducer.needs_elements else None
        if elements is None and self.reducer.needs_elements:
            raise ConfigError(
                f"loss '{self.who}' does not tell its reduction which anchor each of its per-element losses "
                f"belongs to (PML's loss indices), which reduction '{self.reduction}' needs"
            )
        return self.reducer(losses, elements) if mask is None else self.reducer.masked(losses, mask, elements)

    def _elements(self, losses: torch.Tensor, indices: ElementIndices) -> Elements | None:
        batch = self._call
        if indices is None or batch is None:
            return None
        if isinstance(indices, str):
            if indices != "anchors":
                raise ValueError(f"indices must be 'anchors' or a tuple of index tensors, got {indices!r}")
            indices = (torch.arange(len(batch.labels), device=losses.device),)
        return Elements(tuple(indices), batch.labels, len(batch.reference_labels))

    def class_vector_rows(self) -> torch.Tensor:
        """The class vectors, one per row (:attr:`class_vectors`): what a weight regularizer acts on."""
        if self.class_vectors is None:
            raise ConfigError(f"loss '{self.who}' has no class vectors")
        name, layout = self.class_vectors
        vectors: torch.Tensor = getattr(self, name)
        return vectors if layout == "rows" else vectors.t()

    def regularization(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``embedding_reg_weight · R_e(embeddings) + weight_reg_weight · R_w(class vectors)``, the terms
        PML adds as already-reduced sub-losses; recorded in :attr:`last_stats` as ``embedding_reg_loss``
        and ``weight_reg_loss`` (weighted). ``embeddings`` are the call's, not normalised."""
        terms: list[torch.Tensor] = []
        if self.embedding_regularizer is not None:
            terms.append(self.embedding_reg_weight * self.embedding_regularizer(embeddings))
            self.record(embedding_reg_loss=terms[-1])
        if self.weight_regularizer is not None:
            terms.append(self.weight_reg_weight * self.weight_regularizer(self.class_vector_rows()))
            self.record(weight_reg_loss=terms[-1])
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        return total

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
        # a reducer with options shows them (``reduction=ThresholdReducer(low=0.1, high=None)``)
        reduction = repr(self.reducer) if self.reducer.options() else repr(self.reduction)
        shown = (
            f"distance={distance!r}, normalize_embeddings={self.normalize_embeddings}, reduction={reduction}"
        )
        for role in ("embedding", "weight"):
            regularizer = getattr(self, f"{role}_regularizer")
            if regularizer is not None:
                shown += f", {role}_regularizer={regularizer!r} × {getattr(self, f'{role}_reg_weight')}"
        return shown


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
        return self.reduce_terms((pos_loss, (a1, p)), (neg_loss, (a2, n)))


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
        return self.reduce(self.matrix_loss(mat, pos_mask, neg_mask), "anchors")


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


def check_trainable(loss: nn.Module) -> None:
    """Raise ``ConfigError`` when ``loss``, or a loss inside it (a member of ``multiple``), returns
    per-element losses (``reduction: do_nothing``): training minimises a scalar."""
    for module in loss.modules():
        if isinstance(module, BaseLoss) and module.takes_shared_options and not module.reducer.reduces:
            raise ConfigError(
                f"loss '{module.who}' with reduction '{module.reduction}' returns per-element losses, not "
                "the scalar training minimises; 'do_nothing' is for Python use (pick mean, avg_non_zero, "
                "sum, threshold, per_anchor or class_weighted)"
            )


__all__ = [
    "PAIRS",
    "PAIRS_AND_TRIPLETS",
    "REGISTRY",
    "SIMILARITIES",
    "TRIPLETS",
    "BaseLoss",
    "Batch",
    "ElementIndices",
    "Elements",
    "Loss",
    "LossInputs",
    "MatrixPairLoss",
    "PairLoss",
    "Pairs",
    "TripletLoss",
    "anchor_weights",
    "check_choice",
    "check_positive",
    "check_trainable",
    "masked_logsumexp",
    "reduce",
    "register",
    "sample_weights",
    "without_regularization",
]


@contextlib.contextmanager
def without_regularization(module: nn.Module) -> Iterator[None]:
    """Calls of every dmlkit loss in ``module`` (itself, ``multiple``'s members, a wrapped loss) add no
    regularizer term while active. The objective's cross-batch-memory term uses it: a step's embeddings and
    class vectors are then regularized once, on the batch term, as PML's ``CrossBatchMemory`` (one loss
    call) does, not ``1 + xbm_weight`` times."""
    inner = [m for m in module.modules() if isinstance(m, BaseLoss)]
    before = [m._regularize for m in inner]
    for loss in inner:
        loss._regularize = False
    try:
        yield
    finally:
        for loss, value in zip(inner, before, strict=True):
            loss._regularize = value
