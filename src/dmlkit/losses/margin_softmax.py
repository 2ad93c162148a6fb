"""Classification losses with an angular margin: softmax over cosines to learnable class weights.

All of them follow pytorch-metric-learning's (PML) ``LargeMarginSoftmaxLoss`` scheme: class weights ``W``
(``embedding_size × num_classes``, initialised from ``N(0, 1)`` as in PML; ``SubCenterArcFace`` has
``num_classes·sub_centers`` columns), cosines ``cos θ_{i,c}`` between the embeddings and the columns of
``W``, the target cosine ``cos θ_{i,y_i}`` replaced by ``ψ(θ_{i,y_i})``, logits scaled, then
cross-entropy::

    L_i = −log( exp(s·ψ(θ_{i,y_i})) / (exp(s·ψ(θ_{i,y_i})) + Σ_{c≠y_i} exp(s·cos θ_{i,c})) )

reduced over samples (``mean``). Each loss differs in ``ψ`` and the scale ``s``. They need
``num_classes``/``embedding_size`` (class attribute ``needs``), labels ``0 … num_classes−1`` (a
``DataError`` names an offending label), take no reference set, and use a miner's output as PML does:
as per-sample weights (:func:`dmlkit.losses.proxy.sample_weights`). The distance is always ``cosine``
(PML asserts ``CosineSimilarity``).

Statistics: ``avg_angle``, the mean target angle ``θ_{i,y_i}`` in degrees (PML's ``avg_angle``).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from dmlkit.losses.base import Batch, register
from dmlkit.losses.proxy import ClassLoss, check_positive_int, cosine_matrix


class MarginSoftmaxLoss(ClassLoss):
    """Base of the margin-softmax family.

    Subclasses with a constant logit scale (``arcface``, ``cosface``, ``subcenter_arcface``) define
    :meth:`target_logit_and_slope` and get a fused cross-entropy (:class:`_MarginCrossEntropy`); the
    others define :meth:`target_logit` and :meth:`scale_logits` and go through autograd.
    """

    #: True when the logits are ``scale · (ψ or cos)`` with a constant scale (fused path)
    constant_scale: ClassVar[bool] = False
    defaults: ClassVar[dict[str, Any]] = {"distance": "cosine", "reduction": "mean"}
    class_vectors = ("W", "columns")
    allowed_distances = ("cosine",)

    def configure(self, margin: float, scale: float, weights_per_class: int = 1) -> None:
        """Each loss of the family declares its own defaults of ``margin`` and ``scale`` and hands them on;
        ``weights_per_class``: class vectors per class (the columns of ``W``)."""
        self._target_cos: torch.Tensor | None = None  # the last call's target cosines, for ``avg_angle``
        self.margin = float(margin)
        self.scale = float(scale)
        self.W = nn.Parameter(torch.empty(self.embedding_size, self.num_classes * weights_per_class))
        nn.init.normal_(self.W)

    def cosine(self, embeddings: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``B × num_classes`` cosines between embeddings and class weights (columns of ``weights``)."""
        return cosine_matrix(embeddings, weights, columns=True)

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        """``ψ(θ)`` from the target cosines ``cos θ`` (shape ``(B,)``), differentiably."""
        raise NotImplementedError

    def target_logit_and_slope(self, cos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``ψ`` and ``dψ/d cos θ`` at the target cosines (no graph; the fused path's backward uses them)."""
        raise NotImplementedError

    def scale_logits(
        self, logits: torch.Tensor, embeddings: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        return logits * self.scale

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        embeddings, labels = batch.embeddings, batch.labels
        sample_w = self.classes(batch)
        weights = self.param(self.W, embeddings)
        cos = self.cosine(embeddings, weights)
        target = labels.unsqueeze(1)
        if self.constant_scale:
            with torch.no_grad():
                target_cos = cos.gather(1, target).squeeze(1)
                psi, slope = self.target_logit_and_slope(target_cos)
            losses = _MarginCrossEntropy.apply(cos, labels, psi, slope, self.scale)
        else:
            target_cos = cos.gather(1, target).squeeze(1)
            logits = cos.scatter(1, target, self.target_logit(target_cos).unsqueeze(1))
            losses = F.cross_entropy(self.scale_logits(logits, embeddings, weights), labels, reduction="none")
        self._target_cos = target_cos.detach()
        return self.weighted_reduce(losses, sample_w)

    @property
    def last_stats(self) -> dict[str, float]:
        """Base statistics plus ``avg_angle`` (degrees), computed only when read."""
        stats = super().last_stats
        target_cos = self._target_cos
        if target_cos is not None:
            stats["avg_angle"] = math.degrees(float(torch.acos(target_cos.clamp(-1, 1)).mean()))
        return stats

    def extra_repr(self) -> str:
        return f"margin={self.margin}, scale={self.scale}, " + super().extra_repr()


class _MarginCrossEntropy(torch.autograd.Function):
    """Per-sample ``−log softmax(z)_y`` with ``z = s·cos`` except ``z_y = s·ψ(cos_y)``; fused backward.

    ``∂L_i/∂cos_ic = s·p_ic`` for ``c ≠ y_i`` and ``s·(p_iy − 1)·ψ'(cos_iy)`` for the target, ``p`` the
    softmax of ``z``: a handful of ``B × C`` operations instead of autograd's chain through gather,
    scatter, scaling and cross-entropy.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        cos: torch.Tensor,
        labels: torch.Tensor,
        psi: torch.Tensor,
        slope: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        target = labels.unsqueeze(1)
        logits = (cos * scale).scatter_(1, target, (psi * scale).unsqueeze(1))
        log_probs = torch.log_softmax(logits, dim=1)
        ctx.save_for_backward(log_probs, labels, slope)
        ctx.scale = scale  # type: ignore[attr-defined]
        return log_probs.gather(1, target).squeeze(1).neg()

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor, None, None, None, None]:
        log_probs, labels, slope = ctx.saved_tensors  # type: ignore[attr-defined]
        scaled = grad * ctx.scale  # type: ignore[attr-defined]
        target = labels.unsqueeze(1)
        grad_cos = torch.exp(log_probs).mul_(scaled.unsqueeze(1))
        grad_target = (grad_cos.gather(1, target).squeeze(1) - scaled) * slope
        return grad_cos.scatter_(1, target, grad_target.unsqueeze(1)), None, None, None, None


@register("large_margin_softmax")
class LargeMarginSoftmaxLoss(MarginSoftmaxLoss):
    """Large-margin softmax, L-Softmax (Liu et al., "Large-Margin Softmax Loss for Convolutional Neural
    Networks", ICML 2016; PML ``LargeMarginSoftmaxLoss``).

    With an integer margin ``m`` and ``k = ⌊θ m / π⌋``::

        ψ(θ) = (−1)^k cos(mθ) − 2k,      logits = ‖x_i‖ ‖W_c‖ · s · (ψ or cos θ)

    ``cos(mθ)`` is the Chebyshev polynomial ``T_m(cos θ)`` (the paper's Eq. 7), so no ``acos`` enters the
    gradient; ``k`` is piecewise constant (no gradient), as in PML. Scale ``s = scale``.
    """

    def configure(self, margin: int = 4, scale: float = 1.0) -> None:  # type: ignore[override]
        self.int_margin = check_positive_int(margin, "margin", self.who)
        super().configure(self.int_margin, scale)

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        m = self.int_margin
        chebyshev_prev, chebyshev = torch.ones_like(cos), cos
        for _ in range(m - 1):  # T_{n+1} = 2c·T_n − T_{n−1}: a loop over the margin's degree, not the data
            chebyshev_prev, chebyshev = chebyshev, 2.0 * cos * chebyshev - chebyshev_prev
        with torch.no_grad():
            k = torch.floor(torch.acos(cos.clamp(-1, 1)) * (m / math.pi))
            sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
        return sign * chebyshev - 2.0 * k

    def scale_logits(
        self, logits: torch.Tensor, embeddings: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        norms = embeddings.norm(dim=1).unsqueeze(1) * weights.norm(dim=0).unsqueeze(0)
        return logits * norms * self.scale


@register("sphereface")
class SphereFaceLoss(LargeMarginSoftmaxLoss):
    """SphereFace, A-Softmax (Liu et al., "SphereFace: Deep Hypersphere Embedding for Face Recognition",
    CVPR 2017; PML ``SphereFaceLoss``).

    L-Softmax's ``ψ(θ) = (−1)^k cos(mθ) − 2k`` with normalised class weights: the logits are
    ``‖x_i‖ · s · (ψ or cos θ)``.
    """

    def scale_logits(
        self, logits: torch.Tensor, embeddings: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        return logits * embeddings.norm(dim=1).unsqueeze(1) * self.scale


@register("cosface")
class CosFaceLoss(MarginSoftmaxLoss):
    """CosFace, large-margin cosine loss (Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face
    Recognition", CVPR 2018; PML ``CosFaceLoss``).

    ``ψ(θ) = cos θ − m`` with ``m = margin``; logits ``s · (ψ or cos θ)``, ``s = scale``.
    """

    constant_scale = True

    def configure(self, margin: float = 0.35, scale: float = 64.0) -> None:  # type: ignore[override]
        super().configure(margin, scale)

    def target_logit_and_slope(self, cos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return cos - self.margin, torch.ones_like(cos)


@register("arcface")
class ArcFaceLoss(MarginSoftmaxLoss):
    """ArcFace, additive angular margin (Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face
    Recognition", CVPR 2019; PML ``ArcFaceLoss``).

    With ``m = margin`` in **degrees** (PML's convention; 28.6° ≈ 0.5 rad) converted to radians::

        ψ(θ) = cos(θ + m)            if θ ≤ π − m
             = cos θ − m · sin m     otherwise (keeps ψ monotonically decreasing, as in PML)

    logits ``s · (ψ or cos θ)``, ``s = scale``. ``cos(θ + m)`` is computed as ``cos θ cos m − sin θ sin m``,
    equal to PML's ``cos(acos(cos θ) + m)`` up to rounding, with a finite gradient at ``cos θ = ±1``.
    """

    constant_scale = True

    def configure(self, margin: float = 28.6, scale: float = 64.0) -> None:  # type: ignore[override]
        super().configure(margin, scale)
        self._init_angular_margin()

    def _init_angular_margin(self) -> None:
        radians = math.radians(self.margin)
        self._cos_m, self._sin_m = math.cos(radians), math.sin(radians)
        self._threshold = -math.cos(radians)  # θ ≤ π − m  ⇔  cos θ ≥ cos(π − m) = −cos m
        self._fallback = radians * math.sin(radians)

    def target_logit_and_slope(self, cos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        clamped = cos.clamp(-1.0, 1.0)
        # sin θ, clamped at the dtype's eps so the slope stays finite at cos θ = ±1 (acos' is infinite there)
        sine = (1.0 - clamped * clamped).clamp_min_(torch.finfo(cos.dtype).eps).sqrt_()
        arc = clamped >= self._threshold
        shifted = torch.add(clamped * self._cos_m, sine, alpha=-self._sin_m)  # cos θ cos m − sin θ sin m
        psi = torch.where(arc, shifted, clamped - self._fallback)
        # d/dc [c cos m − √(1−c²) sin m] = cos m + c sin m / sin θ
        slope = torch.where(arc, clamped.div(sine).mul_(self._sin_m).add_(self._cos_m), 1.0)
        # PML clamps cos θ to [−1, 1] before acos: outside (rounding), ψ is flat
        return psi, slope.masked_fill_(clamped != cos, 0.0)


@register("subcenter_arcface")
class SubCenterArcFaceLoss(ArcFaceLoss):
    """Sub-center ArcFace (Deng et al., "Sub-center ArcFace: Boosting Face Recognition by Large-Scale Noisy
    Web Faces", ECCV 2020; PML ``SubCenterArcFaceLoss``).

    ``K = sub_centers`` weight vectors per class (``W`` has ``num_classes·K`` columns, class ``c`` owning
    ``c·K … c·K+K−1``); a sample's cosine to a class is the largest over its sub-centres, then ArcFace.
    :meth:`get_outliers` finds samples far from their class's dominant sub-centre.
    """

    def configure(  # type: ignore[override]
        self, margin: float = 28.6, scale: float = 64.0, sub_centers: int = 3
    ) -> None:
        self.sub_centers = check_positive_int(sub_centers, "sub_centers", self.who)
        MarginSoftmaxLoss.configure(self, margin, scale, self.sub_centers)
        self._init_angular_margin()

    def cosine(self, embeddings: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        cos = cosine_matrix(embeddings, weights, columns=True)
        return cos.view(cos.shape[0], self.num_classes, self.sub_centers).amax(2)

    @torch.no_grad()
    def get_outliers(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        threshold: float = 75.0,
        return_dominant_centers: bool = True,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Samples farther than ``threshold`` degrees from their class's dominant sub-centre (PML's
        ``get_outliers``).

        A class's dominant sub-centre is the one most of its samples in ``embeddings`` are closest to
        (ties: the lowest index; a class without samples gets its first sub-centre). Returns the outliers'
        indices, ordered by label then index as PML does, and with ``return_dominant_centers`` also the
        ``embedding_size × num_classes`` matrix of dominant sub-centres. (PML returns the pair regardless
        of ``return_dominant_centers``.)
        """
        self.classes(Batch(embeddings, labels))
        weights = self.param(self.W, embeddings)
        k = self.sub_centers
        cos = self.distance.matrix(embeddings, weights.t()).view(-1, self.num_classes, k)
        own = cos[torch.arange(len(labels), device=labels.device), labels]  # B × K: own class's sub-centres
        votes = torch.bincount(labels * k + own.argmax(1), minlength=self.num_classes * k)
        dominant = votes.view(self.num_classes, k).argmax(1)  # C
        columns = torch.arange(self.num_classes, device=labels.device) * k + dominant
        own_dominant = own.gather(1, dominant[labels].unsqueeze(1)).squeeze(1)
        is_outlier = own_dominant < math.cos(math.radians(threshold))
        outliers = torch.nonzero(is_outlier, as_tuple=True)[0]
        outliers = outliers[torch.argsort(labels[outliers], stable=True)]
        if not return_dominant_centers:
            return outliers
        return outliers, weights[:, columns]

    def extra_repr(self) -> str:
        return f"sub_centers={self.sub_centers}, " + super().extra_repr()


@register("p2sgrad")
class P2SGradLoss(ClassLoss):
    """P2SGrad (Zhang et al., "P2SGrad: Refined Gradients for Optimizing Deep Face Models", CVPR 2019;
    PML ``P2SGradLoss``).

    The paper's gradient (Eq. 11) is that of a mean squared error between cosines and one-hot targets::

        L = 1/(B·C) Σ_i Σ_c (cos θ_{i,c} − [c = y_i])²

    ``reduction`` applies to the ``B × C`` squared errors (``mean``: PML's ``MSELoss``). The class weights
    ``weight`` (``embedding_size × num_classes``, PML's name and layout) start uniform in ``[−1, 1]`` and
    are renormalised to unit columns **in place** at every forward pass (PML does the same: the update is
    a projected gradient step; the gradient does not flow through the renormalisation).
    PML calls ``embedding_size`` ``descriptors_dim``. Takes no miner output.
    """

    tuple_kinds: ClassVar[frozenset[str]] = frozenset()
    defaults: ClassVar[dict[str, Any]] = {"distance": "cosine", "reduction": "mean"}
    class_vectors = ("weight", "columns")
    allowed_distances = ("cosine",)

    def configure(self) -> None:
        self.weight = nn.Parameter(torch.empty(self.embedding_size, self.num_classes))
        with torch.no_grad():
            self.weight.uniform_(-1, 1)
            self.weight.copy_(_unit_columns(self.weight))

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        embeddings, labels = batch.embeddings, batch.labels
        self.classes(batch)
        with torch.no_grad():
            # .data: the projection is not part of the graph, and must not bump the parameter's version
            # counter (a graph from an earlier forward pass may still need the old values).
            self.weight.data.copy_(_unit_columns(self.weight.data))
        weights = self.param(self.weight, embeddings)
        # PML's formula: the columns are unit vectors already (renormalised above), only x is divided
        cos = (embeddings @ weights / embeddings.norm(dim=1, keepdim=True)).clamp(-1, 1)
        errors = (cos - F.one_hot(labels, self.num_classes).to(cos.dtype)).square()
        return self.reduce(errors.reshape(-1))


def _unit_columns(w: torch.Tensor) -> torch.Tensor:
    # PML's renorm(2, 1, 1e-5)·1e5: columns longer than 1e-5 are scaled to (almost exactly) unit length
    return torch.renorm(w, p=2, dim=1, maxnorm=1e-5) * 1e5


__all__ = [
    "ArcFaceLoss",
    "CosFaceLoss",
    "LargeMarginSoftmaxLoss",
    "MarginSoftmaxLoss",
    "P2SGradLoss",
    "SphereFaceLoss",
    "SubCenterArcFaceLoss",
]
