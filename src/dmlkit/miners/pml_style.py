"""Miners that reproduce pytorch-metric-learning's (PML) miners tuple for tuple."""

from __future__ import annotations

import torch

from dmlkit.errors import ConfigError
from dmlkit.miners.base import BaseMiner, register
from dmlkit.miners.tuples import Pairs, Triplets, label_masks


@register("multisimilarity")
class MultiSimilarityMiner(BaseMiner):
    """Multi-similarity pair mining (Wang et al., CVPR 2019, Sec. 3.3; PML ``MultiSimilarityMiner``).

    With similarities ``S``, keep positive pair ``(i, j)`` if ``S_ij − ε < max_{k∈N_i} S_ik`` and negative
    pair ``(i, k)`` if ``S_ik + ε > min_{j∈P_i} S_ij`` (anchors without negatives keep no positives and
    vice versa). For a distance the inequalities flip: positives with ``d_ij + ε > min_{N_i} d`` and
    negatives with ``d_ik − ε < max_{P_i} d``. Outputs pairs.
    """

    output_kind = "pairs"

    def __init__(
        self, epsilon: float = 0.1, distance: str = "cosine", normalize_embeddings: bool = True
    ) -> None:
        super().__init__(distance, normalize_embeddings)
        self.epsilon = float(epsilon)

    def mine(
        self,
        mat: torch.Tensor,
        labels: torch.Tensor,
        ref_labels: torch.Tensor | None,
        embeddings: torch.Tensor,
        ref_emb: torch.Tensor | None,
    ) -> Pairs:
        pos, neg = label_masks(labels, ref_labels)
        inf = torch.inf
        if self.is_similarity:
            hardest_neg = mat.masked_fill(~neg, -inf).amax(dim=1, keepdim=True)
            hardest_pos = mat.masked_fill(~pos, inf).amin(dim=1, keepdim=True)
            hard_pos = pos & (mat - self.epsilon < hardest_neg)
            hard_neg = neg & (mat + self.epsilon > hardest_pos)
        else:
            hardest_neg = mat.masked_fill(~neg, inf).amin(dim=1, keepdim=True)
            hardest_pos = mat.masked_fill(~pos, -inf).amax(dim=1, keepdim=True)
            hard_pos = pos & (mat + self.epsilon > hardest_neg)
            hard_neg = neg & (mat - self.epsilon < hardest_pos)
        a1, p = torch.nonzero(hard_pos, as_tuple=True)
        a2, n = torch.nonzero(hard_neg, as_tuple=True)
        return a1, p, a2, n

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}, " + super().extra_repr()


@register("batch_hard")
class BatchHardMiner(BaseMiner):
    """Batch-hard triplet mining (Hermans, Beyer & Leibe, "In Defense of the Triplet Loss for Person
    Re-Identification", 2017; PML ``BatchHardMiner``).

    For every anchor that has a positive and a negative: its farthest positive and its closest negative
    (largest/smallest similarity for ``cosine``/``dot``), giving one triplet per anchor. Candidates whose
    value lies outside ``allowed_pos_range`` / ``allowed_neg_range`` (inclusive ``(low, high)``) are
    ignored. Ties go to the lowest index. Outputs triplets.
    """

    output_kind = "triplets"

    def __init__(
        self,
        distance: str = "euclidean",
        normalize_embeddings: bool = True,
        allowed_pos_range: tuple[float, float] | None = None,
        allowed_neg_range: tuple[float, float] | None = None,
    ) -> None:
        super().__init__(distance, normalize_embeddings)
        self.allowed_pos_range = _check_range(allowed_pos_range, "allowed_pos_range")
        self.allowed_neg_range = _check_range(allowed_neg_range, "allowed_neg_range")

    def mine(
        self,
        mat: torch.Tensor,
        labels: torch.Tensor,
        ref_labels: torch.Tensor | None,
        embeddings: torch.Tensor,
        ref_emb: torch.Tensor | None,
    ) -> Triplets:
        pos, neg = label_masks(labels, ref_labels)
        if self.allowed_pos_range is not None:
            pos &= _in_range(mat, self.allowed_pos_range)
        if self.allowed_neg_range is not None:
            neg &= _in_range(mat, self.allowed_neg_range)
        inf = torch.inf
        if self.is_similarity:
            _, p = mat.masked_fill(~pos, inf).min(dim=1)
            _, n = mat.masked_fill(~neg, -inf).max(dim=1)
        else:
            _, p = mat.masked_fill(~pos, -inf).max(dim=1)
            _, n = mat.masked_fill(~neg, inf).min(dim=1)
        a = torch.nonzero(pos.any(dim=1) & neg.any(dim=1), as_tuple=True)[0]
        return a, p[a], n[a]

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", allowed_pos_range={self.allowed_pos_range}, allowed_neg_range={self.allowed_neg_range}"
        )


def _check_range(value: tuple[float, float] | None, name: str) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a (low, high) pair of numbers, got {value!r}") from None
    if low > high:
        raise ConfigError(f"{name} must have low <= high, got {value!r}")
    return low, high


def _in_range(mat: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    return (mat >= bounds[0]) & (mat <= bounds[1])
