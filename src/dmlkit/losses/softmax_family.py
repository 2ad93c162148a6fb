"""Losses built on a (soft) log-sum-exp over each anchor's pairs."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from dmlkit.losses.base import (
    PAIRS_AND_TRIPLETS,
    SIMILARITIES,
    BaseLoss,
    Batch,
    anchor_weights,
    check_positive,
    register,
)
from dmlkit.tuples import pair_masks

# exp of an input that underflows (below about -87 in float32, -708 in float64) takes a slow path on some
# CPUs (~10x): differences to the row maximum are clamped at -80 instead, an error below e^-80 ≈ 2e-35
# relative to the row sum (and its gradient), far under float64 rounding.
_EXP_FLOOR = 80.0


class _LogSumExpExcluding(torch.autograd.Function):
    """Row-wise ``log Σ_{j: not excluded[i,j]} exp(x[i,j])`` and whether the row has any such entry."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, excluded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        row_max = x.masked_fill(excluded, float("-inf")).amax(dim=1, keepdim=True)
        nonempty = row_max > float("-inf")
        row_max = row_max.masked_fill(~nonempty, 0.0)
        # softmax over the kept entries; exp never sees an excluded or underflowing value
        prob = (x - row_max).clamp_(-_EXP_FLOOR, 0.0).exp_().masked_fill_(excluded, 0.0)
        total = prob.sum(dim=1, keepdim=True)
        prob.div_(total.masked_fill(~nonempty, 1.0))
        lse = (row_max + total.log()).masked_fill(~nonempty, torch.finfo(x.dtype).min)
        ctx.save_for_backward(prob)
        ctx.mark_non_differentiable(nonempty)
        return lse.squeeze(1), nonempty.squeeze(1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _: torch.Tensor) -> tuple[torch.Tensor, None]:
        (prob,) = ctx.saved_tensors
        return prob * grad.unsqueeze(1), None


class _SupConRows(torch.autograd.Function):
    """Per-anchor SupCon terms ``log Σ_{j kept} exp(z_ij) − mean_{j∈P_i} z_ij`` (0 − 0 for a row without
    positives, to be masked by the caller) and ``|P_i|`` (int64), fused: the backward pass is
    ``softmax_kept(z_i) − [j∈P_i]/|P_i|`` times the row's gradient. ``excluded``: entries left out of the
    denominator (None: none); positives must be kept entries.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, excluded: torch.Tensor | None, pos_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kept = x if excluded is None else x.masked_fill(excluded, float("-inf"))
        row_max = kept.amax(dim=1, keepdim=True)
        nonempty = row_max > float("-inf")
        row_max.masked_fill_(~nonempty, 0.0)
        # softmax over the kept entries; exp never sees an excluded or underflowing value
        prob = (x - row_max).clamp_(-_EXP_FLOOR, 0.0).exp_()
        if excluded is not None:
            prob.masked_fill_(excluded, 0.0)
        total = prob.sum(dim=1, keepdim=True)
        prob.div_(total.masked_fill_(~nonempty, 1.0))
        lse = (row_max + total.log_()).squeeze(1)
        num_pos = torch.count_nonzero(pos_mask, dim=1)
        inv_num_pos = num_pos.clamp_min(1).to(x.dtype).reciprocal_()
        losses = lse - torch.where(pos_mask, x, 0.0).sum(dim=1) * inv_num_pos
        ctx.save_for_backward(prob, pos_mask, inv_num_pos)
        ctx.mark_non_differentiable(num_pos)
        return losses, num_pos

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor, _: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        prob, pos_mask, inv_num_pos = ctx.saved_tensors
        grad_x = prob * grad.unsqueeze(1)  # not in place: the saved tensor serves a retained graph again
        grad_x.sub_(pos_mask * (grad * inv_num_pos).unsqueeze(1))
        return grad_x, None, None


def logsumexp_excluding(x: torch.Tensor, excluded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise ``log Σ_{j: ¬excluded[i,j]} exp(x[i,j])`` and a ``(B,)`` flag "the row kept an entry".

    A row with every entry excluded gives the dtype's lowest finite value with a zero gradient, so
    ``softplus(result − t)`` is exactly 0 there. Same value as PML's ``lmu.logsumexp(add_one=False)`` on
    non-empty rows; one pass in the backward.
    """
    return _LogSumExpExcluding.apply(x, excluded)


