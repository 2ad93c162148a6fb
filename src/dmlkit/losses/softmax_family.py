"""Losses built on a (soft) log-sum-exp over each anchor's pairs."""

from __future__ import annotations

import torch

from dmlkit.errors import ConfigError
from dmlkit.losses.base import MatrixPairLoss, farther_by, masked_logsumexp, register


@register("multisimilarity")
class MultiSimilarityLoss(MatrixPairLoss):
    """Multi-similarity loss (Wang et al., "Multi-Similarity Loss with General Pair Weighting for Deep
    Metric Learning", CVPR 2019; PML ``MultiSimilarityLoss``).

    Per anchor ``i`` with similarities ``S_ij``, positives ``P_i`` and negatives ``N_i``::

        L_i = 1/α · log(1 + Σ_{j∈P_i} exp(−α (S_ij − λ))) + 1/β · log(1 + Σ_{j∈N_i} exp(β (S_ij − λ)))

    with ``λ = base``; a term is 0 when its set is empty. For a distance the signs flip (``d − λ`` for
    positives). ``L`` is the mean over all anchors, those without pairs included. Mined pairs restrict
    ``P_i``/``N_i`` (a pair mined twice counts once).
    """

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 50.0,
        base: float = 0.5,
        distance: str = "cosine",
        normalize_embeddings: bool = True,
        reduction: str = "mean",
    ) -> None:
        super().__init__(distance, normalize_embeddings, reduction)
        if alpha <= 0 or beta <= 0:
            raise ConfigError(f"multisimilarity: alpha and beta must be > 0, got alpha={alpha}, beta={beta}")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.base = float(base)

    def matrix_loss(self, mat: torch.Tensor, pos_mask: torch.Tensor, neg_mask: torch.Tensor) -> torch.Tensor:
        sim = self.is_similarity
        pos_exp = farther_by(mat, self.base, sim)
        neg_exp = farther_by(self.base, mat, sim)
        pos_loss = (1.0 / self.alpha) * masked_logsumexp(self.alpha * pos_exp, pos_mask)
        neg_loss = (1.0 / self.beta) * masked_logsumexp(self.beta * neg_exp, neg_mask)
        return pos_loss + neg_loss

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, base={self.base}, " + super().extra_repr()
