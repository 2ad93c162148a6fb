"""Pair- and triplet-based losses, each one formula over the bases of :mod:`dmlkit.losses.base`.

Shared structure: a loss gets the ``query × reference`` matrix of its distance once and works on it with
masks (no miner), with pair *count* matrices (mined pairs: a pair mined twice counts twice, as in PML's
pair-based losses) or with gathered entries (mined triplets). Nothing loops over anchors or pairs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from dmlkit.distances import Distance
from dmlkit.errors import ConfigError
from dmlkit.losses import regularizers
from dmlkit.losses.base import (
    PAIRS_AND_TRIPLETS,
    REGISTRY,
    BaseLoss,
    Batch,
    MatrixPairLoss,
    PairLoss,
    TripletLoss,
    check_choice,
    masked_logsumexp,
    register,
)
from dmlkit.losses.reducers import Reducer
from dmlkit.tuples import TRIPLETS, Pairs, Triplets, pair_counts, tuple_kind


@register("contrastive")
class ContrastiveLoss(PairLoss):
    """Contrastive loss (Hadsell, Chopra & LeCun, CVPR 2006; PML ``ContrastiveLoss``).

    For a distance ``d``: ``L⁺ = [d − m⁺]₊`` on positive pairs and ``L⁻ = [m⁻ − d]₊`` on negative pairs;
    for a similarity ``s``: ``[m⁺ − s]₊`` and ``[s − m⁻]₊``. Each set is reduced (``avg_non_zero`` by
    default) and the two are summed.
    """

    defaults: ClassVar[dict[str, Any]] = {"distance": "euclidean", "reduction": "avg_non_zero"}

    def configure(self, pos_margin: float = 0.0, neg_margin: float = 1.0) -> None:
        self.pos_margin = float(pos_margin)
        self.neg_margin = float(neg_margin)

    def pair_losses(self, pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        farther = self.distance.margin
        return F.relu(farther(pos, self.pos_margin)), F.relu(farther(self.neg_margin, neg))

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        if batch.indices_tuple is not None or not self.reducer.fusable:
            # mined pairs: gathered values (a pair mined twice counts twice); a reduction that is no sum
            # divided by a count needs the per-pair losses
            return super().compute_loss(batch)
        # All pairs: the negative pairs are every entry of the matrix but the same-label ones, which are
        # few (found from sorted labels): dense passes for the negatives, gathers for the rest.
        mat = self.matrix(batch)
        rows, cols, is_pos = batch.same_label_entries()
        num_neg = rows.new_full((), mat.numel() - rows.numel())  # (a fill: no host-to-device copy)
        if batch.exclude is not None:
            num_neg -= batch.exclude.sum() - batch.exclude[rows, cols].sum()
        counts = torch.stack([is_pos.sum(), num_neg])
        loss, active = _AllPairsHinge.apply(
            mat,
            rows,
            cols,
            is_pos,
            batch.exclude,
            self.distance,
            (self.pos_margin, self.neg_margin),
            counts,
            self.reducer,
        )
        self.record(
            num_pos_pairs=counts[0],
            num_neg_pairs=counts[1],
            num_active_pos_pairs=active[0],
            num_active_neg_pairs=active[1],
        )
        return loss  # type: ignore[no-any-return]

    def extra_repr(self) -> str:
        return f"pos_margin={self.pos_margin}, neg_margin={self.neg_margin}, " + super().extra_repr()


class _AllPairsHinge(torch.autograd.Function):
    """Contrastive loss over all pairs of a ``B × R`` matrix ``m``, fused: ``reduce [margin(m, m⁺)]₊`` over
    the positive pairs plus ``reduce [margin(m⁻, m)]₊`` over the negative ones (``margin``: the distance's
    :meth:`~dmlkit.distances.Distance.margin`).

    ``(rows, cols)``: the same-label entries (:meth:`~dmlkit.tuples.Batch.same_label_entries`), positives
    where ``is_pos``; every other entry is a negative pair unless ``excluded`` (a boolean mask or None).
    ``counts``: the numbers of positive and negative pairs (int64, shape 2). The reducer divides each sum by
    its :meth:`~dmlkit.losses.reducers.Reducer.divisor`. The gradient of ``m`` is ``±1/divisor`` on the
    active pairs: two dense passes in the backward instead of autograd's chain of gathers, masks and
    reductions. Also returns the int64 numbers of active positive and negative pairs.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        mat: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
        is_pos: torch.Tensor,
        excluded: torch.Tensor | None,
        distance: Distance,
        margins: tuple[float, float],
        counts: torch.Tensor,
        reducer: Reducer,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pos_h = distance.margin(mat[rows, cols], margins[0]).clamp_min_(0.0)
        pos_h.masked_fill_(~is_pos, 0.0)  # self pairs and excluded pairs are no positives
        neg_h = distance.margin(margins[1], mat)
        neg_h[rows, cols] = 0.0  # same-label pairs are no negatives
        if excluded is not None:
            neg_h.masked_fill_(excluded, 0.0)
        neg_h.clamp_min_(0.0)
        active = torch.stack([torch.count_nonzero(pos_h), torch.count_nonzero(neg_h)])
        sums = torch.stack([pos_h.sum(), neg_h.sum()])
        divisors = reducer.divisor(counts, active).clamp_min(1).to(mat.dtype)
        loss = sums.div_(divisors).sum()
        ctx.save_for_backward(rows, cols, pos_h, neg_h, divisors)
        ctx.sim = distance.is_similarity
        ctx.mark_non_differentiable(active)
        return loss, active

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor, _: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        rows, cols, pos_h, neg_h, divisors = ctx.saved_tensors
        # ∂/∂m of margin(m, m⁺) is +1 for a distance, −1 for a similarity; of margin(m⁻, m) the opposite
        step = (-grad if ctx.sim else grad) / divisors
        zero = step.new_zeros(())
        grad_mat = torch.where(neg_h > 0, -step[1], zero)
        grad_mat[rows, cols] = torch.where(pos_h > 0, step[0], zero)
        return grad_mat, None, None, None, None, None, None, None, None


