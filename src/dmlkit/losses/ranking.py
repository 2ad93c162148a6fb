"""Ranking- and histogram-based losses (list-wise objectives over the distance ranking).

Each works on the query × reference matrix of one distance and the label masks; none builds pair index
lists without a miner. PML's versions of these losses refuse ``ref_emb``; here every one of them accepts
a reference set (each query ranks the reference set instead of the rest of the batch).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch

from dmlkit.errors import ConfigError
from dmlkit.losses.base import (
    PAIRS_AND_TRIPLETS,
    SIMILARITIES,
    BaseLoss,
    Batch,
    anchor_weights,
    register,
)
from dmlkit.tuples import pair_masks


def _linear_histogram(
    values: torch.Tensor, weights: torch.Tensor, lowest: float, width: float, num_nodes: int
) -> torch.Tensor:
    """Row-wise soft histogram with triangular (linear-interpolation) kernels on evenly spaced nodes.

    Node ``k`` sits at ``lowest + k·width``; a value ``v`` between nodes ``r`` and ``r + 1`` adds
    ``weight · (1 − t)`` to node ``r`` and ``weight · t`` to node ``r + 1``, ``t = (v − node_r) / width``:
    exactly ``Σ_v weight · [1 − |v − node_k| / width]₊``, but in O(values) instead of O(values × nodes).
    Values beyond the last node give their mass to it (their ``t`` part falls off the end).
    Returns ``values.shape[:-1] + (num_nodes,)``.
    """
    pos = (values - lowest) / width
    r = pos.detach().floor().clamp(0, num_nodes - 1)
    t = pos - r
    r = r.long()
    out = values.new_zeros(*values.shape[:-1], num_nodes + 1)
    out = out.scatter_add(-1, r, weights * (1 - t)).scatter_add(-1, r + 1, weights * t)
    return out[..., :num_nodes]


@register("fastap")
class FastAPLoss(BaseLoss):
    """FastAP (Cakir et al., "Deep Metric Learning to Rank", CVPR 2019; PML ``FastAPLoss``).

    Distances to the reference set are soft-binned into ``num_bins`` bins (triangular kernels on
    ``num_bins + 1`` evenly spaced nodes over ``[0, 2^p]``, ``p = 1`` for ``euclidean`` and ``p = 2`` for
    ``squared_euclidean`` on unit vectors). With ``h⁺_k``/``h_k`` the query's positive/all histograms and
    ``H⁺_k``/``H_k`` their cumulative sums::

        FastAP_i = 1/|P_i| Σ_k h⁺_k H⁺_k / H_k  (terms with h⁺_k H⁺_k = 0 or H_k = 0 dropped),
        L_i = (1 − FastAP_i) · w_i

    over queries with a positive, reduced with ``mean`` (PML). A miner's output only weights the queries
    (``w_i = c_i / max c``, PML ``convert_to_weights``); without one ``w_i = 1``.

    Statistics: ``num_anchors`` (queries with a positive).
    """

    tuple_kinds = PAIRS_AND_TRIPLETS
    defaults: ClassVar[dict[str, Any]] = {"distance": "squared_euclidean", "reduction": "mean"}
    allowed_distances = ("euclidean", "squared_euclidean")
    distance_reason = "the bins span the distance range"

    def configure(self, num_bins: int = 10) -> None:
        if not self.normalize_embeddings:
            raise ConfigError("fastap: normalize_embeddings must be True (the bins span [0, 2^p])")
        if int(num_bins) < 1:
            raise ConfigError(f"fastap: num_bins must be ≥ 1, got {num_bins}")
        self.num_bins = int(num_bins)

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        mat = self.matrix(batch)
        pos_mask, neg_mask = batch.label_masks()
        pos, neg = pos_mask.to(mat.dtype), neg_mask.to(mat.dtype)
        highest = 4.0 if self.distance == "squared_euclidean" else 2.0
        width = highest / self.num_bins
        pos_hist = _linear_histogram(mat, pos, 0.0, width, self.num_bins + 1)
        all_hist = pos_hist + _linear_histogram(mat, neg, 0.0, width, self.num_bins + 1)
        cum_pos, cum_all = pos_hist.cumsum(dim=1), all_hist.cumsum(dim=1)
        product = pos_hist * cum_pos
        keep = (product > 0) & (cum_all > 0)
        fast_ap = torch.where(keep, product / cum_all.masked_fill(~keep, 1.0), torch.zeros_like(product))
        num_pos = pos_mask.sum(dim=1)
        has_pos = num_pos > 0
        fast_ap = fast_ap.sum(dim=1) / num_pos.clamp_min(1).to(mat.dtype)
        # Without negatives H_k = H⁺_k and FastAP = Σ_k h⁺_k / |P| = 1 exactly (the kernels sum to 1 over
        # the nodes), a constant: the rounding of the soft histogram must not leak into the loss.
        fast_ap = torch.where(neg_mask.any(dim=1), fast_ap, torch.ones_like(fast_ap))
        losses = (1 - fast_ap) * anchor_weights(batch, fast_ap)
        # PML returns 0 when no histogram term survives (distances outside the bins); kept, sync-free.
        has_pos = has_pos & keep.any()
        self.record(num_anchors=has_pos.sum())
        return self.reduce(losses, "anchors", mask=has_pos)

    def extra_repr(self) -> str:
        return f"num_bins={self.num_bins}, " + super().extra_repr()


@register("ranked_list")
class RankedListLoss(BaseLoss):
    """Ranked list loss (Wang et al., "Ranked List Loss for Deep Metric Learning", CVPR 2019; PML
    ``RankedListLoss``).

    For query ``i`` with distances ``d_ij``: positives farther than ``α − m`` and negatives closer than
    ``α`` (and at a non-zero distance, as in PML) are the violating sets ``P*_i``, ``N*_i``, weighted by
    ``w_j = exp(T_p (d_ij − (α − m)))`` and ``w_j = exp(T_n (α − d_ij))``::

        L_P = Σ_{P*} w_j (d_ij − (α − m)) / (Σ_{P*} w_j + 10⁻⁵ R)
        L_N = Σ_{N*} w_j (α − d_ij) / (Σ_{N*} w_j + 10⁻⁵ R)
        L_i = (1 − imbalance) · L_P + imbalance · L_N

    (``R``: reference-set size; the ``10⁻⁵`` per reference is PML's guard). The weights are not detached
    (PML). ``α = 1 + margin/2`` when not given; ``T_p = 0`` is PML's "RLL-Simpler". Mean over all queries.
    PML has no defaults for ``margin`` and ``Tn``: ``margin=0.4`` (giving ``α = 1.2``) and ``Tn=10`` are
    the paper's settings. Needs a distance; takes no miner.

    Statistics: ``num_pos_pairs``, ``num_neg_pairs`` (pairs in the violating sets).
    """

    defaults: ClassVar[dict[str, Any]] = {"distance": "euclidean", "reduction": "mean"}
    allowed_distances = ("euclidean", "squared_euclidean")
    distance_reason = "it ranks distances"

    def configure(
        self,
        margin: float = 0.4,
        Tn: float = 10.0,
        imbalance: float = 0.5,
        alpha: float | None = None,
        Tp: float = 0.0,
    ) -> None:
        if not 0 <= imbalance <= 1:
            raise ConfigError(f"ranked_list: imbalance must be in [0, 1], got {imbalance}")
        self.margin = float(margin)
        self.Tn = float(Tn)
        self.imbalance = float(imbalance)
        self.alpha = 1.0 + self.margin / 2 if alpha is None else float(alpha)
        self.Tp = float(Tp)

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        mat = self.matrix(batch)
        pos_mask, neg_mask = batch.label_masks()
        pos_boundary = self.alpha - self.margin
        nonzero = mat > 0
        pos_sel = pos_mask & (mat > pos_boundary) & nonzero
        neg_sel = neg_mask & (mat < self.alpha) & nonzero
        zeros = torch.zeros_like(mat)
        # exp only of selected entries (others would overflow for unnormalised embeddings: 0·inf = NaN).
        pos_gap = torch.where(pos_sel, mat - pos_boundary, zeros)
        neg_gap = torch.where(neg_sel, self.alpha - mat, zeros)
        w_pos = torch.where(pos_sel, torch.exp(self.Tp * pos_gap), zeros)
        w_neg = torch.where(neg_sel, torch.exp(self.Tn * neg_gap), zeros)
        # PML's guard is 1e-5 × the reference size: with exclusions, the size each anchor sees
        guard = 1e-5 * (mat.shape[1] if batch.exclude is None else (~batch.exclude).sum(1))
        loss_pos = (w_pos * pos_gap).sum(dim=1) / (w_pos.sum(dim=1) + guard)
        loss_neg = (w_neg * neg_gap).sum(dim=1) / (w_neg.sum(dim=1) + guard)
        self.record(num_pos_pairs=pos_sel.sum(), num_neg_pairs=neg_sel.sum())
        return self.reduce((1 - self.imbalance) * loss_pos + self.imbalance * loss_neg)

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, Tn={self.Tn}, imbalance={self.imbalance}, alpha={self.alpha}, "
            f"Tp={self.Tp}, " + super().extra_repr()
        )


@register("histogram")
class HistogramLoss(BaseLoss):
    """Histogram loss (Ustinova & Lempitsky, "Learning Deep Embeddings with Histogram Loss", NeurIPS
    2016; PML ``HistogramLoss``).

    Cosine similarities of the positive and of the negative pairs are soft-binned (triangular kernels on
    ``n_bins + 1`` nodes spaced ``delta = 2 / n_bins`` apart over ``[−1, 1]``) into densities ``p⁺``,
    ``p⁻`` (each summing to 1)::

        L = Σ_r p⁻_r Φ⁺_r,  Φ⁺_r = Σ_{q ≤ r} p⁺_q

    the probability that a random negative pair is more similar than a random positive one. The pairs are
    those of the triplets (all of them, or the miner's; pairs are joined into triplets): a positive pair
    counts if its anchor has a negative and vice versa, each unordered pair once when the reference set is
    the batch (PML). ``n_bins=100`` when neither ``n_bins`` nor ``delta`` is given. The loss is a single
    number (``reduction`` has nothing to reduce); 0 without any triplet. Needs ``cosine``.

    Statistics: ``num_pos_pairs``, ``num_neg_pairs``.
    """

    tuple_kinds = PAIRS_AND_TRIPLETS
    defaults: ClassVar[dict[str, Any]] = {"distance": "cosine", "reduction": "mean"}
    allowed_distances = ("cosine",)
    distance_reason = "the bins span [-1, 1]"

    def configure(self, n_bins: int | None = None, delta: float | None = None) -> None:
        if n_bins is not None and delta is not None and delta != 2 / n_bins:
            raise ConfigError(f"histogram: need delta = 2 / n_bins, got delta={delta}, n_bins={n_bins}")
        if n_bins is None and delta is None:
            n_bins = 100
        self.delta = float(delta) if delta is not None else 2 / int(n_bins)  # type: ignore[arg-type]
        self.n_bins = round(2 / self.delta)
        if self.n_bins < 1 or self.delta <= 0:
            raise ConfigError(f"histogram: n_bins must be ≥ 1 and delta > 0, got delta={self.delta}")

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        mat = self.matrix(batch)
        if batch.indices_tuple is None:
            pos_mask, neg_mask = batch.label_masks()
            has_pos, has_neg = pos_mask.any(dim=1, keepdim=True), neg_mask.any(dim=1, keepdim=True)
            pos_pairs, neg_pairs = pos_mask & has_neg, neg_mask & has_pos
            any_triplet = (has_pos & has_neg).any()
        else:
            a, p, n = batch.to_triplets()
            pos_pairs, neg_pairs = pair_masks((a, p, a, n), tuple(mat.shape), mat.device)  # type: ignore[arg-type]
            any_triplet = torch.tensor(a.numel() > 0, device=mat.device)
        if batch.own_reference:
            # (i, j) and (j, i) are the same pair: keep each once, in the upper triangle.
            pos_pairs = (pos_pairs | pos_pairs.T).triu()
            neg_pairs = (neg_pairs | neg_pairs.T).triu()
        p_pos = self._density(mat, pos_pairs)
        p_neg = self._density(mat, neg_pairs)
        loss = (p_neg * p_pos.cumsum(dim=0)).sum()
        loss = torch.where(any_triplet, loss, torch.zeros_like(loss))
        self.record(num_pos_pairs=pos_pairs.sum(), num_neg_pairs=neg_pairs.sum())
        return self.reduce(loss.reshape(1))

    def _density(self, mat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = mask.to(mat.dtype).flatten()
        hist = _linear_histogram(mat.flatten(), weights, -1.0, self.delta, self.n_bins + 1)
        return hist / weights.sum().clamp_min(1)

    def extra_repr(self) -> str:
        return f"n_bins={self.n_bins}, delta={self.delta}, " + super().extra_repr()


PNP_VARIANTS = ("Ds", "Dq", "Iu", "Ib", "O")


@register("pnp")
class PNPLoss(BaseLoss):
    """Rethinking the optimization of average precision, PNP loss (Li et al., "Rethinking the
    Optimization of Average Precision: Only Penalizing Negative Instances before Positive Ones is
    Enough", AAAI 2022; PML ``PNPLoss``).

    For query ``i`` and each of its positives ``j`` (the query itself included when the reference set is
    the batch and ``i`` has another positive, as in PML), the smoothed number of negatives ranked before
    ``j`` is ``R_ij = Σ_{k∈N_i} σ((s_ik − s_ij) / anneal)`` (``σ``'s argument clamped to ±50, PML). Then::

        L_i = 1/|P_i| Σ_{j∈P_i} f(R_ij)   (1 − that for Dq)
        f = R (O), log(1 + R) (Ds), (1 + R)^−α (Dq), (1 + R) log(1 + R) (Iu), (bR − log(1 + bR)) / b² (Ib)

    over queries with a positive, reduced with ``mean`` (PML). Needs a similarity; takes no miner.
    Materialises a ``B × R × R`` tensor (as PML does for ``R = B``).

    Statistics: ``num_anchors`` (queries with a positive).
    """

    defaults: ClassVar[dict[str, Any]] = {"distance": "cosine", "reduction": "mean"}
    allowed_distances = SIMILARITIES
    distance_reason = "it ranks by similarity"

    def configure(
        self,
        b: float = 2.0,
        alpha: float = 1.0,
        anneal: float = 0.01,
        variant: Literal["Ds", "Dq", "Iu", "Ib", "O"] = "O",
    ) -> None:
        if variant not in PNP_VARIANTS:
            raise ConfigError(f"pnp: variant must be one of {list(PNP_VARIANTS)}, got {variant!r}")
        if anneal <= 0:
            raise ConfigError(f"pnp: anneal must be > 0, got {anneal}")
        self.b = float(b)
        self.alpha = float(alpha)
        self.anneal = float(anneal)
        self.variant = variant

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        sim = self.matrix(batch)
        pos_mask, neg_mask = batch.label_masks()
        if batch.own_reference:
            eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
            pos_mask = pos_mask | (eye & pos_mask.any(dim=1, keepdim=True))
        # before[i, j, k] = σ((s_ik − s_ij) / anneal): how much negative k is ranked before j for query i.
        diff = (sim.unsqueeze(1) - sim.unsqueeze(2)) / self.anneal
        before = torch.sigmoid(diff.clamp(-50.0, 50.0))
        rank = torch.where(neg_mask.unsqueeze(1), before, torch.zeros_like(before)).sum(dim=2)
        penalty = self._transform(rank)
        num_pos = pos_mask.sum(dim=1)
        has_pos = num_pos > 0
        losses = torch.where(pos_mask, penalty, torch.zeros_like(penalty)).sum(dim=1)
        losses = losses / num_pos.clamp_min(1).to(sim.dtype)
        if self.variant == "Dq":
            losses = 1 - losses
        self.record(num_anchors=has_pos.sum())
        return self.reduce(losses, "anchors", mask=has_pos)

    def _transform(self, rank: torch.Tensor) -> torch.Tensor:
        if self.variant == "Ds":
            return torch.log1p(rank)
        if self.variant == "Dq":
            return (1 + rank).pow(-self.alpha)
        if self.variant == "Iu":
            return (1 + rank) * torch.log1p(rank)
        if self.variant == "Ib":
            b = self.b
            return (b * rank - torch.log1p(b * rank)) / b**2
        return rank

    def extra_repr(self) -> str:
        return (
            f"variant={self.variant!r}, b={self.b}, alpha={self.alpha}, anneal={self.anneal}, "
            + super().extra_repr()
        )
