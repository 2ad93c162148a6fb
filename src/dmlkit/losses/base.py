"""Foundations of every loss: the registry, the calling convention, reductions and pair/triplet bases.

A loss is the composition of four orthogonal choices, as in pytorch-metric-learning (PML):

- a **distance** (``euclidean``, ``squared_euclidean``, ``cosine``, ``dot``; see :mod:`dmlkit.distances`),
  applied after L2-normalising the embeddings when ``normalize_embeddings=True`` (PML's default);
- the **tuples** it is computed on: a miner's ``indices_tuple`` or, without one, all valid pairs/triplets;
- a **reduction** of the per-element losses to a scalar (``mean``, ``avg_non_zero``, ``sum``);
- the **loss formula** itself, the only thing a concrete loss writes.

Every loss is called as ``loss(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None,
ref_exclude=None)`` and returns a scalar; ``ref_exclude`` (a boolean ``batch × reference`` mask) names
pairs that are neither positives nor negatives, e.g. an anchor and its own copy in a cross-batch
memory. Class attributes tell the trainer how to use it: :attr:`BaseLoss.tuple_kinds`,
:attr:`BaseLoss.accepts_ref`, :attr:`BaseLoss.needs`; trainable parameters (proxies, class centres)
are ordinary ``nn.Parameter`` attributes, so ``loss.parameters()`` yields them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from dmlkit.distances import check_distance, is_similarity
from dmlkit.errors import ConfigError, UnknownNameError, unknown_name_message
from dmlkit.miners.tuples import (
    PAIRS,
    TRIPLETS,
    TUPLE_KINDS,
    IndicesTuple,
    Pairs,
    Triplets,
    check_batch,
    check_exclude,
    check_indices_tuple,
    distance_matrix,
    drop_excluded,
    label_masks,
    pair_masks,
    same_label_entries,
    to_pairs,
    to_triplets,
    upcast,
)
from dmlkit.registry import Registry

REGISTRY: Registry[nn.Module] = Registry("loss")

PAIRS_AND_TRIPLETS: frozenset[str] = TUPLE_KINDS


def register(name: str) -> Callable[[type[BaseLoss]], type[BaseLoss]]:
    """Class decorator: register a loss under ``name`` and record the name on the class."""

    def decorator(cls: type[BaseLoss]) -> type[BaseLoss]:
        cls.registry_name = name
        REGISTRY.register(name)(cls)
        return cls

    return decorator


# ---------------------------------------------------------------------------------------------- reductions


def _mean(losses: torch.Tensor) -> torch.Tensor:
    # An empty selection is a zero loss (PML returns its "zero loss" before reducing), not NaN.
    return losses.mean() if losses.numel() > 0 else losses.sum()


def _avg_non_zero(losses: torch.Tensor) -> torch.Tensor:
    # PML's AvgNonZeroReducer is mean(losses[losses > 0]); the masked sum avoids a data-dependent shape
    # (a device sync) and gives exactly the same gradient: 1/count on kept elements, 0 elsewhere.
    keep = losses > 0
    return torch.where(keep, losses, torch.zeros_like(losses)).sum() / keep.sum().clamp_min(1)


def _sum(losses: torch.Tensor) -> torch.Tensor:
    return losses.sum()


REDUCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mean": _mean,
    "avg_non_zero": _avg_non_zero,
    "sum": _sum,
}


def reduce(losses: torch.Tensor, how: str) -> torch.Tensor:
    """Reduce per-element losses to a scalar; an empty tensor reduces to 0.

    - ``mean``: ``Σ lᵢ / N`` (PML ``MeanReducer``)
    - ``avg_non_zero``: ``Σ lᵢ / #{lᵢ > 0}``, 0 if none is positive (PML ``AvgNonZeroReducer``)
    - ``sum``: ``Σ lᵢ`` (PML ``SumReducer``)
    """
    try:
        fn = REDUCTIONS[how]
    except KeyError:
        raise UnknownNameError(unknown_name_message("reduction", how, REDUCTIONS)) from None
    return fn(losses)


def farther_by(x: torch.Tensor | float, y: torch.Tensor | float, similarity: bool) -> Any:
    """How much farther ``x`` is than ``y``: ``x − y`` for a distance, ``y − x`` for a similarity.

    PML's ``BaseDistance.margin``; it lets one formula serve distances and similarities.
    """
    return y - x if similarity else x - y


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


# ------------------------------------------------------------------------------------------ fused distance

_NORM_EPS = 1e-12  # F.normalize's eps


def _unit_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.normalize(x, dim=1)`` (same arithmetic, same bits) and the clamped norms it divided by."""
    denom = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(_NORM_EPS)
    return x / denom, denom


