"""Proxy-based losses: learnable class proxies/centres compared with embeddings.

Every loss here owns trainable parameters, declared as ``needs = {"num_classes", "embedding_size"}`` so
the trainer supplies both, and initialised as pytorch-metric-learning (PML) initialises them; parameter
names and layouts are PML's (``proxies``: ``num_classes × embedding_size``; ``W``/``fc``:
``embedding_size × …``), so a PML state dict loads as is. Labels must be class indices
``0 … num_classes−1``; anything else is a ``DataError`` naming the offending label.

These losses take no reference set (``accepts_ref = False``). Where PML uses a miner's output, so do
they: as per-sample weights (PML ``convert_to_weights``, see :func:`sample_weights`), hence
``tuple_kinds = {"pairs", "triplets"}``; ``manifold`` takes no miner.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dmlkit.errors import ConfigError, DataError
from dmlkit.losses.base import PAIRS_AND_TRIPLETS, BaseLoss, farther_by, register
from dmlkit.miners.tuples import IndicesTuple, distance_matrix

CLASS_NEEDS: frozenset[str] = frozenset({"num_classes", "embedding_size"})
SIMILARITIES: tuple[str, ...] = ("cosine", "dot")


# ---------------------------------------------------------------------------------------------- helpers


def sample_weights(
    indices_tuple: IndicesTuple | None, batch_size: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """Per-sample weights from a miner's output (PML ``convert_to_weights``), None meaning "all 1".

    ``wᵢ = countᵢ / maxⱼ countⱼ`` where ``countᵢ`` is how often sample ``i`` occurs anywhere in the
    indices tuple (anchors, positives and negatives alike); samples that never occur get 0. An absent or
    empty indices tuple weighs every sample 1.
    """
    if indices_tuple is None:
        return None
    idx = torch.cat([t.reshape(-1).long() for t in indices_tuple])
    if idx.numel() == 0:
        return None
    counts = torch.bincount(idx, minlength=batch_size).to(dtype)
    return counts / counts.max()


def check_class_labels(labels: torch.Tensor, num_classes: int, who: str) -> None:
    """Raise ``DataError`` naming the first label outside ``0 … num_classes−1``.

    One device sync per call (a single ``any``), the price of a readable error instead of an index
    error deep inside a CUDA kernel.
    """
    if labels.numel() == 0:
        return
    bad = (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        label = int(labels[bad][0])
        raise DataError(
            f"{who}: label {label} is not a class index 0..{num_classes - 1} (num_classes={num_classes}); "
            "remap labels to 0..num_classes-1 or raise num_classes"
        )


def check_positive_int(value: object, what: str, who: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value) or value < 1:
        raise ConfigError(f"{who}: {what} must be a positive integer, got {value!r}")
    return int(value)


def check_distance_among(distance: str, allowed: tuple[str, ...], who: str) -> None:
    if distance not in allowed:
        raise ConfigError(f"{who}: distance must be one of {', '.join(map(repr, allowed))}, got {distance!r}")


class ClassLoss(BaseLoss):
    """Base of the losses with one or more learnable vectors per class (proxies, class weights).

    Subclasses implement :meth:`compute_loss`; :meth:`classes` validates the labels and returns the miner
    weights, and :meth:`param` casts a parameter to the embeddings' dtype (differentiably, so the
    parameter keeps its own dtype and receives its gradient in it).
    """

    tuple_kinds: ClassVar[frozenset[str]] = PAIRS_AND_TRIPLETS
    accepts_ref: ClassVar[bool] = False
    needs: ClassVar[frozenset[str]] = CLASS_NEEDS

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        distance: str | None,
        normalize_embeddings: bool,
        reduction: str,
    ) -> None:
        super().__init__(distance, normalize_embeddings, reduction)
        who = self.registry_name or type(self).__name__
        self.num_classes = check_positive_int(num_classes, "num_classes", who)
        self.embedding_size = check_positive_int(embedding_size, "embedding_size", who)

    def classes(
        self, embeddings: torch.Tensor, labels: torch.Tensor, indices_tuple: IndicesTuple | None
    ) -> torch.Tensor | None:
        """Check labels and width; return the miner weights (None: every sample weighs 1)."""
        who = self.registry_name or type(self).__name__
        if embeddings.shape[1] != self.embedding_size:
            raise DataError(
                f"{who}: embeddings have width {embeddings.shape[1]}, the loss was built for "
                f"embedding_size={self.embedding_size}"
            )
        check_class_labels(labels, self.num_classes, who)
        return sample_weights(indices_tuple, embeddings.shape[0], embeddings.dtype)

    @staticmethod
    def param(p: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return p if p.dtype == like.dtype else p.to(like.dtype)

    def weighted_reduce(self, losses: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        return self.reduce(losses if weights is None else losses * weights)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, " + super().extra_repr()
        )


# ---------------------------------------------------------------------------------------------- losses


@register("proxynca")
class ProxyNCALoss(ClassLoss):
    """ProxyNCA (Movshovitz-Attias et al., "No Fuss Distance Metric Learning using Proxies", ICCV 2017;
    PML ``ProxyNCALoss``).

    One proxy ``p_c`` per class; NCA over the proxies with ``softmax_scale = s``::

        L_i = −log( exp(−s·d(x_i, p_{y_i})) / Σ_c exp(−s·d(x_i, p_c)) )

    (``+s·sim`` for a similarity), reduced over samples (``mean``). Default distance: squared euclidean
    between L2-normalised embeddings and proxies (PML ``LpDistance(power=2)``). Proxies
    (``num_classes × embedding_size``) are initialised from ``N(0, 1)`` (PML's default).
    Deviation: PML computes ``softmax`` then ``log`` and drops samples whose target probability underflows
    to exactly 0; we use ``log_softmax`` and keep them (identical otherwise).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        softmax_scale: float = 1.0,
        distance: str = "squared_euclidean",
        normalize_embeddings: bool = True,
        reduction: str = "mean",
    ) -> None:
        super().__init__(num_classes, embedding_size, distance, normalize_embeddings, reduction)
        self.softmax_scale = float(softmax_scale)
        self.proxies = nn.Parameter(torch.empty(self.num_classes, self.embedding_size))
        nn.init.normal_(self.proxies)

    def compute_loss(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: IndicesTuple | None,
        ref_emb: torch.Tensor | None,
        ref_labels: torch.Tensor | None,
    ) -> torch.Tensor:
        weights = self.classes(embeddings, labels, indices_tuple)
        mat = self.distance_matrix(embeddings, self.param(self.proxies, embeddings))
        scale = self.softmax_scale if self.is_similarity else -self.softmax_scale
        losses = F.cross_entropy(scale * mat, labels, reduction="none")
        return self.weighted_reduce(losses, weights)