def scaled_logits(loss: BaseLoss, batch: Batch, scale: float) -> torch.Tensor:
    """``scale · s`` for a similarity, ``−scale · d`` for a distance: the logits of softmax-type losses.

    :meth:`dmlkit.distances.Distance.matrix` folds the scale of a similarity into the matrix product and
    its fused backward pass (no extra pass over the ``B × R`` matrix).
    """
    return loss.matrix(batch, scale if loss.is_similarity else -scale)


def _fill_masks(
    loss: BaseLoss, batch: Batch, mat: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(not_pos, not_neg, is_pos)`` boolean matrices for a matrix loss, and its pair statistics.

    Without a miner they come from a single label comparison (``not_neg`` is the same-label mask and
    ``is_pos`` may include self pairs, which ``not_pos`` excludes); with one, from the mined pairs (a
    pair mined twice counts once, PML's matrix losses). Records ``num_pos_pairs``/``num_neg_pairs``.
    """
    if batch.indices_tuple is None:
        same = batch.same_labels()
        excluded = batch.exclude
        if excluded is not None:  # only with a reference set (BaseLoss.forward checks)
            is_pos = same & ~excluded
            not_neg = same | excluded
            loss.record(num_pos_pairs=is_pos.sum(), num_neg_pairs=mat.numel() - not_neg.sum())
            return ~is_pos, not_neg, is_pos
        not_pos = ~same
        num_same = same.sum()
        if batch.own_reference:
            not_pos.fill_diagonal_(True)
            loss.record(num_pos_pairs=num_same - mat.shape[0], num_neg_pairs=mat.numel() - num_same)
        else:
            loss.record(num_pos_pairs=num_same, num_neg_pairs=mat.numel() - num_same)
        return not_pos, same, same
    pos_mask, neg_mask = pair_masks(batch.to_pairs(), tuple(mat.shape), mat.device)  # type: ignore[arg-type]
    loss.record(num_pos_pairs=pos_mask.sum(), num_neg_pairs=neg_mask.sum())
    return ~pos_mask, ~neg_mask, pos_mask


@register("multisimilarity")
class MultiSimilarityLoss(BaseLoss):
    """Multi-similarity loss (Wang et al., "Multi-Similarity Loss with General Pair Weighting for Deep
    Metric Learning", CVPR 2019; PML ``MultiSimilarityLoss``).

    Per anchor ``i`` with similarities ``S_ij``, positives ``P_i`` and negatives ``N_i``::

        L_i = 1/α · log(1 + Σ_{j∈P_i} exp(−α (S_ij − λ))) + 1/β · log(1 + Σ_{j∈N_i} exp(β (S_ij − λ)))

    with ``λ = base``; a term is 0 when its set is empty. For a distance the signs flip (``d − λ`` for
    positives). ``L`` is the mean over all anchors, those without pairs included. Mined pairs restrict
    ``P_i``/``N_i`` (a pair mined twice counts once, PML's matrix loss).

    Statistics: ``num_pos_pairs``, ``num_neg_pairs`` (distinct pairs).
    """

    tuple_kinds = PAIRS_AND_TRIPLETS
    defaults: ClassVar[dict[str, Any]] = {"distance": "cosine", "reduction": "mean"}

    def configure(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5) -> None:
        check_positive(self.who, alpha=alpha, beta=beta)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.base = float(base)

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        # One label compare instead of the two masks, one exponent matrix for both sets, and
        # log(1 + Σ e^x) = softplus(log Σ e^x) instead of appending a column of zeros.
        mat, sign = self.matrix(batch), 1.0 if self.is_similarity else -1.0
        not_pos, not_neg, is_pos = _fill_masks(self, batch, mat)
        coef = torch.where(is_pos, mat.new_tensor(-self.alpha * sign), mat.new_tensor(self.beta * sign))
        exponents = (mat - self.base) * coef
        pos_loss = F.softplus(logsumexp_excluding(exponents, not_pos)[0]) / self.alpha
        neg_loss = F.softplus(logsumexp_excluding(exponents, not_neg)[0]) / self.beta
        return self.reduce(pos_loss + neg_loss, "anchors")

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, base={self.base}, " + super().extra_repr()


@register("circle")
class CircleLoss(BaseLoss):
    """Circle loss (Sun et al., "Circle Loss: A Unified Perspective of Pair Similarity Optimization",
    CVPR 2020, Eq. 6 with the weights of Eq. 8; PML ``CircleLoss``).

    Per anchor ``i`` with similarities ``s_p`` (positives ``P_i``) and ``s_n`` (negatives ``N_i``)::

        L_i = softplus( log Σ_{p∈P_i} exp(−γ α_p (s_p − Δ_p)) + log Σ_{n∈N_i} exp(γ α_n (s_n − Δ_n)) )
        α_p = [1 + m − s_p]₊,  α_n = [s_n + m]₊   (treated as constants: no gradient, as in the paper)
        Δ_p = 1 − m,           Δ_n = m

    ``L_i = 0`` for anchors without a positive or without a negative. Reduced with ``avg_non_zero`` by
    default (PML). Needs a similarity (``cosine``, the default, or ``dot``). Mined pairs restrict
    ``P_i``/``N_i`` (a pair mined twice counts once, PML's matrix loss).

    Statistics: ``num_pos_pairs``, ``num_neg_pairs`` (distinct pairs).
    """

    tuple_kinds = PAIRS_AND_TRIPLETS
    defaults: ClassVar[dict[str, Any]] = {"distance": "cosine", "reduction": "avg_non_zero"}
    allowed_distances = SIMILARITIES
    distance_reason = "the margins are defined on similarities"

    def configure(self, m: float = 0.4, gamma: float = 80.0) -> None:
        self.m = float(m)
        self.gamma = float(gamma)

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        mat = self.matrix(batch)
        not_pos, not_neg, is_pos = _fill_masks(self, batch, mat)
        m, gamma = self.m, self.gamma
        with torch.no_grad():
            # α_p, α_n and the offsets Δ_p, Δ_n are constants (no gradient through the weights, as PML).
            coef = torch.where(is_pos, (-gamma) * torch.relu((1.0 + m) - mat), gamma * torch.relu(mat + m))
            offset = torch.where(is_pos, mat.new_tensor(1.0 - m), mat.new_tensor(m))
        logits = (mat - offset) * coef
        lse_pos, has_pos = logsumexp_excluding(logits, not_pos)
        lse_neg, has_neg = logsumexp_excluding(logits, not_neg)
        # lse of an empty set is the lowest float: its sum with the other may be −inf, never NaN
        return self.reduce(F.softplus(lse_pos + lse_neg).masked_fill(~(has_pos & has_neg), 0.0), "anchors")

    def extra_repr(self) -> str:
        return f"m={self.m}, gamma={self.gamma}, " + super().extra_repr()


@register("supcon")
class SupConLoss(BaseLoss):
    """Supervised contrastive loss (Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020,
    Eq. 2, L^sup_out; PML ``SupConLoss``).

    Per anchor ``i`` with logits ``z_ij = s_ij / τ`` (``−d_ij / τ`` for a distance), positives ``P_i`` and
    negatives ``N_i``::

        L_i = −1/|P_i| Σ_{p∈P_i} log( exp(z_ip) / Σ_{a∈P_i∪N_i} exp(z_ia) )
            = log Σ_{a∈P_i∪N_i} exp(z_ia) − 1/|P_i| Σ_{p∈P_i} z_ip

    ``L_i = 0`` when ``P_i`` is empty; the whole loss is 0 when the batch (or the mined set) has no
    positive pair or no negative pair (PML). All anchors are reduced, with ``avg_non_zero`` by default
    (PML). Mined pairs restrict ``P_i``/``N_i`` (a pair mined twice counts once, PML's matrix loss).

    Statistics: ``num_pos_pairs``, ``num_neg_pairs`` (distinct pairs).
    """

    tuple_kinds = PAIRS_AND_TRIPLETS
    defaults: ClassVar[dict[str, Any]] = {"distance": "cosine", "reduction": "avg_non_zero"}

    def configure(self, temperature: float = 0.1) -> None:
        check_positive(self.who, temperature=temperature)
        self.temperature = float(temperature)

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        logits = scaled_logits(self, batch, 1.0 / self.temperature)
        if batch.indices_tuple is None:
            # Every pair is a positive or a negative except self pairs: the denominator needs no mask
            # beyond the diagonal, and whether any negative exists is a question about labels alone.
            labels, ref_labels = batch.labels, batch.ref_labels
            all_labels = labels if ref_labels is None else torch.cat([labels, ref_labels])
            any_neg = (all_labels != labels[:1]).any()
            pos_mask = batch.same_labels()
            if batch.own_reference:
                pos_mask.fill_diagonal_(False)
                excluded = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
                num_pairs = logits.shape[0] * (logits.shape[0] - 1)
            elif batch.exclude is not None:
                excluded = batch.exclude
                pos_mask &= ~excluded
                num_pairs = logits.numel() - excluded.sum()
                any_neg = (~pos_mask & ~excluded).any()
            else:
                excluded = None
                num_pairs = logits.numel()
            losses, num_pos = _SupConRows.apply(logits, excluded, pos_mask)
            total_pos = num_pos.sum()
            self.record(num_pos_pairs=total_pos, num_neg_pairs=num_pairs - total_pos)
        else:
            pos_mask, neg_mask = pair_masks(batch.to_pairs(), tuple(logits.shape), logits.device)  # type: ignore[arg-type]
            losses, num_pos = _SupConRows.apply(logits, ~(pos_mask | neg_mask), pos_mask)
            any_neg = neg_mask.any()
            self.record(num_pos_pairs=num_pos.sum(), num_neg_pairs=torch.count_nonzero(neg_mask))
        has_pos = num_pos > 0
        # Rows without positives are 0, and so is everything when no pair is negative (PML); no sync.
        return self.reduce(losses.masked_fill(~(has_pos & has_pos.any() & any_neg), 0.0), "anchors")

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, " + super().extra_repr()


@register("ntxent")
class NTXentLoss(BaseLoss):
    """NT-Xent / InfoNCE loss (Sohn, "Improved Deep Metric Learning with Multi-class N-pair Loss
    Objective", NeurIPS 2016; Chen et al., SimCLR, ICML 2020; PML ``NTXentLoss``).

    One term per positive pair ``(a, p)``, with logits ``z = s / τ`` (``−d / τ`` for a distance)::

        L_ap = −log( exp(z_ap) / (exp(z_ap) + Σ_{n∈N_a} exp(z_an)) )
             = softplus(log Σ_{n∈N_a} exp(z_an) − z_ap)

    where ``N_a`` are the anchor's negatives (all of them, or the mined negative pairs with that anchor,
    repeated ones counted repeatedly). ``L_ap = 0`` when ``N_a`` is empty. The positive-pair terms are
    reduced with ``mean`` by default (PML). Without a miner no pair index list is built: the terms are a
    masked ``B × R`` matrix.

    Statistics: ``num_pos_pairs``, ``num_neg_pairs``.
    """

    tuple_kinds = PAIRS_AND_TRIPLETS
    defaults: ClassVar[dict[str, Any]] = {"distance": "cosine", "reduction": "mean"}

    def configure(self, temperature: float = 0.07) -> None:
        check_positive(self.who, temperature=temperature)
        self.temperature = float(temperature)

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        logits = scaled_logits(self, batch, 1.0 / self.temperature)
        if batch.indices_tuple is None:
            same, excluded = batch.same_labels(), batch.exclude
            not_neg = same if excluded is None else same | excluded
            neg_lse = logsumexp_excluding(logits, not_neg)[0]
            losses = F.softplus(neg_lse.unsqueeze(1) - logits)
            pos_mask = same.clone().fill_diagonal_(False) if batch.own_reference else same
            if excluded is not None:
                pos_mask = pos_mask & ~excluded
            num_pos = pos_mask.sum()
            self.record(num_pos_pairs=num_pos, num_neg_pairs=not_neg.numel() - not_neg.sum())
            return self.reducer.masked(losses, pos_mask)
        a1, p, a2, n = batch.to_pairs()
        # A negative pair mined k times counts k times in its anchor's denominator: log k is added to
        # its logit instead of repeating it.
        counts = torch.zeros_like(logits).index_put_((a2, n), torch.ones_like(a2, dtype=logits.dtype), True)
        neg_mask = counts > 0
        neg_lse = logsumexp_excluding(logits + torch.log(counts.masked_fill(~neg_mask, 1.0)), ~neg_mask)[0]
        losses = F.softplus(neg_lse[a1] - logits[a1, p])
        self.record(num_pos_pairs=a1.numel(), num_neg_pairs=a2.numel())
        return self.reduce(losses, (a1, p))

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, " + super().extra_repr()


@register("nca")
class NCALoss(BaseLoss):
    """Neighbourhood components analysis (Goldberger et al., "Neighbourhood Components Analysis",
    NeurIPS 2004; PML ``NCALoss``).

    With ``z_ij = −softmax_scale · d_ij`` (``+softmax_scale · s_ij`` for a similarity) and ``j ≠ i`` when
    the reference set is the batch::

        p_ij = exp(z_ij) / Σ_k exp(z_ik),   L_i = −log Σ_{j: y_j = y_i} p_ij

    computed as ``logsumexp_all − logsumexp_same``. Anchors without a same-label reference are left out;
    the rest are reduced with ``mean`` (PML). A miner's output only weights the anchors:
    ``L_i · c_i / max c`` with ``c_i`` the number of times sample ``i`` occurs in the tuple (PML
    ``convert_to_weights``).

    Statistics: ``num_anchors`` (anchors with a positive).
    """

    tuple_kinds = PAIRS_AND_TRIPLETS
    defaults: ClassVar[dict[str, Any]] = {"distance": "squared_euclidean", "reduction": "mean"}

    def configure(self, softmax_scale: float = 1.0) -> None:
        self.softmax_scale = float(softmax_scale)

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        if batch.embeddings.shape[0] <= 1:
            return self.zero_loss(batch.embeddings)
        mat = self.matrix(batch)
        logits = self.softmax_scale * (mat if self.is_similarity else -mat)
        other = ~batch.same_labels()
        if batch.own_reference:
            eye = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
            lse_all = logsumexp_excluding(logits, eye)[0]
            other = other | eye
        elif batch.exclude is not None:
            lse_all = logsumexp_excluding(logits, batch.exclude)[0]
            other = other | batch.exclude
        else:
            lse_all = torch.logsumexp(logits, dim=1)
        lse_same, has_pos = logsumexp_excluding(logits, other)
        losses = lse_all - lse_same
        losses = torch.where(has_pos, losses, torch.zeros_like(losses)) * anchor_weights(batch, losses)
        self.record(num_anchors=has_pos.sum())
        return self.reduce(losses, "anchors", mask=has_pos)

    def extra_repr(self) -> str:
        return f"softmax_scale={self.softmax_scale}, " + super().extra_repr()


@register("instance")
class InstanceLoss(BaseLoss):
    """Instance loss with the batch as classifier (Zheng et al., "Dual-Path Convolutional Image-Text
    Embeddings with Instance Loss", ACM TOMM 2020; PML ``InstanceLoss``, with a deliberate fix).

    Every distinct label of the batch is a class whose classifier weight is the class's first sample
    ``f(c)`` in the batch; with ``s`` the cosine similarity::

        L_i = −log( exp(γ s(x_i, x_f(y_i))) / Σ_{c ∈ labels of the batch} exp(γ s(x_i, x_f(c))) )

    reduced with ``mean`` (PML). With all-distinct labels every sample is its own class (the paper's
    instance discrimination, ``f(c) = i``) and this is exactly PML's loss; PML also uses the label's rank
    as the target, but over a ``B × B`` logit matrix whose columns are samples, so with repeated or
    unsorted labels its target is an unrelated sample (documented deviation in ``docs/losses.md``). A
    batch with a single label gives 0. Takes no miner and no reference set; needs a similarity.
    """

    accepts_ref = False
    defaults: ClassVar[dict[str, Any]] = {"distance": "cosine", "reduction": "mean"}
    allowed_distances = SIMILARITIES
    distance_reason = "the logits are scaled similarities"

    def configure(self, gamma: float = 64.0) -> None:
        self.gamma = float(gamma)

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        logits = self.gamma * self.matrix(batch)
        labels, same = batch.labels, batch.same_labels()
        # Column j represents a class iff j is its label's first sample; the target of row i is the first
        # sample of y_i. Both from the B × B label mask, so no torch.unique (no device sync).
        first_of_class = same.int().argmax(dim=1)
        is_first = first_of_class == torch.arange(labels.shape[0], device=labels.device)
        logits = logits.masked_fill(~is_first.unsqueeze(0), torch.finfo(logits.dtype).min)
        losses = F.cross_entropy(logits, first_of_class, reduction="none")
        return self.reduce(losses)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, " + super().extra_repr()