def _unit_rows_backward(
    grad: torch.Tensor, unit: torch.Tensor, denom: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """Gradient through ``F.normalize`` of ``scale · grad``: ``scale (g − x̂ ⟨x̂, g⟩) / ‖x‖``, or
    ``scale · g / eps`` where the norm was clamped."""
    dot = (unit * grad).sum(1, keepdim=True).masked_fill_(denom <= _NORM_EPS, 0.0)
    factor = denom.reciprocal() if scale == 1.0 else scale / denom
    return grad.addcmul(unit, dot, value=-1.0).mul_(factor)


class _DistanceMatrix(torch.autograd.Function):
    """The ``B × R`` matrix of :func:`dmlkit.miners.tuples.distance_matrix` with a fused backward pass.

    Same forward arithmetic (L2 normalisation as ``F.normalize``, ``‖x‖² + ‖y‖² − 2⟨x, y⟩`` clamped at 0,
    square root whose gradient is 0 at 0; for ``dot``, optionally times ``scale``, folded into the
    product), but the backward pass is written in closed form: one matrix product for a batch-vs-batch
    matrix (``(A + Aᵀ) x``) instead of autograd's two, and no chain of temporaries through the
    normalisation, the norms, the clamp and the square root. First-order only.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, ref: torch.Tensor | None, kind: str, normalize: bool, scale: float
    ) -> torch.Tensor:
        gram = ref is None
        xn, x_denom = _unit_rows(x) if normalize else (x, None)
        if gram:
            yn, y_denom = xn, x_denom
        else:
            yn, y_denom = _unit_rows(ref) if normalize else (ref, None)  # type: ignore[arg-type]
        if kind == "dot":
            mat = xn @ yn.T if scale == 1.0 else torch.addmm(xn.new_zeros(()), xn, yn.T, beta=0, alpha=scale)
        else:
            x_sq = xn.pow(2).sum(1)
            y_sq = x_sq if gram else yn.pow(2).sum(1)
            mat = torch.addmm(x_sq.unsqueeze(1) + y_sq.unsqueeze(0), xn, yn.T, alpha=-2.0).clamp_min_(0.0)
            if kind == "euclidean":
                mat.sqrt_()
        ctx.kind, ctx.gram, ctx.normalize, ctx.scale = kind, gram, normalize, scale
        ctx.save_for_backward(xn, yn, x_denom, y_denom, None if kind == "dot" else mat)
        return mat

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xn, yn, x_denom, y_denom, mat = ctx.saved_tensors
        need_x, need_ref = ctx.needs_input_grad[0], ctx.needs_input_grad[1] and not ctx.gram
        if ctx.kind == "dot":
            # mat = scale·⟨x, y⟩
            coef, norm_coef, mat_grad = ctx.scale, 0.0, grad
        else:
            # ∂/∂(squared distance) up to the factor `half` (d√s/ds = 1/(2√s)): the clamp and √· pass
            # nothing where the distance is 0. squared distance = ‖x‖² + ‖y‖² − 2⟨x, y⟩.
            half = 0.5 if ctx.kind == "euclidean" else 1.0
            mat_grad = grad.div(mat) if ctx.kind == "euclidean" else grad.clone()
            mat_grad.masked_fill_(mat == 0, 0.0)
            coef, norm_coef = -2.0 * half, 2.0 * half
        # grad_x = coef·A y + norm_coef·x ⊙ rowsum(A) (A + Aᵀ and x for the batch against itself); on unit
        # rows the ‖·‖² term is parallel to the rows and vanishes through the normalisation: left out
        norm_terms = norm_coef != 0.0 and not ctx.normalize
        if ctx.gram:
            mat_grad = mat_grad + mat_grad.T
        grads: list[torch.Tensor | None] = [None, None]
        for i, (needed, rows, other, other_grad, denom) in enumerate(
            [(need_x, xn, yn, mat_grad, x_denom), (need_ref, yn, xn, mat_grad.T, y_denom)]
        ):
            if not needed:
                continue
            if ctx.normalize:
                grads[i] = _unit_rows_backward(other_grad @ other, rows, denom, coef)
            elif norm_terms:
                grads[i] = torch.addmm(
                    rows * (norm_coef * other_grad.sum(1, keepdim=True)), other_grad, other, alpha=coef
                )
            else:
                grads[i] = torch.addmm(rows.new_zeros(()), other_grad, other, beta=0, alpha=coef)
        return grads[0], grads[1], None, None, None


def fused_distance_matrix(
    embeddings: torch.Tensor,
    ref_emb: torch.Tensor | None,
    distance: str,
    normalize_embeddings: bool,
    scale: float = 1.0,
) -> torch.Tensor:
    """:func:`dmlkit.miners.tuples.distance_matrix` (same values) with a fused, first-order backward pass;
    ``scale`` (similarities only) multiplies the matrix inside the product.

    Falls back to autograd for mixed dtypes. Inputs are expected upcast already (the loss calling
    convention does it).
    """
    check_distance(distance)
    kind = "dot" if distance in ("cosine", "dot") else distance
    if scale != 1.0 and kind != "dot":
        raise ValueError("fused_distance_matrix: scale applies to similarities only")
    if ref_emb is not None and ref_emb.dtype != embeddings.dtype:
        return distance_matrix(embeddings, ref_emb, distance, normalize_embeddings) * scale
    normalize = normalize_embeddings or distance == "cosine"
    return _DistanceMatrix.apply(embeddings, ref_emb, kind, normalize, scale)  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------------- base class


class BaseLoss(nn.Module):
    """Common calling convention, validation, distance handling, reduction and statistics.

    Subclasses set the class attributes below and implement :meth:`compute_loss`. Their ``__init__``
    lists every keyword explicitly (no ``**kwargs``) so a misspelt option is caught by the registry.
    """

    #: Kinds of miner output the loss consumes, conversions included (``{"pairs", "triplets"}`` for PML
    #: pair and triplet losses, which convert one into the other). Empty: the loss takes no miner.
    tuple_kinds: ClassVar[frozenset[str]] = frozenset()
    #: Whether ``ref_emb``/``ref_labels`` (e.g. a cross-batch memory) may be passed. False for proxy and
    #: classification losses.
    accepts_ref: ClassVar[bool] = True
    #: Constructor arguments the trainer must supply: a subset of ``{"num_classes", "embedding_size"}``.
    needs: ClassVar[frozenset[str]] = frozenset()
    #: Registry name, set by :func:`register`.
    registry_name: ClassVar[str] = ""

    def __init__(
        self, distance: str | None = None, normalize_embeddings: bool = True, reduction: str = "mean"
    ) -> None:
        super().__init__()
        if distance is not None:
            check_distance(distance)
        if reduction not in REDUCTIONS:
            raise UnknownNameError(unknown_name_message("reduction", reduction, REDUCTIONS))
        self.distance = distance
        self.normalize_embeddings = bool(normalize_embeddings)
        self.reduction = reduction
        self._stats: dict[str, torch.Tensor | float] = {}
        # The current call's ref_exclude, read by the mask helpers below; reset after every call.
        self._exclude: torch.Tensor | None = None

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
        name = self.registry_name or type(self).__name__
        embeddings, labels, ref_emb, ref_labels = check_batch(embeddings, labels, ref_emb, ref_labels, name)
        if ref_emb is not None and not self.accepts_ref:
            raise ConfigError(f"loss '{name}' does not accept ref_emb/ref_labels")
        if indices_tuple is not None:
            kind = check_indices_tuple(indices_tuple)
            if kind not in self.tuple_kinds:
                takes = " or ".join(sorted(self.tuple_kinds)) or "no miner output"
                raise ConfigError(f"loss '{name}' cannot use an indices_tuple of {kind}; it takes {takes}")
        if ref_exclude is not None:
            if ref_emb is None:
                raise ConfigError(f"loss '{name}': ref_exclude needs ref_emb/ref_labels")
            check_exclude(ref_exclude, len(embeddings), len(ref_emb), name)
            ref_exclude = ref_exclude.to(embeddings.device)
            if indices_tuple is not None:
                indices_tuple = drop_excluded(indices_tuple, ref_exclude)
        self._stats = {}
        self._exclude = ref_exclude
        try:
            with torch.autocast(device_type=embeddings.device.type, enabled=False):
                return self.compute_loss(
                    upcast(embeddings),
                    labels,
                    indices_tuple,
                    None if ref_emb is None else upcast(ref_emb),
                    ref_labels,
                )
        finally:
            self._exclude = None

    def compute_loss(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: IndicesTuple | None,
        ref_emb: torch.Tensor | None,
        ref_labels: torch.Tensor | None,
    ) -> torch.Tensor:
        """The loss proper. ``ref_emb``/``ref_labels`` are None when the reference set is the batch."""
        raise NotImplementedError

    # -- helpers for subclasses --------------------------------------------------------------------------
    # The tuple helpers below apply the current call's ``ref_exclude``; losses use them rather than the
    # module functions of :mod:`dmlkit.miners.tuples` so that every loss honours it.

    def label_masks(
        self, labels: torch.Tensor, ref_labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`dmlkit.miners.tuples.label_masks` without the excluded pairs."""
        return label_masks(labels, ref_labels, self._exclude)

    def to_pairs(
        self, indices_tuple: IndicesTuple | None, labels: torch.Tensor, ref_labels: torch.Tensor | None
    ) -> Pairs:
        """:func:`dmlkit.miners.tuples.to_pairs` without the excluded pairs."""
        return to_pairs(indices_tuple, labels, ref_labels, self._exclude)

    def to_triplets(
        self,
        indices_tuple: IndicesTuple | None,
        labels: torch.Tensor,
        ref_labels: torch.Tensor | None,
        per_anchor: int | Literal["all"] = "all",
    ) -> Triplets:
        """:func:`dmlkit.miners.tuples.to_triplets` without the excluded pairs."""
        return to_triplets(indices_tuple, labels, ref_labels, per_anchor, self._exclude)

    def same_label_entries(
        self, labels: torch.Tensor, ref_labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rows, cols, is_pos)``: every same-label entry of the ``batch × reference`` matrix in row-major
        order (:func:`dmlkit.miners.tuples.same_label_entries`), and whether it is a positive pair (not
        the diagonal of the batch against itself, not excluded). Entries not listed are negative pairs
        unless excluded (see :attr:`excluded`)."""
        rows, cols = same_label_entries(labels, ref_labels)
        is_pos = rows != cols if ref_labels is None else torch.ones_like(rows, dtype=torch.bool)
        if self._exclude is not None:
            is_pos &= ~self._exclude[rows, cols]
        return rows, cols, is_pos

    @property
    def excluded(self) -> torch.Tensor | None:
        """The current call's ``ref_exclude`` mask (None outside a call or when not given)."""
        return self._exclude

    @property
    def is_similarity(self) -> bool:
        """True when the loss's distance grows with similarity (``cosine``, ``dot``)."""
        return self.distance is not None and is_similarity(self.distance)

    def distance_matrix(self, embeddings: torch.Tensor, ref_emb: torch.Tensor | None) -> torch.Tensor:
        """``embeddings × ref`` matrix of the loss's distance (normalised first if configured)."""
        if self.distance is None:
            raise NotImplementedError(f"{type(self).__name__} has no distance")
        return distance_matrix(embeddings, ref_emb, self.distance, self.normalize_embeddings)

    def fused_distance_matrix(self, embeddings: torch.Tensor, ref_emb: torch.Tensor | None) -> torch.Tensor:
        """:meth:`distance_matrix` with a fused first-order backward pass (:func:`fused_distance_matrix`)."""
        if self.distance is None:
            raise NotImplementedError(f"{type(self).__name__} has no distance")
        return fused_distance_matrix(embeddings, ref_emb, self.distance, self.normalize_embeddings)

    def reduce(self, losses: torch.Tensor) -> torch.Tensor:
        """Reduce with the configured ``reduction``."""
        return reduce(losses, self.reduction)

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
        return f"distance={self.distance!r}, normalize_embeddings={self.normalize_embeddings}, " + (
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

    def compute_loss(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: IndicesTuple | None,
        ref_emb: torch.Tensor | None,
        ref_labels: torch.Tensor | None,
    ) -> torch.Tensor:
        a1, p, a2, n = self.to_pairs(indices_tuple, labels, ref_labels)
        mat = self.distance_matrix(embeddings, ref_emb)
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

    def masks(
        self,
        indices_tuple: IndicesTuple | None,
        labels: torch.Tensor,
        ref_labels: torch.Tensor | None,
        mat: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks from labels (no miner) or from the mined pairs."""
        if indices_tuple is None:
            return self.label_masks(labels, ref_labels)
        return pair_masks(self.to_pairs(indices_tuple, labels, ref_labels), tuple(mat.shape), mat.device)

    def compute_loss(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: IndicesTuple | None,
        ref_emb: torch.Tensor | None,
        ref_labels: torch.Tensor | None,
    ) -> torch.Tensor:
        mat = self.distance_matrix(embeddings, ref_emb)
        pos_mask, neg_mask = self.masks(indices_tuple, labels, ref_labels, mat)
        self.record(num_pos_pairs=pos_mask.sum(), num_neg_pairs=neg_mask.sum())
        return self.reduce(self.matrix_loss(mat, pos_mask, neg_mask))


class TripletLoss(BaseLoss):
    """A loss on ``(anchor, positive, negative)`` triplets.

    Without a miner: all triplets, or ``triplets_per_anchor`` random ones per anchor; mined pairs are
    joined on their anchor into triplets (PML ``convert_to_triplets``).

    Statistics: ``num_triplets``, ``num_active_triplets`` (non-zero loss).
    """

    tuple_kinds = PAIRS_AND_TRIPLETS

    def __init__(
        self,
        distance: str | None = None,
        normalize_embeddings: bool = True,
        reduction: str = "mean",
        triplets_per_anchor: int | Literal["all"] = "all",
    ) -> None:
        super().__init__(distance, normalize_embeddings, reduction)
        if triplets_per_anchor != "all" and not (
            isinstance(triplets_per_anchor, int)
            and not isinstance(triplets_per_anchor, bool)
            and triplets_per_anchor > 0
        ):
            raise ConfigError(
                f"triplets_per_anchor must be 'all' or a positive int, got {triplets_per_anchor!r}"
            )
        self.triplets_per_anchor = triplets_per_anchor

    def triplets(
        self, indices_tuple: IndicesTuple | None, labels: torch.Tensor, ref_labels: torch.Tensor | None
    ) -> Triplets:
        return self.to_triplets(indices_tuple, labels, ref_labels, self.triplets_per_anchor)


__all__ = [
    "PAIRS",
    "PAIRS_AND_TRIPLETS",
    "REDUCTIONS",
    "REGISTRY",
    "TRIPLETS",
    "BaseLoss",
    "MatrixPairLoss",
    "PairLoss",
    "Pairs",
    "TripletLoss",
    "farther_by",
    "masked_logsumexp",
    "reduce",
    "register",
]