@register("proxyanchor")
class ProxyAnchorLoss(ClassLoss):
    """Proxy-Anchor loss (Kim et al., "Proxy Anchor Loss for Deep Metric Learning", CVPR 2020; PML
    ``ProxyAnchorLoss``).

    With similarities ``s(x, p)`` between embeddings and proxies, ``X_c⁺`` the batch samples of class
    ``c``, ``X_c⁻`` the others and ``P⁺`` the proxies with at least one sample in the batch::

        L = 1/|P⁺| Σ_{c∈P⁺} log(1 + Σ_{x∈X_c⁺} exp(−α (s(x,p_c) − δ)))
          + 1/|P|  Σ_{c∈P}  log(1 + Σ_{x∈X_c⁻} exp( α (s(x,p_c) + δ)))

    with ``δ = margin`` (for a distance the signs flip as in PML's ``distance.margin``). ``reduction``
    applies to each of the two per-proxy vectors: ``mean`` is the paper's (and PML's) normalisation above,
    ``sum`` drops the divisors, ``avg_non_zero`` divides by the proxies with a non-zero term. With a
    miner's output, ``log wᵢ``-like offsets ``wᵢ − 1`` (PML's miner weights) are added to each exponent.
    Proxies (``num_classes × embedding_size``) are initialised with Kaiming-normal, ``mode="fan_out"``
    (PML's default).

    Statistics: ``num_pos_proxies`` (``|P⁺|``).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 0.1,
        alpha: float = 32.0,
        distance: str = "cosine",
        normalize_embeddings: bool = True,
        reduction: str = "mean",
    ) -> None:
        super().__init__(num_classes, embedding_size, distance, normalize_embeddings, reduction)
        self.margin = float(margin)
        self.alpha = float(alpha)
        self.proxies = nn.Parameter(torch.empty(self.num_classes, self.embedding_size))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def compute_loss(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: IndicesTuple | None,
        ref_emb: torch.Tensor | None,
        ref_labels: torch.Tensor | None,
    ) -> torch.Tensor:
        weights = self.classes(embeddings, labels, indices_tuple)
        mat = self.distance_matrix(embeddings, self.param(self.proxies, embeddings))  # B × C
        sim = self.is_similarity
        pos_mask = F.one_hot(labels, self.num_classes).bool()
        # One exponent matrix for both terms: every (sample, proxy) entry is either a positive or a
        # negative, so the two masked log-sum-exps read disjoint entries of the same matrix.
        exps = self.alpha * torch.where(
            pos_mask, farther_by(mat, self.margin, sim), farther_by(-self.margin, mat, sim)
        )
        if weights is not None:
            exps = exps + (weights - 1).unsqueeze(1)
        pos_term = _column_logsumexp_add_one(exps, pos_mask)
        neg_term = _column_logsumexp_add_one(exps, ~pos_mask)
        num_pos = pos_mask.any(0).sum()
        self.record(num_pos_proxies=num_pos)
        if self.reduction == "mean":
            return pos_term.sum() / num_pos.clamp_min(1) + neg_term.sum() / self.num_classes
        return self.reduce(pos_term) + self.reduce(neg_term)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, alpha={self.alpha}, " + super().extra_repr()


def _column_logsumexp_add_one(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Column-wise ``log(1 + Σ_{i: mask[i,c]} exp(x[i,c]))``; 0 for a column with an empty mask.

    The shift ``m = max(0, max_i x)`` keeps every ``exp`` ≤ 1; masked entries are excluded by ``where``
    (their gradient is exactly 0), and an empty column gives ``log(exp(0)) + 0 = 0``.
    """
    masked = x.masked_fill(~mask, float("-inf"))
    shift = masked.amax(0).clamp_min(0).detach()
    total = torch.exp(masked - shift).sum(0) + torch.exp(-shift)
    return torch.log(total) + shift