@register("triplet")
class TripletMarginLoss(TripletLoss):
    """Triplet margin loss (Weinberger & Saul, JMLR 2009; Schroff et al., FaceNet, CVPR 2015; PML
    ``TripletMarginLoss``).

    ``L = [d(a,p) − d(a,n) + margin]₊`` (``softplus`` instead of ``[·]₊`` when ``smooth_loss``; similarities
    enter as ``s(a,n) − s(a,p)``). With ``swap`` (Balntas et al., BMVC 2016) ``d(a,n)`` is replaced by the
    smaller of ``d(a,n)`` and ``d(p,n)``. Reduced with ``avg_non_zero`` by default.
    """

    defaults: ClassVar[dict[str, Any]] = {"distance": "euclidean", "reduction": "avg_non_zero"}
    triplet_margin: ClassVar[str | None] = "margin"

    def configure(self, margin: float = 0.05, swap: bool = False, smooth_loss: bool = False) -> None:
        self.margin = float(margin)
        self.swap = bool(swap)
        self.smooth_loss = bool(smooth_loss)

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        mat = self.matrix(batch)
        sim = self.is_similarity
        plain = not self.swap and not self.smooth_loss and self.reducer.fusable
        if plain and batch.indices_tuple is None and self.triplets_per_anchor == "all":
            # every triplet, never listed: hinge sums from each anchor's positives and negatives
            rows, cols, is_pos = batch.same_label_entries()
            c, x, num_triplets = _anchor_hinge_operands(
                mat, rows, cols, is_pos, batch.exclude, sim, self.margin
            )
            loss, active = _AllTripletsHinge.apply(c, x, num_triplets, self.reducer)
            self.record(num_triplets=num_triplets, num_active_triplets=active)
            return loss  # type: ignore[no-any-return]
        a, p, n = self.triplets(batch)
        if plain:
            loss, active = _ListedTripletsHinge.apply(mat, a, p, n, sim, self.margin, self.reducer)
            self.record(num_triplets=a.numel(), num_active_triplets=active)
            return loss  # type: ignore[no-any-return]
        ap, an = mat[a, p], mat[a, n]
        if self.swap:
            # p and n index the reference set, so d(p, n) is a reference-to-reference distance; PML
            # reads mat[p, n], which is only right when the reference set is the batch.
            pn = _between_references(self.distance, batch, mat, p, n)
            an = torch.maximum(an, pn) if sim else torch.minimum(an, pn)
        violation = self.distance.margin(ap, an) + self.margin
        losses = F.softplus(violation) if self.smooth_loss else F.relu(violation)
        self.record(num_triplets=a.numel(), num_active_triplets=torch.count_nonzero(losses))
        return self.reduce(losses, (a, p, n))


def _between_references(
    distance: Distance, batch: Batch, mat: torch.Tensor, i: torch.Tensor, j: torch.Tensor
) -> torch.Tensor:
    """``d(ref[i], ref[j])`` for reference items ``i``, ``j``: read from ``mat`` (the ``batch × reference``
    matrix) when the reference set is the batch, else computed pair by pair."""
    if batch.ref_emb is None:
        return mat[i, j]
    return distance.paired(batch.ref_emb[i], batch.ref_emb[j])


def _hinge_divisor(reducer: Reducer, active: torch.Tensor, count: int, like: torch.Tensor) -> torch.Tensor:
    """Divisor of a sum of ``count`` hinge terms, ``active`` of them non-zero (≥ 1, in ``like``'s dtype)."""
    # new_full fills on the device: a tensor made from a Python number would be a synchronising copy
    return reducer.divisor(active.new_full((), count), active).clamp_min(1).to(like.dtype)


class _ListedTripletsHinge(torch.autograd.Function):
    """``reduce [margin(m[a,p], m[a,n]) + margin]₊`` over listed triplets (``margin(x, y)``: ``x − y`` for a
    distance, ``y − x`` for a similarity), fused.

    The two values of a triplet are read from the flattened matrix; the backward pass adds ``±1/divisor``
    of the active triplets into a zero matrix with two ``index_add_`` (no autograd chain of advanced
    indexing, masks and reductions). Also returns the number of active triplets (int64).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        mat: torch.Tensor,
        a: torch.Tensor,
        p: torch.Tensor,
        n: torch.Tensor,
        sim: bool,
        margin: float,
        reducer: Reducer,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        flat = mat.reshape(-1)
        row = a * mat.shape[1]
        at_p, at_n = row + p, row + n
        ap, an = flat.index_select(0, at_p), flat.index_select(0, at_n)
        hinge = (an - ap if sim else ap - an).add_(margin).clamp_min_(0.0)
        active = torch.count_nonzero(hinge)
        divisor = _hinge_divisor(reducer, active, a.numel(), mat)
        loss = hinge.sum() / divisor
        ctx.save_for_backward(at_p, at_n, hinge, divisor)
        ctx.sim, ctx.shape = sim, mat.shape
        ctx.mark_non_differentiable(active)
        return loss, active

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor, _: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        at_p, at_n, hinge, divisor = ctx.saved_tensors
        step = grad / divisor
        # ∂/∂m[a,p] = +1 and ∂/∂m[a,n] = −1 for a distance (the opposite for a similarity)
        weights = (hinge > 0).to(hinge.dtype).mul_(-step if ctx.sim else step)
        grad_flat = hinge.new_zeros(ctx.shape[0] * ctx.shape[1])
        grad_flat.index_add_(0, at_p, weights).index_add_(0, at_n, weights, alpha=-1)
        return grad_flat.view(ctx.shape), None, None, None, None, None, None


def _anchor_hinge_operands(
    mat: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    is_pos: torch.Tensor,
    excluded: torch.Tensor | None,
    sim: bool,
    margin: float,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Operands of the all-triplets hinge ``[c[a,k] − x[a,n]]₊`` (differentiable in ``mat``) and the number
    of triplets.

    ``(rows, cols, is_pos)``: the same-label entries and which of them are positives
    (:meth:`~dmlkit.tuples.Batch.same_label_entries`); ``excluded``: pairs that are no negatives
    either. ``c`` (``B × P``, P the most positives of an anchor): ``m[a,p] + margin`` (``margin − s[a,p]``
    for a similarity) for each positive, ``−inf`` padding; ``x`` (``B × R``): ``m[a,n]`` (``−s[a,n]``) for
    each negative, ``+inf`` for same-label and excluded entries. Then ``c − x`` is the triplet's violation
    and padding never counts.
    """
    num_rows = mat.shape[0]
    p_rows, p_cols = rows[is_pos], cols[is_pos]
    pos_per_row = torch.bincount(p_rows, minlength=num_rows)
    not_neg = torch.bincount(rows, minlength=num_rows)
    if excluded is not None:
        not_neg = not_neg + excluded.sum(1) - torch.bincount(rows[excluded[rows, cols]], minlength=num_rows)
    neg_per_row = mat.shape[1] - not_neg
    num_triplets = int((pos_per_row * neg_per_row).sum())
    slot = (
        torch.arange(p_rows.numel(), device=mat.device) - (torch.cumsum(pos_per_row, 0) - pos_per_row)[p_rows]
    )
    width = int(pos_per_row.max()) if num_rows else 0
    pos = mat[p_rows, p_cols]
    c = mat.new_full((num_rows, width), -torch.inf).index_put(
        (p_rows, slot), margin - pos if sim else pos + margin
    )
    x = (-mat if sim else mat).index_put((rows, cols), mat.new_tensor(torch.inf))
    if excluded is not None:
        x = x.masked_fill(excluded, torch.inf)
    return c, x, num_triplets


# Above this many (anchor, positive, reference) combinations, _AllTripletsHinge counts with a binary search.
_DENSE_TRIPLETS = 1 << 22


