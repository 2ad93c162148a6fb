"""Pair- and triplet-based losses, each one formula over the bases of :mod:`dmlkit.losses.base`."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from dmlkit.losses.base import PairLoss, TripletLoss, farther_by, register
from dmlkit.miners.tuples import IndicesTuple, paired_distance


@register("contrastive")
class ContrastiveLoss(PairLoss):
    """Contrastive loss (Hadsell, Chopra & LeCun, CVPR 2006; PML ``ContrastiveLoss``).

    For a distance ``d``: ``L⁺ = [d − m⁺]₊`` on positive pairs and ``L⁻ = [m⁻ − d]₊`` on negative pairs;
    for a similarity ``s``: ``[m⁺ − s]₊`` and ``[s − m⁻]₊``. Each set is reduced (``avg_non_zero`` by
    default) and the two are summed.
    """

    def __init__(
        self,
        pos_margin: float = 0.0,
        neg_margin: float = 1.0,
        distance: str = "euclidean",
        normalize_embeddings: bool = True,
        reduction: str = "avg_non_zero",
    ) -> None:
        super().__init__(distance, normalize_embeddings, reduction)
        self.pos_margin = float(pos_margin)
        self.neg_margin = float(neg_margin)

    def pair_losses(self, pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sim = self.is_similarity
        return (
            F.relu(farther_by(pos, self.pos_margin, sim)),
            F.relu(farther_by(self.neg_margin, neg, sim)),
        )


@register("triplet")
class TripletMarginLoss(TripletLoss):
    """Triplet margin loss (Weinberger & Saul, JMLR 2009; Schroff et al., FaceNet, CVPR 2015; PML
    ``TripletMarginLoss``).

    ``L = [d(a,p) − d(a,n) + margin]₊`` (``softplus`` instead of ``[·]₊`` when ``smooth_loss``; similarities
    enter as ``s(a,n) − s(a,p)``). With ``swap`` (Balntas et al., BMVC 2016) ``d(a,n)`` is replaced by the
    smaller of ``d(a,n)`` and ``d(p,n)``. Reduced with ``avg_non_zero`` by default.
    """

    def __init__(
        self,
        margin: float = 0.05,
        swap: bool = False,
        smooth_loss: bool = False,
        triplets_per_anchor: int | Literal["all"] = "all",
        distance: str = "euclidean",
        normalize_embeddings: bool = True,
        reduction: str = "avg_non_zero",
    ) -> None:
        super().__init__(distance, normalize_embeddings, reduction, triplets_per_anchor)
        self.margin = float(margin)
        self.swap = bool(swap)
        self.smooth_loss = bool(smooth_loss)

    def compute_loss(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: IndicesTuple | None,
        ref_emb: torch.Tensor | None,
        ref_labels: torch.Tensor | None,
    ) -> torch.Tensor:
        a, p, n = self.triplets(indices_tuple, labels, ref_labels)
        mat = self.distance_matrix(embeddings, ref_emb)
        ap, an = mat[a, p], mat[a, n]
        sim = self.is_similarity
        if self.swap:
            # p and n index the reference set, so d(p, n) is a reference-to-reference distance; PML
            # reads mat[p, n], which is only right when the reference set is the batch.
            if ref_emb is None:
                pn = mat[p, n]
            else:
                pn = paired_distance(ref_emb[p], ref_emb[n], self.distance, self.normalize_embeddings)  # type: ignore[arg-type]
            an = torch.maximum(an, pn) if sim else torch.minimum(an, pn)
        violation = farther_by(ap, an, sim) + self.margin
        losses = F.softplus(violation) if self.smooth_loss else F.relu(violation)
        self.record(num_triplets=a.numel(), num_active_triplets=(losses > 0).sum())
        return self.reduce(losses)