@register("softtriple")
class SoftTripleLoss(ClassLoss):
    """SoftTriple loss (Qian et al., "SoftTriple Loss: Deep Metric Learning Without Triplet Sampling",
    ICCV 2019; PML ``SoftTripleLoss``).

    ``K = centers_per_class`` centres ``w_c^k`` per class; the relaxed class similarity is a softmax
    (temperature ``γ = gamma``) over a class's centres::

        S_{i,c} = Σ_k softmax_k(s(x_i, w_c^k) / γ) · s(x_i, w_c^k)
        L_i = −log( exp(λ (S_{i,y_i} − δ)) / (exp(λ (S_{i,y_i} − δ)) + Σ_{c≠y_i} exp(λ S_{i,c})) )

    with ``λ = la``, ``δ = margin``, ``s`` the cosine (or ``dot``) similarity; reduced over samples
    (``mean``). As in PML, the paper's centre-merging regulariser (``τ``) is not included. Centres
    ``fc`` (``embedding_size × num_classes·K``, class ``c`` owning columns ``c·K … c·K+K−1``) are
    initialised with Kaiming-uniform, ``a=√5`` (PML's default).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        centers_per_class: int = 10,
        la: float = 20.0,
        gamma: float = 0.1,
        margin: float = 0.01,
        distance: str = "cosine",
        normalize_embeddings: bool = True,
        reduction: str = "mean",
    ) -> None:
        super().__init__(num_classes, embedding_size, distance, normalize_embeddings, reduction)
        check_distance_among(distance, SIMILARITIES, "softtriple")
        if gamma <= 0:
            raise ConfigError(f"softtriple: gamma must be > 0, got {gamma}")
        self.centers_per_class = check_positive_int(centers_per_class, "centers_per_class", "softtriple")
        self.la = float(la)
        self.gamma = float(gamma)
        self.margin = float(margin)
        self.fc = nn.Parameter(torch.empty(self.embedding_size, self.num_classes * self.centers_per_class))
        nn.init.kaiming_uniform_(self.fc, a=math.sqrt(5))

    def compute_loss(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: IndicesTuple | None,
        ref_emb: torch.Tensor | None,
        ref_labels: torch.Tensor | None,
    ) -> torch.Tensor:
        weights = self.classes(embeddings, labels, indices_tuple)
        sims = self.distance_matrix(embeddings, self.param(self.fc, embeddings).t())
        sims = sims.view(-1, self.num_classes, self.centers_per_class)
        attention = torch.softmax(sims * (1.0 / self.gamma), dim=2)
        class_sims = (attention * sims).sum(2)
        logits = self.la * class_sims
        if self.margin != 0:
            target = logits.gather(1, labels.unsqueeze(1))
            logits = logits.scatter(1, labels.unsqueeze(1), target - self.la * self.margin)
        losses = F.cross_entropy(logits, labels, reduction="none")
        return self.weighted_reduce(losses, weights)

    def extra_repr(self) -> str:
        return (
            f"centers_per_class={self.centers_per_class}, la={self.la}, gamma={self.gamma}, "
            f"margin={self.margin}, " + super().extra_repr()
        )


@register("normsoftmax")
class NormalizedSoftmaxLoss(ClassLoss):
    """Normalised softmax (Zhai & Wu, "Classification is a Strong Baseline for Deep Metric Learning",
    BMVC 2019; Roth et al.'s ``softmax`` criterion; PML ``NormalizedSoftmaxLoss``).

    Cross-entropy over temperature-scaled similarities to L2-normalised class weights ``ŵ_c``::

        L_i = −log( exp(s(x_i, ŵ_{y_i}) / T) / Σ_c exp(s(x_i, ŵ_c) / T) )

    with ``T = temperature`` (``−d/T`` for a distance); reduced over samples (``mean``). The default
    ``dot`` on normalised embeddings is the cosine (PML ``DotProductSimilarity()``). Class weights ``W``
    (``embedding_size × num_classes``) are initialised from ``N(0, 1)`` (PML's default) and normalised
    in every forward pass.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        temperature: float = 0.05,
        distance: str = "dot",
        normalize_embeddings: bool = True,
        reduction: str = "mean",
    ) -> None:
        super().__init__(num_classes, embedding_size, distance, normalize_embeddings, reduction)
        if temperature <= 0:
            raise ConfigError(f"normsoftmax: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.W = nn.Parameter(torch.empty(self.embedding_size, self.num_classes))
        nn.init.normal_(self.W)

    def compute_loss(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: IndicesTuple | None,
        ref_emb: torch.Tensor | None,
        ref_labels: torch.Tensor | None,
    ) -> torch.Tensor:
        weights = self.classes(embeddings, labels, indices_tuple)
        classes = F.normalize(self.param(self.W, embeddings), p=2, dim=0).t()
        mat = self.distance_matrix(embeddings, classes)
        scale = 1.0 / self.temperature if self.is_similarity else -1.0 / self.temperature
        losses = F.cross_entropy(mat * scale, labels, reduction="none")
        return self.weighted_reduce(losses, weights)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, " + super().extra_repr()


@register("manifold")
class ManifoldLoss(ClassLoss):
    """Manifold proxy loss (Aziere & Todorovic, "Ensemble Deep Manifold Similarity Learning using Hard
    Proxies", CVPR 2019; PML ``ManifoldLoss``).

    Embeddings ``x_1…x_N`` and proxies ``p_1…p_K`` form a graph with affinities
    ``S_uv = exp(2·max(s(u,v), 0))`` (``S_uu = 0``); with ``D = diag(Σ_v S_uv)`` and
    ``S̄ = D^{−½} S D^{−½}``, the random-walk manifold similarity is ``F = (1−α)(I − α S̄)^{−1}``. With
    ``y_i`` the proxy of sample ``i`` and ``[·]`` the gate that keeps only non-negative exponents::

        L_i^int = log(1 + Σ_{k≠y_i} [e_ik ≥ 0] exp(e_ik)),   e_ik = F_{i,N+k} − F_{i,N+y_i} + m
        L_i^ctx = same with cos(F_i, F_{N+k}) (cosine between rows of F) in place of F_{i,N+k}
        L = mean_i (L_i^int + λ_C · L_i^ctx)

    with ``m = margin``, ``λ_C = lambdaC`` (``inf``: the context term alone).

    Deviations from PML (documented in docs/losses.md): PML's ``l`` and ``K`` are ``embedding_size`` and
    ``num_classes`` here (one proxy per class), and the labels are the proxy assignment ``y_i`` (PML
    takes no labels: it reads the assignment from ``indices_tuple`` or draws it at random); the matrix
    inverse is computed in the input dtype (PML always inverts in float32); ``lambdaC=inf`` gives the
    context loss (PML returns ``inf``). Proxies ``proxies`` (``num_classes × embedding_size``) are drawn
    from ``N(0, 1)`` as in PML. Takes no miner output.
    """

    tuple_kinds: ClassVar[frozenset[str]] = frozenset()

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        lambdaC: float = 1.0,  # noqa: N803 (PML's name)
        alpha: float = 0.8,
        margin: float = 5e-4,
        distance: str = "cosine",
        normalize_embeddings: bool = True,
        reduction: str = "mean",
    ) -> None:
        super().__init__(num_classes, embedding_size, distance, normalize_embeddings, reduction)
        check_distance_among(distance, SIMILARITIES, "manifold")
        if lambdaC < 0:
            raise ConfigError(f"manifold: lambdaC must be >= 0, got {lambdaC}")
        if not 0 < alpha < 1:
            raise ConfigError(f"manifold: alpha must be in (0, 1), got {alpha}")
        self.lambdaC = float(lambdaC)
        self.alpha = float(alpha)
        self.margin = float(margin)
        self.proxies = nn.Parameter(torch.empty(self.num_classes, self.embedding_size))
        nn.init.normal_(self.proxies)

    def compute_loss(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: IndicesTuple | None,
        ref_emb: torch.Tensor | None,
        ref_labels: torch.Tensor | None,
    ) -> torch.Tensor:
        self.classes(embeddings, labels, None)
        n = embeddings.shape[0]
        nodes = torch.cat([embeddings, self.param(self.proxies, embeddings)], dim=0)
        affinity = torch.exp(self.distance_matrix(nodes, None).clamp_min(0) * 2.0)
        affinity = affinity.masked_fill(torch.eye(len(nodes), dtype=torch.bool, device=nodes.device), 0.0)
        scale = affinity.sum(1).rsqrt()
        normalized = affinity * scale.unsqueeze(1) * scale.unsqueeze(0)
        system = torch.eye(len(nodes), dtype=nodes.dtype, device=nodes.device) - self.alpha * normalized
        manifold = (1.0 - self.alpha) * torch.linalg.inv(system)
        target = labels.unsqueeze(1)
        if self.lambdaC == 0:
            return self.reduce(_manifold_term(manifold[:n, n:], target, self.margin))
        rows = F.normalize(manifold[:n], dim=1) @ F.normalize(manifold[n:], dim=1).t()
        context = _manifold_term(rows, target, self.margin)
        if math.isinf(self.lambdaC):
            return self.reduce(context)
        losses = _manifold_term(manifold[:n, n:], target, self.margin) + self.lambdaC * context
        return self.reduce(losses)

    def extra_repr(self) -> str:
        return f"lambdaC={self.lambdaC}, alpha={self.alpha}, margin={self.margin}, " + super().extra_repr()


def _manifold_term(scores: torch.Tensor, target: torch.Tensor, margin: float) -> torch.Tensor:
    """``log(1 + Σ_{k≠y} [e_k ≥ 0] exp(e_k))`` with ``e_k = scores_k − scores_y + margin``, per row."""
    excess = scores - scores.gather(1, target) + margin
    keep = (excess >= 0).scatter(1, target, False)
    return torch.log1p(torch.exp(excess.masked_fill(~keep, float("-inf"))).sum(1))


__all__ = [
    "CLASS_NEEDS",
    "ClassLoss",
    "ManifoldLoss",
    "NormalizedSoftmaxLoss",
    "ProxyAnchorLoss",
    "ProxyNCALoss",
    "SoftTripleLoss",
    "check_class_labels",
    "sample_weights",
]