class _AllTripletsHinge(torch.autograd.Function):
    """``reduce_{a,k,n} [c[a,k] − x[a,n]]₊`` over every combination (``B × P × R`` hinge terms), fused.

    The gradient needs only how many active terms each ``c[a,k]`` and each ``x[a,n]`` is in (its value
    is ``±count/divisor``), so the forward pass keeps those counts instead of any ``B × P × R`` tensor:
    up to :data:`_DENSE_TRIPLETS` terms they come from the dense hinge tensor; above, from each anchor's
    sorted ``c`` (a batched binary search of every ``x``, a histogram of the results, a cumulative sum),
    and the hinge sum is ``Σ c·count_c − Σ x·count_x`` accumulated in float64. Returns the reduced loss
    and the number of active terms. ``num_triplets`` (the finite terms) divides for ``mean``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, c: torch.Tensor, x: torch.Tensor, num_triplets: int, reducer: Reducer
    ) -> tuple[torch.Tensor, torch.Tensor]:
        num_rows, width = c.shape
        if num_rows * width * x.shape[1] <= _DENSE_TRIPLETS:
            hinge = (c.unsqueeze(2) - x.unsqueeze(1)).clamp_min_(0.0)
            total = hinge.sum()
            act = hinge > 0
            count_c, count_x = torch.count_nonzero(act, dim=2), torch.count_nonzero(act, dim=1)
        else:
            c_sorted, order = torch.sort(c, dim=1)
            # k = #{c ≤ x}: x is in the active terms of the sorted c[k:], c[j] in those of the x with k ≤ j
            k = torch.searchsorted(c_sorted, x.contiguous(), right=True)
            count_x = width - k
            hist = torch.zeros(num_rows, width + 1, dtype=torch.long, device=c.device)
            hist.scatter_add_(1, k, torch.ones_like(k))
            count_c = torch.empty_like(order).scatter_(1, order, torch.cumsum(hist[:, :width], 1))
            acc = torch.float64 if c.dtype in (torch.float32, torch.float16, torch.bfloat16) else c.dtype
            c_sum = (torch.where(count_c > 0, c, 0.0).to(acc) * count_c).sum()
            x_sum = (torch.where(count_x > 0, x, 0.0).to(acc) * count_x).sum()
            total = (c_sum - x_sum).to(c.dtype)
        active = count_c.sum()
        divisor = _hinge_divisor(reducer, active, num_triplets, c)
        ctx.save_for_backward(count_c, count_x, divisor)
        ctx.mark_non_differentiable(active)
        return total / divisor, active

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor, _: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        count_c, count_x, divisor = ctx.saved_tensors
        step = grad / divisor
        return count_c * step, count_x * -step, None, None


# ---------------------------------------------------------------------------------------------- helpers


def _pair_weights(
    batch: Batch, mat: torch.Tensor, pairs: Pairs | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive/negative pair multiplicities over ``mat``'s entries: the boolean label masks without a miner
    (excluded pairs are neither), how often the mined pairs (``pairs``, if already converted) list each."""
    if batch.indices_tuple is None:
        return batch.label_masks()
    return pair_counts(batch.to_pairs() if pairs is None else pairs, tuple(mat.shape), mat.device)  # type: ignore[arg-type]


def _times(weights: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """``weights`` where ``cond`` holds, else 0 (a logical and for boolean weights)."""
    return weights & cond if weights.dtype == torch.bool else weights * cond


def _log_weighted_lse(values: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise ``log Σ_j w_ij exp(v_ij)`` (w = multiplicities) and whether the row has any weight.

    Rows without weight give 0 (PML's masked ``logsumexp``); the caller decides what they mean.
    """
    mask = weights > 0 if weights.dtype != torch.bool else weights
    if weights.dtype != torch.bool:
        # a pair mined k times is k equal terms of the sum: log(k) shifts its exponent
        values = values + torch.log(weights.clamp_min(1).to(values.dtype))
    return masked_logsumexp(values, mask, add_one=False), mask.any(dim=1)


def _mean_hinge_over_fourth(
    c: torch.Tensor,
    rows: torch.Tensor,
    row_of: torch.Tensor,
    row_labels: torch.Tensor,
    anchor_labels: torch.Tensor,
    ref_labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean_k [c_t − y_{r(t),k}]₊`` over reference items ``k`` labelled neither ``anchor_labels[t]`` nor
    ``row_labels[r(t)]``, with ``r = row_of``; also whether such items exist. ``rows``: (U, R).

    No ``T × R`` tensor: each row's items of other labels are sorted once, so those below ``c_t`` form a
    prefix found by a batched binary search (their hinge sum is ``c_t·m − prefix_sum_m``); the anchor's
    class, usually a handful of items, is then subtracted explicitly. Counts of active terms are exact
    integers, so a term is 0 exactly when no valid item is below ``c_t``.
    """
    num, (num_rows, num_ref) = c.numel(), rows.shape
    device = c.device
    other = ref_labels.unsqueeze(0) != row_labels.unsqueeze(1)  # (U, R): not the row's own class
    y_sorted, order = torch.sort(rows.masked_fill(~other, torch.inf), dim=1)  # masked ones sort last
    prefix = F.pad(torch.cumsum(torch.where(other.gather(1, order), y_sorted, 0.0), dim=1), (1, 0))
    # batched binary search: the thresholds grouped by row into a (U, width) matrix padded with −inf
    perm = torch.argsort(row_of, stable=True)
    counts = torch.bincount(row_of, minlength=num_rows)
    slot = torch.arange(num, device=device) - (torch.cumsum(counts, 0) - counts)[row_of[perm]]
    queries = torch.full(
        (num_rows, int(counts.max()) if num else 0), -torch.inf, dtype=c.dtype, device=device
    )
    queries[row_of[perm], slot] = c.detach()[perm]
    below_grouped = torch.searchsorted(y_sorted.detach().contiguous(), queries)  # #{y < c}
    below = torch.empty_like(row_of)
    below[perm] = below_grouped[row_of[perm], slot]
    total = c * below - prefix[row_of, below]
    # the anchor's class members in the reference set (a padded (T, S) gather), then subtracted
    sorted_l, by_label = torch.sort(ref_labels, stable=True)
    start = torch.searchsorted(sorted_l, anchor_labels)
    size = torch.searchsorted(sorted_l, anchor_labels, right=True) - start
    size = torch.where(anchor_labels == row_labels[row_of], 0, size)  # already excluded with the row's
    offsets = torch.arange(int(size.max()) if num else 0, device=device)
    member = offsets.unsqueeze(0) < size.unsqueeze(1)
    members = by_label[(start.unsqueeze(1) + offsets).clamp_max(num_ref - 1)]
    y_members = rows[row_of.unsqueeze(1), members]
    hinge_members = torch.where(member, F.relu(c.unsqueeze(1) - y_members), 0.0)
    active = below - (member & (y_members < c.unsqueeze(1))).sum(1)
    total = total - hinge_members.sum(1)
    valid_count = other.sum(1)[row_of] - size
    mean = torch.where(active > 0, total / valid_count.clamp_min(1), 0.0)
    return mean, valid_count > 0


# ---------------------------------------------------------------------------------------------- margin


@register("margin")
class MarginLoss(TripletLoss):
    """Margin loss (Wu, Manmatha, Smola & Krähenbühl, "Sampling Matters in Deep Embedding Learning",
    ICCV 2017; PML ``MarginLoss``).

    Each triplet ``(a, p, n)`` contributes two hinge terms around a boundary ``β``::

        ℓ⁺ = [d(a,p) − β + margin]₊        ℓ⁻ = [β − d(a,n) + margin]₊

    (similarities enter as ``β − s(a,p)`` and ``s(a,n) − β``). ``β`` is one value, or one per class
    (``num_classes``, indexed by the anchor's label); with ``learn_beta`` it is an ``nn.Parameter`` and
    ``ν·β`` is added (Eq. 5 of the paper): ``ν·β`` for a global ``β``, ``ν·Σ_t β_{y(a_t)}`` divided like
    the hinge terms for per-class ``β``.

    Reduction: the elements are the ``2T`` hinge terms of the ``T`` triplets. ``avg_non_zero`` (default)
    is ``Σ(ℓ⁺ + ℓ⁻) / #{non-zero terms}``, exactly PML's ``DivisorReducer``; ``mean`` divides by ``2T``
    and ``sum`` by 1. No triplet: 0.

    Without a miner and with ``triplets_per_anchor="all"`` (or with mined pairs) the triplets are never
    listed: ``ℓ⁺(a,p)`` recurs once per negative of ``a`` and ``ℓ⁻(a,n)`` once per positive, so the sums
    are weighted sums over the ``query × reference`` matrix.
    """

    defaults: ClassVar[dict[str, Any]] = {"distance": "euclidean", "reduction": "avg_non_zero"}

    triplet_margin: ClassVar[str | None] = "margin"

    def configure(
        self,
        margin: float = 0.2,
        nu: float = 0.0,
        beta: float = 1.2,
        learn_beta: bool = False,
        num_classes: int | None = None,
    ) -> None:
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
        ):
            raise ConfigError(f"margin: num_classes must be a positive int or None, got {num_classes!r}")
        self.margin = float(margin)
        self.nu = float(nu)
        self.learn_beta = bool(learn_beta)
        self.num_classes = num_classes
        init = torch.full((num_classes or 1,), float(beta))
        if self.learn_beta:
            self.beta = nn.Parameter(init)
        else:
            self.register_buffer("beta", init)

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        mat = self.matrix(batch)
        beta = self.beta.to(mat.dtype)
        per_class = beta.numel() > 1
        farther, labels = self.distance.margin, batch.labels
        if batch.indices_tuple is None:
            listed = self.triplets_per_anchor != "all"
        else:
            listed = tuple_kind(batch.indices_tuple) == TRIPLETS
        if listed:
            a, p, n = self.triplets(batch)
            b = beta[labels[a]] if per_class else beta
            pos = F.relu(farther(mat[a, p], b) + self.margin)
            neg = F.relu(farther(b, mat[a, n]) + self.margin)
            hinge_sum = pos.sum() + neg.sum()
            num_active_terms = (pos > 0).sum() + (neg > 0).sum()
            num_triplets = a.new_full((), a.numel())
            num_inactive = ((pos == 0) & (neg == 0)).sum()
            beta_sum = b.sum() if per_class else None
        else:
            cpos, cneg = _pair_weights(batch, mat)
            b = beta[labels].unsqueeze(1) if per_class else beta
            pos = F.relu(farther(mat, b) + self.margin)
            neg = F.relu(farther(b, mat) + self.margin)
            npos, nneg = cpos.sum(1), cneg.sum(1)  # per anchor; each (a, p) recurs nneg[a] times
            hinge_sum = ((pos * cpos).sum(1) * nneg).sum() + ((neg * cneg).sum(1) * npos).sum()
            active_pos = _times(cpos, pos > 0).sum(1)
            active_neg = _times(cneg, neg > 0).sum(1)
            num_active_terms = (active_pos * nneg).sum() + (active_neg * npos).sum()
            triplets_per_row = npos * nneg
            num_triplets = triplets_per_row.sum()
            num_inactive = ((npos - active_pos) * (nneg - active_neg)).sum()
            beta_sum = (beta[labels] * triplets_per_row).sum() if per_class else None
        divisor = self.reducer.divisor(2 * num_triplets, num_active_terms)
        loss = hinge_sum / divisor.clamp_min(1)
        if self.learn_beta:
            if beta_sum is not None:  # per-class β: divided like the hinge terms (0 if nothing to divide)
                reg = torch.where(divisor > 0, self.nu * beta_sum / divisor.clamp_min(1), 0.0)
            else:
                reg = self.nu * beta.sum() * (num_triplets > 0)
            loss = loss + reg
        self.record(num_triplets=num_triplets, num_active_triplets=num_triplets - num_inactive)
        return loss

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, nu={self.nu}, learn_beta={self.learn_beta}, "
            f"num_classes={self.num_classes}, " + super().extra_repr()
        )


# ---------------------------------------------------------------------------------------------- lifted


@register("lifted")
class LiftedStructureLoss(BaseLoss):
    """Lifted structure loss (Oh Song, Xiang, Jegelka & Savarese, "Deep Metric Learning via Lifted
    Structured Feature Embedding", CVPR 2016, Eq. 4; PML ``LiftedStructureLoss``).

    For every positive pair ``(i, j)``, with ``N`` the negative pairs anchored at ``i`` or at ``j``::

        L_ij = ½ · [ log Σ_{(k,l)∈N} exp(m⁻ − d_kl) + d_ij − m⁺ ]₊²

    (similarities: ``s_kl − m⁻`` and ``m⁺ − s_ij``); the log-sum-exp is 0 when ``N`` is empty. The losses
    are reduced over positive pairs (``mean`` by default); no positive or no negative pair gives 0.
    Mined negative pairs count with their multiplicity.

    With ``ref_emb`` the positive ``j`` is a reference item whose negative pairs are not in the
    ``query × reference`` matrix, so only the anchor's negative pairs are used (PML matches reference
    indices against query anchors there; see docs/losses.md).
    """

    tuple_kinds = PAIRS_AND_TRIPLETS
    defaults: ClassVar[dict[str, Any]] = {"distance": "euclidean", "reduction": "mean"}

    def configure(self, neg_margin: float = 1.0, pos_margin: float = 0.0) -> None:
        self.neg_margin = float(neg_margin)
        self.pos_margin = float(pos_margin)

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        pairs = batch.to_pairs()
        a1, p, a2, _ = pairs
        self.record(num_pos_pairs=a1.numel(), num_neg_pairs=a2.numel())
        if a1.numel() == 0 or a2.numel() == 0:
            return self.zero_loss(batch.embeddings)
        mat = self.matrix(batch)
        farther = self.distance.margin
        row_lse, row_has = _log_weighted_lse(
            farther(self.neg_margin, mat), _pair_weights(batch, mat, pairs)[1]
        )
        lse, has = row_lse[a1], row_has[a1]
        if batch.own_reference:
            # negatives of i and of j: log(e^{lse_i} + e^{lse_j}); a self pair (i, i) counts its row once
            has_p = row_has[p] & (p != a1)
            lowest = torch.finfo(mat.dtype).min
            both = torch.logaddexp(torch.where(has, lse, lowest), torch.where(has_p, row_lse[p], lowest))
            lse = torch.where(has | has_p, both, 0.0)
        losses = F.relu(lse + farther(mat[a1, p], self.pos_margin)).pow(2) / 2
        self.record(num_active_pos_pairs=(losses > 0).sum())
        return self.reduce(losses)

    def extra_repr(self) -> str:
        return f"neg_margin={self.neg_margin}, pos_margin={self.pos_margin}, " + super().extra_repr()


@register("generalized_lifted")
class GeneralizedLiftedStructureLoss(MatrixPairLoss):
    """Generalized lifted structure loss (Hermans, Beyer & Leibe, "In Defense of the Triplet Loss for
    Person Re-Identification", arXiv:1703.07737, 2017, p. 4; PML ``GeneralizedLiftedStructureLoss``).

    Per anchor ``i`` with positives ``P_i`` and negatives ``N_i``::

        L_i = [ log Σ_{p∈P_i} exp(d_ip − m⁺) + log Σ_{n∈N_i} exp(m⁻ − d_in) ]₊

    (similarities: ``m⁺ − s_ip`` and ``s_in − m⁻``); an empty sum's log is taken as 0. ``mean`` over all
    anchors by default; mined pairs restrict ``P_i``/``N_i`` (a pair mined twice counts once).
    """

    defaults: ClassVar[dict[str, Any]] = {"distance": "euclidean", "reduction": "mean"}

    def configure(self, neg_margin: float = 1.0, pos_margin: float = 0.0) -> None:
        self.neg_margin = float(neg_margin)
        self.pos_margin = float(pos_margin)

    def matrix_loss(self, mat: torch.Tensor, pos_mask: torch.Tensor, neg_mask: torch.Tensor) -> torch.Tensor:
        farther = self.distance.margin
        pos = masked_logsumexp(farther(mat, self.pos_margin), pos_mask, add_one=False)
        neg = masked_logsumexp(farther(self.neg_margin, mat), neg_mask, add_one=False)
        return F.relu(pos + neg)

    def extra_repr(self) -> str:
        return f"neg_margin={self.neg_margin}, pos_margin={self.pos_margin}, " + super().extra_repr()


# -------------------------------------------------------------------------------------- N-pair, angular


def _first_positive_pair_per_label(
    a1: torch.Tensor, p: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first positive pair (in order) of every anchor label, sorted by label (PML
    ``convert_to_pos_pairs_with_unique_labels``)."""
    uniq, inverse = torch.unique(labels[a1], return_inverse=True)
    order = torch.arange(a1.numel(), device=a1.device)
    first = torch.full((uniq.numel(),), a1.numel(), dtype=torch.long, device=a1.device)
    first = first.scatter_reduce(0, inverse, order, reduce="amin")
    return a1[first], p[first]


@register("npair")
class NPairsLoss(BaseLoss):
    """Multi-class N-pair loss (Sohn, "Improved Deep Metric Learning with Multi-class N-pair Loss
    Objective", NeurIPS 2016, Eq. 6; PML ``NPairsLoss``).

    One positive pair ``(a_c, p_c)`` per anchor label ``c`` (the first one of the batch's — or the miner's
    — positive pairs); with ``S_cd`` the similarity of ``a_c`` and ``p_d`` (``−d`` for a distance)::

        L_c = −log( exp(S_cc) / Σ_d exp(S_cd) )  =  log(1 + Σ_{d≠c} exp(S_cd − S_cc))

    reduced with ``mean`` by default. Default ``dot`` on L2-normalised embeddings, as PML. With
    ``ref_emb`` the positives ``p_c`` are reference items (PML does not accept a reference set).
    """

    tuple_kinds = PAIRS_AND_TRIPLETS
    defaults: ClassVar[dict[str, Any]] = {"distance": "dot", "reduction": "mean"}

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        a1, p, _, _ = batch.to_pairs()
        if a1.numel() == 0:
            self.record(num_pairs=0)
            return self.zero_loss(batch.embeddings)
        a, p = _first_positive_pair_per_label(a1, p, batch.labels)
        mat = self.distance.matrix(batch.embeddings[a], batch.reference[p])
        logits = mat if self.is_similarity else -mat
        targets = torch.arange(a.numel(), device=logits.device)
        self.record(num_pairs=a.numel())
        return self.reduce(F.cross_entropy(logits, targets, reduction="none"))


@register("angular")
class AngularLoss(BaseLoss):
    """Angular loss (Wang, Zhou, Wen, Liu & Lin, "Deep Metric Learning with Angular Loss", ICCV 2017,
    Eq. 8 and 10; PML ``AngularLoss``).

    On L2-normalised embeddings, for every positive pair ``(a, p)`` and the negatives ``n`` of ``a`` (every
    reference item of another label, also with a miner, which only selects the positive pairs)::

        f_apn = 4 tan²α · (x_a + x_p)ᵀ x_n − 2 (1 + tan²α) · x_aᵀ x_p
        L_ap  = log(1 + Σ_n exp(f_apn))

    with ``alpha`` in degrees; ``mean`` over positive pairs by default, 0 when there is no positive or no
    negative pair. The formula is for unit vectors: ``distance`` must be ``euclidean`` with
    ``normalize_embeddings=True`` (PML's only accepted distance). PML leaves the negatives ``x_n``
    unnormalised; dmlkit normalises them like ``x_a``, ``x_p`` (see docs/losses.md).
    """

    tuple_kinds = PAIRS_AND_TRIPLETS
    defaults: ClassVar[dict[str, Any]] = {"distance": "euclidean", "reduction": "mean"}
    allowed_distances = ("euclidean",)

    def configure(self, alpha: float = 40.0) -> None:
        check_choice(self.who, "normalize_embeddings", self.normalize_embeddings, (True,))
        if not 0 < alpha < 90:
            raise ConfigError(f"angular: alpha must be in (0, 90) degrees, got {alpha}")
        self.alpha = float(alpha)

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        a1, p, a2, _ = batch.to_pairs()
        self.record(num_pos_pairs=a1.numel())
        if a1.numel() == 0 or a2.numel() == 0:
            return self.zero_loss(batch.embeddings)
        x = F.normalize(batch.embeddings, p=2, dim=1)
        ref = x if batch.ref_emb is None else F.normalize(batch.ref_emb, p=2, dim=1)
        xa, xp = x[a1], ref[p]
        tan2 = math.tan(math.radians(self.alpha)) ** 2
        f = (4 * tan2) * ((xa + xp) @ ref.T) - (2 * (1 + tan2)) * (xa * xp).sum(1, keepdim=True)
        negatives = batch.labels[a1].unsqueeze(1) != batch.reference_labels.unsqueeze(0)
        if batch.exclude is not None:
            negatives &= ~batch.exclude[a1]
        return self.reduce(masked_logsumexp(f, negatives, add_one=True))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, " + super().extra_repr()


# ---------------------------------------------------------------------------------------------- SNR
# Two losses on the signal-to-noise-ratio distance share the paper's name: PML's contrastive one and Roth et
# al.'s triplet one. Neither is "the" SNR loss, so each is named by its formula and the bare name is refused.


@register("snr_contrastive")
class SignalToNoiseRatioContrastiveLoss(ContrastiveLoss):
    """Contrastive loss on the signal-to-noise-ratio distance (Yuan, Chen, Wang, Yu, Shi & Jia,
    "Signal-to-Noise Ratio: A Robust Distance Metric for Deep Metric Learning", CVPR 2019; PML
    ``SignalToNoiseRatioContrastiveLoss``).

    :class:`ContrastiveLoss` with ``distance="snr"``: ``d_SNR(a, x) = var(x_a − x) / var(x_a)``
    (:class:`dmlkit.distances.SNR`; asymmetric, anchor in the denominator), ``[d − m⁺]₊`` on positive and
    ``[m⁻ − d]₊`` on negative pairs, each set reduced with ``avg_non_zero`` by default and the two summed.
    ``distance`` can only be ``"snr"`` (the contrastive loss itself takes it too);
    ``normalize_embeddings`` (default True, as PML's ``SNRDistance``) L2-normalises first. Roth et al.'s
    triplet loss on the same distance is :class:`SignalToNoiseRatioTripletLoss` (``snr_triplet``).
    """

    defaults: ClassVar[dict[str, Any]] = {"distance": "snr", "reduction": "avg_non_zero"}
    allowed_distances = ("snr",)


@register("snr_triplet")
class SignalToNoiseRatioTripletLoss(TripletMarginLoss):
    """Roth et al.'s SNR triplet loss with its embedding regulariser (Roth, Milbich, Sinha, Gupta, Ommer &
    Cohen, "Revisiting Training Strategies and Generalization Performance in Deep Metric Learning", ICML
    2020, code ``Confusezius/Revisiting_Deep_Metric_Learning_PyTorch``, ``criteria/snr.py``; the distance
    is Yuan et al.'s, CVPR 2019). Not in PML.

    Over the triplets ``(a_t, p_t, n_t)``, ``t = 1…T``, with ``d(a, x) = var(x_a − x) / var(x_a)`` (the
    unbiased ``torch.var`` over the feature dimension in Roth's code; the ``1/(D − 1)`` cancels, so this is
    :class:`dmlkit.distances.SNR` exactly)::

        ℓ_t  = [d(a_t, p_t) − d(a_t, n_t) + margin]₊
        reg  = 1/T Σ_t |Σ_k x_{a_t, k}|             (zero_mean's penalty, over the triplets' anchors)
        loss = Σ_t ℓ_t / #{ℓ_t > 0}  +  reg_lambda · reg

    The hinge is :class:`TripletMarginLoss` with ``distance="snr"`` (its fused paths included), so
    ``reduction`` (default ``avg_non_zero``: Roth's ``sum(ℓ) / sum(ℓ > 0)``) and ``triplets_per_anchor``
    apply to it as to ``triplet``. The regulariser averages over the triplets' anchors, an anchor counting
    once per triplet as in Roth's ``mean(|sum(batch[anchors], 1)|)``, over the rows the distance sees: the
    L2-normalised embeddings with ``normalize_embeddings=True`` (Roth's default architectures normalise
    their output), the raw ones otherwise. It is built in, not the shared ``embedding_regularizer``,
    which penalises every row once, before normalisation.

    Triplets: a miner's (Roth's loss always takes its batchminer's), or all of them without one. Roth sets
    ``reg_lambda`` to 0 when the batchminer is ``distance`` (his default ``--batch_mining``); a loss does
    not know its miner here, so pass ``reg_lambda=0`` with the ``distance`` miner to reproduce that. Where
    Roth's code divides 0 by 0 (no active triplet, or no triplet at all: NaN), the hinge term is 0; the
    regulariser is 0 without triplets.

    Statistics: those of ``triplet`` and ``reg_loss`` (``reg_lambda · reg``).
    """

    defaults: ClassVar[dict[str, Any]] = {"distance": "snr", "reduction": "avg_non_zero"}
    allowed_distances = ("snr",)
    distance_reason = "Roth et al.'s SNR triplet loss is defined on the SNR distance"

    def configure(self, margin: float = 0.2, reg_lambda: float = 0.005) -> None:
        super().configure(margin=margin)  # neither swap nor a smooth hinge: Roth has none
        self.reg_lambda = float(reg_lambda)
        if self.reg_lambda != 0 and not self.reducer.reduces:
            raise ConfigError(
                f"snr_triplet: the regulariser cannot be added to the per-element losses of reduction "
                f"'{self.reduction}' (pass reg_lambda=0 for them)"
            )

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        if batch.indices_tuple is None and self.triplets_per_anchor == "all":
            # every triplet, never listed (the base class's fast path): anchor i is in
            # #positives(i) · #negatives(i) of them
            hinge = super().compute_loss(batch)
            if self.reg_lambda == 0 or not self._regularize:  # see base.without_regularization
                return hinge
            pos, neg = batch.label_masks()
            per_anchor = pos.sum(1) * neg.sum(1)
        else:
            # listed once (mined pairs joined, or random ones drawn) and handed on to the hinge as mined
            triplets = self.triplets(batch)
            hinge = super().compute_loss(dataclasses.replace(batch, indices_tuple=triplets))
            if self.reg_lambda == 0 or not self._regularize:  # see base.without_regularization
                return hinge
            per_anchor = torch.bincount(triplets[0], minlength=len(batch.labels))
        rows = F.normalize(batch.embeddings, p=2, dim=1) if self.normalize_embeddings else batch.embeddings
        weights = per_anchor.to(rows.dtype)
        reg = (weights * _ZERO_MEAN.losses(rows)).sum() / weights.sum().clamp_min(1)
        term = self.reg_lambda * reg
        self.record(reg_loss=term)
        return hinge + term

    def extra_repr(self) -> str:
        return f"margin={self.margin}, reg_lambda={self.reg_lambda}, " + super().extra_repr()


#: ``|Σ_k x_ik|`` per row: Roth's SNR regulariser before its mean over anchors.
_ZERO_MEAN = regularizers.build("zero_mean")

REGISTRY.reserve(
    "snr",
    "is ambiguous: PML's SNR contrastive loss is 'snr_contrastive', Roth et al.'s SNR triplet loss is "
    "'snr_triplet' (the SNR distance stays distance='snr')",
)


# ---------------------------------------------------------------------------------------------- quadruplet


@register("quadruplet")
class QuadrupletLoss(BaseLoss):
    """Quadruplet loss (Chen, Chen, Zhang & Huang, "Beyond Triplet Loss: A Deep Quadruplet Network for
    Person Re-identification", CVPR 2017, Eq. 4) as in Roth et al., "Revisiting Training Strategies and
    Generalization Performance in Deep Metric Learning", ICML 2020 (``criteria/quadruplet.py``, flags
    ``--loss_quadruplet_margin_alpha_1/2``, both 0.2). Not in PML.

    For every triplet ``(a, p, n)`` and a fourth sample ``n'`` whose label differs from both ``a``'s and
    ``n``'s (Chen et al.'s condition)::

        L = reduce_t [d(a,p) − d(a,n) + α₁]₊  +  reduce_t [d(a,p) − d(n,n') + α₂]₊

    (``α₁ = margin_alpha_1``, ``α₂ = margin_alpha_2``; similarities flip the differences). Each term is
    reduced over triplets (``mean``, as Roth) and the two are summed. ``fourth_negatives`` picks ``n'``:

    - ``"all"`` (default): the second hinge is averaged over every valid ``n'`` — the expectation of
      Roth's random draw, deterministic. No ``T × R`` tensor (``T`` triplets, ``R`` reference items): a
      sort per distinct negative and a binary search per triplet (:func:`_mean_hinge_over_fourth`).
    - ``"random"``: one ``n'`` per triplet drawn uniformly from the valid ones with the global torch RNG
      (Roth's code; it draws any index other than ``n``'s, see docs/losses.md).

    Triplets without a valid ``n'`` (fewer than three classes) are left out of the second term. Without a
    miner all triplets are used; mined pairs are joined into triplets. ``d(n, n')`` is measured between
    reference items when ``ref_emb`` is given.
    """

    tuple_kinds = PAIRS_AND_TRIPLETS
    defaults: ClassVar[dict[str, Any]] = {"distance": "euclidean", "reduction": "mean"}

    def configure(
        self,
        margin_alpha_1: float = 0.2,
        margin_alpha_2: float = 0.2,
        fourth_negatives: Literal["all", "random"] = "all",
    ) -> None:
        check_choice(self.who, "fourth_negatives", fourth_negatives, ("all", "random"))
        self.margin_alpha_1 = float(margin_alpha_1)
        self.margin_alpha_2 = float(margin_alpha_2)
        self.fourth_negatives = fourth_negatives

    @staticmethod
    def sample_fourth_negatives(
        a: torch.Tensor,
        n: torch.Tensor,
        labels: torch.Tensor,
        ref_labels: torch.Tensor | None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One reference index per triplet, uniform among those labelled neither ``y(a)`` nor ``y(n)``.

        Returns ``(n', valid)``; ``valid`` is False (and ``n'`` meaningless) where no such item exists.
        Draws ``len(a)`` uniforms from ``generator`` (the global RNG if None). O(T + R log R): the k-th
        valid item is found in the label-sorted reference set by skipping the two excluded label blocks.
        """
        ref_l = labels if ref_labels is None else ref_labels
        sorted_l, order = torch.sort(ref_l, stable=True)
        la, ln = labels[a], ref_l[n]
        start_a = torch.searchsorted(sorted_l, la)
        size_a = torch.searchsorted(sorted_l, la, right=True) - start_a
        start_n = torch.searchsorted(sorted_l, ln)
        # a (mis-mined) negative of the anchor's own label excludes one block, not two
        size_n = torch.where(ln == la, 0, torch.searchsorted(sorted_l, ln, right=True) - start_n)
        count = ref_l.numel() - size_a - size_n
        u = torch.rand(a.numel(), generator=generator, dtype=torch.float64, device=a.device)
        k = torch.minimum((u * count).floor().long(), (count - 1).clamp_min(0))
        a_first = start_a < start_n
        lo_start, lo_size = torch.where(a_first, start_a, start_n), torch.where(a_first, size_a, size_n)
        hi_start, hi_size = torch.where(a_first, start_n, start_a), torch.where(a_first, size_n, size_a)
        pos = k + lo_size * (k >= lo_start)
        pos = pos + hi_size * (pos >= hi_start)
        valid = count > 0
        return order[pos.clamp(0, ref_l.numel() - 1)], valid

    @staticmethod
    def triplets(batch: Batch) -> Triplets:
        """The call's triplets: mined (pairs joined on their anchor) or all (``triplets_per_anchor`` of the
        triplet losses is no option here)."""
        return batch.to_triplets("all")

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        a, p, n = self.triplets(batch)
        mat = self.matrix(batch)
        distance, sim, labels = self.distance, self.is_similarity, batch.labels
        ap = mat[a, p]
        triplet_losses = F.relu(distance.margin(ap, mat[a, n]) + self.margin_alpha_1)
        if self.fourth_negatives == "random":
            fourth, valid = self.sample_fourth_negatives(a, n, labels, batch.ref_labels)
            nn_dist = _between_references(distance, batch, mat, n[valid], fourth[valid])
            quad_losses = F.relu(distance.margin(ap[valid], nn_dist) + self.margin_alpha_2)
        else:
            ref_l = batch.reference_labels
            uniq, row_of = torch.unique(n, return_inverse=True)
            # distances from each distinct negative to every reference item (the batch: already in mat)
            ref = batch.ref_emb
            rows = mat[uniq] if ref is None else distance.matrix(ref[uniq], ref)
            # [d(a,p) + α₂ − d(n,k)]₊ for a distance, [s(n,k) − s(a,p) + α₂]₊ for a similarity
            c = (-ap if sim else ap) + self.margin_alpha_2
            quad_losses, valid = _mean_hinge_over_fourth(
                c, -rows if sim else rows, row_of, ref_l[uniq], labels[a], ref_l
            )
            quad_losses = quad_losses[valid]
        self.record(
            num_triplets=a.numel(),
            num_active_triplets=(triplet_losses > 0).sum(),
            num_quadruplet_terms=quad_losses.numel(),
            num_active_quadruplet_terms=(quad_losses > 0).sum(),
        )
        return self.reduce_terms((triplet_losses, None), (quad_losses, None))

    def extra_repr(self) -> str:
        return (
            f"margin_alpha_1={self.margin_alpha_1}, margin_alpha_2={self.margin_alpha_2}, "
            f"fourth_negatives={self.fourth_negatives!r}, " + super().extra_repr()
        )


# ---------------------------------------------------------------------------------------------- Yu & Tao


@register("tuplet_margin")
class TupletMarginLoss(BaseLoss):
    """Tuplet margin loss (Yu & Tao, "Deep Metric Learning with Tuplet Margin Loss", ICCV 2019, Eq. 8;
    PML ``TupletMarginLoss``).

    For every positive pair ``(a, p)`` with angle ``θ_ap = arccos s_ap`` and the negative pairs ``(a, n)``
    sharing its anchor (cosine similarities ``s``)::

        L_ap = log(1 + Σ_n exp(scale · (s_an − cos(θ_ap − margin))))

    with ``margin`` in degrees; 0 for an anchor without negative pairs. ``mean`` over positive pairs by
    default; 0 when there is no positive or no negative pair. Mined negative pairs count with their
    multiplicity. Cosine only (PML's only accepted distance). ``s_ap`` is clamped to ``[−1+ε, 1−ε]``
    (ε = dtype epsilon): ``d cos(θ − m) / ds`` is infinite at ``s = ±1``, so identical positives get a
    zero instead of a NaN gradient (PML: NaN).
    """

    tuple_kinds = PAIRS_AND_TRIPLETS
    defaults: ClassVar[dict[str, Any]] = {"distance": "cosine", "reduction": "mean"}
    allowed_distances = ("cosine",)

    def configure(self, margin: float = 5.73, scale: float = 64.0) -> None:
        self.margin = float(margin)
        self.scale = float(scale)

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        pairs = batch.to_pairs()
        a1, p, a2, _ = pairs
        self.record(num_pos_pairs=a1.numel(), num_neg_pairs=a2.numel())
        if a1.numel() == 0 or a2.numel() == 0:
            return self.zero_loss(batch.embeddings)
        mat = self.matrix(batch)
        eps = torch.finfo(mat.dtype).eps
        pos = mat[a1, p].clamp(-1 + eps, 1 - eps)
        pos_margin = torch.cos(torch.acos(pos) - math.radians(self.margin))
        # log(1 + Σ_n e^{s·s_an − s·c}) = softplus(lse_n(s·s_an) − s·c): one log-sum-exp per anchor row
        row_lse, row_has = _log_weighted_lse(self.scale * mat, _pair_weights(batch, mat, pairs)[1])
        inside = row_lse[a1] - self.scale * pos_margin
        losses = torch.where(row_has[a1], torch.logaddexp(torch.zeros_like(inside), inside), 0.0)
        return self.reduce(losses)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, scale={self.scale}, " + super().extra_repr()


@register("intra_pair_variance")
class IntraPairVarianceLoss(PairLoss):
    """Intra-pair variance loss (Yu & Tao, "Deep Metric Learning with Tuplet Margin Loss", ICCV 2019,
    Eq. 10; PML ``IntraPairVarianceLoss``).

    With ``μ⁺``/``μ⁻`` the means of the positive/negative pair similarities ``s``::

        L⁺ = [(1 − ε⁺) μ⁺ − s_ap]₊²        L⁻ = [s_an − (1 + ε⁻) μ⁻]₊²

    (gradients flow through the means too). For a distance the roles flip:
    ``[d_ap − (1 + ε⁺) μ⁺]₊²`` and ``[(1 − ε⁻) μ⁻ − d_an]₊²``. Each set is reduced (``mean``) and the two
    summed. Default ``cosine``.
    """

    defaults: ClassVar[dict[str, Any]] = {"distance": "cosine", "reduction": "mean"}

    def configure(self, pos_eps: float = 0.01, neg_eps: float = 0.01) -> None:
        self.pos_eps = float(pos_eps)
        self.neg_eps = float(neg_eps)

    def pair_losses(self, pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.is_similarity:
            pos_dev = (1 - self.pos_eps) * pos.mean() - pos
            neg_dev = neg - (1 + self.neg_eps) * neg.mean()
        else:
            pos_dev = pos - (1 + self.pos_eps) * pos.mean()
            neg_dev = (1 - self.neg_eps) * neg.mean() - neg
        return F.relu(pos_dev).pow(2), F.relu(neg_dev).pow(2)

    def extra_repr(self) -> str:
        return f"pos_eps={self.pos_eps}, neg_eps={self.neg_eps}, " + super().extra_repr()


# ---------------------------------------------------------------------------------------------- TCM, DSM


@register("threshold_consistent_margin")
class ThresholdConsistentMarginLoss(BaseLoss):
    """Threshold-consistent margin loss (Zhang et al., "Threshold-Consistent Margin Loss for Open-World
    Deep Metric Learning", ICLR 2024, arXiv:2307.04047, Eq. 5; PML ``ThresholdConsistentMarginLoss``).

    On cosine similarities of positive pairs ``s⁺`` and negative pairs ``s⁻``::

        L = λ⁺ · reduce [m⁺ − s⁺]₊  +  λ⁻ · reduce [s⁻ − m⁻]₊

    The default ``avg_non_zero`` is the paper's average over the pairs on the wrong side of the margin
    (PML also counts pairs exactly at the margin in the denominator; a tie of measure zero). It is a
    regulariser meant to be added to a base loss. Cosine only (PML's only accepted distance). With
    ``ref_emb`` positives/negatives are reference items (PML reads them from the batch there).
    """

    tuple_kinds = PAIRS_AND_TRIPLETS
    defaults: ClassVar[dict[str, Any]] = {"distance": "cosine", "reduction": "avg_non_zero"}
    allowed_distances = ("cosine",)

    def configure(
        self,
        lambda_plus: float = 1.0,
        lambda_minus: float = 1.0,
        margin_plus: float = 0.9,
        margin_minus: float = 0.5,
    ) -> None:
        self.lambda_plus = float(lambda_plus)
        self.lambda_minus = float(lambda_minus)
        self.margin_plus = float(margin_plus)
        self.margin_minus = float(margin_minus)

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        a1, p, a2, n = batch.to_pairs()
        mat = self.matrix(batch)
        pos_losses = F.relu(self.margin_plus - mat[a1, p])
        neg_losses = F.relu(mat[a2, n] - self.margin_minus)
        self.record(
            num_pos_pairs=a1.numel(),
            num_neg_pairs=a2.numel(),
            num_active_pos_pairs=(pos_losses > 0).sum(),
            num_active_neg_pairs=(neg_losses > 0).sum(),
        )
        return self.reduce_terms(
            (pos_losses, (a1, p)), (neg_losses, (a2, n)), weights=(self.lambda_plus, self.lambda_minus)
        )

    def extra_repr(self) -> str:
        return (
            f"lambda_plus={self.lambda_plus}, lambda_minus={self.lambda_minus}, "
            f"margin_plus={self.margin_plus}, margin_minus={self.margin_minus}, " + super().extra_repr()
        )


@register("dynamic_soft_margin")
class DynamicSoftMarginLoss(BaseLoss):
    """Dynamic soft margin loss (Zhang & Rusinkiewicz, "Learning Local Descriptors with a CDF-Based
    Dynamic Soft Margin", ICCV 2019; PML ``DynamicSoftMarginLoss``).

    For every triplet ``x_t = d(a,p) − d(a,n)`` (all triplets; mined pairs are joined into triplets)::

        L = reduce_t  Φ(x_t) · x_t

    where ``Φ`` is the CDF of a running histogram of ``x`` over ``num_bins`` bins of width
    ``δ = 2|min_val| / num_bins`` starting at ``min_val``: each ``x`` adds ``1 − frac`` to its bin and
    ``frac`` to the next (linear interpolation), the histogram is blended with weight ``momentum`` (1 on
    the first update) and renormalised, then ``Φ`` is read at ``x``'s bin. ``Φ`` is a constant weight.

    Deviations from PML (docs/losses.md): no gradient flows through the histogram (PML's does, and a
    second ``backward`` through the stored histogram fails); values beyond the last bin count in the last
    bin (PML raises an index error for ``x ≥ min_val + (num_bins − 1)·δ``); the histogram (buffer
    ``hist``) only advances in training mode when autograd records the call (grad enabled, embeddings
    requiring grad) — other calls are weighted with the histogram they would have produced.
    ``distance``: ``euclidean`` (default) or ``squared_euclidean``, on normalised embeddings.
    """

    tuple_kinds = PAIRS_AND_TRIPLETS
    defaults: ClassVar[dict[str, Any]] = {"distance": "euclidean", "reduction": "mean"}
    allowed_distances = ("euclidean", "squared_euclidean")

    def configure(self, min_val: float = -2.0, num_bins: int = 10, momentum: float = 0.01) -> None:
        check_choice(self.who, "normalize_embeddings", self.normalize_embeddings, (True,))
        if isinstance(num_bins, bool) or int(num_bins) != num_bins or num_bins < 2:
            raise ConfigError(f"dynamic_soft_margin: num_bins must be an int >= 2, got {num_bins!r}")
        if min_val >= 0:
            raise ConfigError(f"dynamic_soft_margin: min_val must be < 0, got {min_val}")
        if not 0 < momentum <= 1:
            raise ConfigError(f"dynamic_soft_margin: momentum must be in (0, 1], got {momentum}")
        self.min_val = float(min_val)
        self.num_bins = int(num_bins)
        self.delta = 2 * abs(self.min_val) / self.num_bins
        self.momentum = float(momentum)
        self.register_buffer("hist", torch.zeros(self.num_bins))

    def _bins(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Lower bin index and interpolation weight of each value (clamped into the histogram)."""
        t = ((x - self.min_val) / self.delta).clamp(0, self.num_bins - 1)
        idx = t.floor()
        return idx.long(), t - idx

    def updated_histogram(self, x: torch.Tensor) -> torch.Tensor:
        """The running histogram after adding the values ``x`` (no side effect)."""
        x = x.detach()
        hist = self.hist.to(x.dtype)
        idx, frac = self._bins(x)
        momentum = torch.where(hist.sum() != 0, self.momentum, 1.0).to(x.dtype)
        new = (1 - momentum) * hist
        new = new.scatter_add(0, idx, momentum * (1 - frac))
        new = new.scatter_add(0, (idx + 1).clamp_max(self.num_bins - 1), momentum * frac)
        return new / new.sum()

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        a, p, n = batch.to_triplets("all")
        self.record(num_triplets=a.numel())
        if a.numel() == 0:
            return self.zero_loss(batch.embeddings)
        mat = self.matrix(batch)
        x = mat[a, p] - mat[a, n]
        hist = self.updated_histogram(x)
        if self.training and torch.is_grad_enabled() and batch.embeddings.requires_grad:
            self.hist = hist
        cdf = torch.cumsum(hist, 0)
        return self.reduce(cdf[self._bins(x.detach())[0]] * x)

    def extra_repr(self) -> str:
        return (
            f"min_val={self.min_val}, num_bins={self.num_bins}, momentum={self.momentum}, "
            + super().extra_repr()
        )
