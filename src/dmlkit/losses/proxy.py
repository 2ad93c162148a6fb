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
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from dmlkit.errors import ConfigError, DataError
from dmlkit.losses.base import (
    PAIRS_AND_TRIPLETS,
    SIMILARITIES,
    BaseLoss,
    Batch,
    check_positive,
    register,
    sample_weights,
)

CLASS_NEEDS: frozenset[str] = frozenset({"num_classes", "embedding_size"})


# ---------------------------------------------------------------------------------------------- helpers


def check_class_labels(labels: torch.Tensor, num_classes: int, who: str) -> None:
    """Raise ``DataError`` naming a label outside ``0 … num_classes−1`` (the smallest or largest).

    One device sync per call (``aminmax``), the price of a readable error instead of an index
    error deep inside a CUDA kernel.
    """
    if labels.numel() == 0:
        return
    low, high = (int(v) for v in torch.stack(torch.aminmax(labels)).tolist())
    if low < 0 or high >= num_classes:
        label = low if low < 0 else high
        raise DataError(
            f"{who}: label {label} is not a class index 0..{num_classes - 1} (num_classes={num_classes}); "
            "remap labels to 0..num_classes-1 or raise num_classes"
        )


def check_positive_int(value: object, what: str, who: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value) or value < 1:
        raise ConfigError(f"{who}: {what} must be a positive integer, got {value!r}")
    return int(value)


class _CosineMatrix(torch.autograd.Function):
    """``cos(x_i, w_c)`` for the rows of ``x`` (B × d) and the class vectors of ``w`` (its columns, d × C,
    or its rows, C × d), with a fused backward pass.

    A loss-private fast path, not a second cosine: :class:`dmlkit.distances.Cosine` gives the same values
    (up to rounding), but would normalise a copy of every class vector and, for a ``d × C`` parameter,
    produce its gradient through a transposed view (a strided, slow accumulation into the parameter).

    Normalises the ``B × C`` product instead of the inputs, ``cos = (x w) ⊙ (a bᵀ)`` with ``a = 1/‖x_i‖``
    and ``b = 1/‖w_c‖`` (norms clamped at 1e-12 as in ``F.normalize``), and writes the gradient in closed
    form, ``∂L/∂x_i = a_i Σ_c g_ic b_c w_c − a_i² (Σ_c g_ic cos_ic) x_i`` (symmetrically for ``w``): two
    matrix products and a few ``B × C`` products instead of autograd's chain through both normalisations
    (first-order only: a double backward raises). The
    gradient of ``w`` is produced in ``w``'s own layout, so accumulating it into a parameter never takes
    a strided (slow) path.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, w: torch.Tensor, columns: bool
    ) -> torch.Tensor:
        x_inv = _inverse_norm(x, 1)
        w_inv = _inverse_norm(w, 0 if columns else 1)
        scale = x_inv.unsqueeze(1) * w_inv.unsqueeze(0)
        cos = (x @ (w if columns else w.t())).mul_(scale)
        ctx.save_for_backward(x, w, x_inv, w_inv, scale, cos)
        ctx.columns = columns  # type: ignore[attr-defined]
        return cos

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, w, x_inv, w_inv, scale, cos = ctx.saved_tensors  # type: ignore[attr-defined]
        columns = ctx.columns  # type: ignore[attr-defined]
        weighted = grad * cos
        grad_scaled = grad * scale
        grad_x = grad_w = None
        # mm then an in-place addcmul_: no temporary of the inputs' size (fresh large buffers are costly)
        if ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
            coef = weighted.sum(1).mul_(x_inv.square()).neg_()
            grad_x = (grad_scaled @ (w.t() if columns else w)).addcmul_(x, coef.unsqueeze(1))
        if ctx.needs_input_grad[1]:  # type: ignore[attr-defined]
            coef = weighted.sum(0).mul_(w_inv.square()).neg_()
            if columns:
                grad_w = (x.t() @ grad_scaled).addcmul_(w, coef.unsqueeze(0))
            else:
                grad_w = (grad_scaled.t() @ x).addcmul_(w, coef.unsqueeze(1))
        return grad_x, grad_w, None


def _inverse_norm(t: torch.Tensor, dim: int) -> torch.Tensor:
    if dim == t.ndim - 1 or t.shape[dim] == t.numel():  # contiguous reduction: no temporary
        return torch.linalg.vector_norm(t, dim=dim).clamp_min(1e-12).reciprocal()
    # vector_norm over a strided dimension (columns) is several times slower than square-and-sum
    return t.square().sum(dim).clamp_min(1e-24).rsqrt()


def cosine_matrix(x: torch.Tensor, w: torch.Tensor, columns: bool) -> torch.Tensor:
    """``B × C`` cosine similarities between the rows of ``x`` and the class vectors of ``w``: its columns
    (``w`` is d × C) when ``columns``, else its rows (C × d). Fused backward pass."""
    return _CosineMatrix.apply(x, w, columns)  # type: ignore[no-any-return]


class ClassLoss(BaseLoss):
    """Base of the losses with one or more learnable vectors per class (proxies, class weights).

    ``num_classes`` and ``embedding_size`` are shared options of this family, the first two (positional)
    parameters of every such loss, as in PML; subclasses create their class vectors in ``configure`` and
    implement :meth:`compute_loss`; :meth:`classes` validates the labels and returns the miner weights, and
    :meth:`param` casts a parameter to the embeddings' dtype (differentiably, so the parameter keeps its
    own dtype and receives its gradient in it).
    """

    tuple_kinds: ClassVar[frozenset[str]] = PAIRS_AND_TRIPLETS
    accepts_ref: ClassVar[bool] = False
    needs: ClassVar[frozenset[str]] = CLASS_NEEDS

    def shared_options(self, num_classes: int, embedding_size: int, **shared: Any) -> None:
        """The loss options, then the shape of the class vectors (the first two, positional, arguments of
        every such loss, as in PML)."""
        super().shared_options(**shared)
        self.num_classes = check_positive_int(num_classes, "num_classes", self.who)
        self.embedding_size = check_positive_int(embedding_size, "embedding_size", self.who)

    def classes(self, batch: Batch, anchors_only: bool = False) -> torch.Tensor | None:
        """Check labels and width; return the miner weights (None: every sample weighs 1)."""
        embeddings = batch.embeddings
        if embeddings.shape[1] != self.embedding_size:
            raise DataError(
                f"{self.who}: embeddings have width {embeddings.shape[1]}, the loss was built for "
                f"embedding_size={self.embedding_size}"
            )
        check_class_labels(batch.labels, self.num_classes, self.who)
        return sample_weights(batch.indices_tuple, embeddings.shape[0], embeddings.dtype, anchors_only)

    def matrix_to(self, embeddings: torch.Tensor, w: torch.Tensor, columns: bool) -> torch.Tensor:
        """The loss's distance between the embeddings and the class vectors of ``w`` (columns of a d × C
        matrix when ``columns``, else rows of a C × d one).

        Cosines (``cosine``, or ``dot`` on normalised inputs) go through the fast path
        :func:`cosine_matrix`, other distances through :meth:`dmlkit.distances.Distance.matrix`.
        """
        if self.distance.is_cosine:
            return cosine_matrix(embeddings, w, columns)
        return self.distance.matrix(embeddings, w.t() if columns else w)

    @staticmethod
    def param(p: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return p if p.dtype == like.dtype else p.to(like.dtype)

    def weighted_reduce(self, losses: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """Reduce one loss per sample, each weighted by the miner's sample weight (None: 1)."""
        return self.reduce(losses if weights is None else losses * weights, "anchors")

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
    (``num_classes × embedding_size``) are initialised from ``N(0, 1)`` (PML's default). A miner's output
    weighs each sample by how often it is an anchor (PML's ``convert_to_weights(using_ref=True)``).
    Deviation: PML computes ``softmax`` then ``log`` and drops samples whose target probability underflows
    to exactly 0; we use ``log_softmax`` and keep them (identical otherwise).
    """

    defaults: ClassVar[dict[str, Any]] = {"distance": "squared_euclidean", "reduction": "mean"}
    class_vectors = ("proxies", "rows")

    def configure(self, softmax_scale: float = 1.0) -> None:
        self.softmax_scale = float(softmax_scale)
        self.proxies = nn.Parameter(torch.empty(self.num_classes, self.embedding_size))
        nn.init.normal_(self.proxies)

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        embeddings, labels = batch.embeddings, batch.labels
        weights = self.classes(batch, anchors_only=True)
        proxies = self.param(self.proxies, embeddings)
        if self.distance == "squared_euclidean" and self.distance.normalizes:
            # ‖x̂ − p̂‖² = 2 − 2 cos(x, p), and the constant drops out of the softmax
            logits = cosine_matrix(embeddings, proxies, columns=False) * (2.0 * self.softmax_scale)
        else:
            scale = self.softmax_scale if self.is_similarity else -self.softmax_scale
            logits = self.matrix_to(embeddings, proxies, columns=False) * scale
        losses = F.cross_entropy(logits, labels, reduction="none")
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
    miner's output, PML's per-sample weights enter as offsets ``wᵢ − 1`` added to sample ``i``'s exponents.
    Proxies (``num_classes × embedding_size``) are initialised with Kaiming-normal, ``mode="fan_out"``
    (PML's default).

    Statistics: ``num_pos_proxies`` (``|P⁺|``).
    """

    defaults: ClassVar[dict[str, Any]] = {"distance": "cosine", "reduction": "mean"}
    class_vectors = ("proxies", "rows")

    def configure(self, margin: float = 0.1, alpha: float = 32.0) -> None:
        self.margin = float(margin)
        self.alpha = float(alpha)
        self.proxies = nn.Parameter(torch.empty(self.num_classes, self.embedding_size))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        embeddings, labels = batch.embeddings, batch.labels
        weights = self.classes(batch)
        mat = self.matrix_to(embeddings, self.param(self.proxies, embeddings), columns=False)  # B × C
        farther = self.distance.margin
        target = labels.unsqueeze(1)
        # Each sample is a positive of exactly one proxy: the positive term is a per-class log-sum-exp
        # over B values, and only the negative term needs the B × C matrix (its positives masked out).
        pos_exp = self.alpha * farther(mat.gather(1, target).squeeze(1), self.margin)
        neg_exp = self.alpha * farther(-self.margin, mat)
        if weights is not None:
            offset = weights - 1
            pos_exp = pos_exp + offset
            neg_exp = neg_exp + offset.unsqueeze(1)
        pos_term = _grouped_logsumexp_add_one(pos_exp, labels, self.num_classes)
        neg_term = _column_logsumexp_add_one(neg_exp.scatter(1, target, float("-inf")))
        num_pos = torch.bincount(labels, minlength=self.num_classes).count_nonzero()
        self.record(num_pos_proxies=num_pos)
        if self.reduction == "mean":
            return pos_term.sum() / num_pos.clamp_min(1) + neg_term.sum() / self.num_classes
        return self.reduce_terms((pos_term, None), (neg_term, None))

    def extra_repr(self) -> str:
        return f"margin={self.margin}, alpha={self.alpha}, " + super().extra_repr()


def _column_logsumexp_add_one(x: torch.Tensor) -> torch.Tensor:
    """Column-wise ``log(1 + Σ_i exp(x[i,c]))``; entries equal to −inf are absent (a column of them gives 0).

    The shift ``m = max(0, max_i x)`` keeps every ``exp`` ≤ 1; it is detached because the result does not
    depend on it.
    """
    shift = x.detach().amax(0).clamp_min(0)
    return torch.log(torch.exp(x - shift).sum(0) + torch.exp(-shift)) + shift


def _grouped_logsumexp_add_one(values: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``log(1 + Σ_{i: groups_i = c} exp(values_i))`` for every ``c < num_groups`` (0 for empty groups)."""
    shift = values.new_zeros(num_groups).scatter_reduce(0, groups, values.detach(), "amax")
    total = torch.exp(-shift).index_add(0, groups, torch.exp(values - shift[groups]))
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

    defaults: ClassVar[dict[str, Any]] = {"distance": "cosine", "reduction": "mean"}
    class_vectors = ("fc", "columns")
    allowed_distances = SIMILARITIES

    def configure(
        self, centers_per_class: int = 10, la: float = 20.0, gamma: float = 0.1, margin: float = 0.01
    ) -> None:
        check_positive(self.who, gamma=gamma)
        self.centers_per_class = check_positive_int(centers_per_class, "centers_per_class", self.who)
        self.la = float(la)
        self.gamma = float(gamma)
        self.margin = float(margin)
        self.fc = nn.Parameter(torch.empty(self.embedding_size, self.num_classes * self.centers_per_class))
        nn.init.kaiming_uniform_(self.fc, a=math.sqrt(5))

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        embeddings, labels = batch.embeddings, batch.labels
        weights = self.classes(batch)
        sims = self.matrix_to(embeddings, self.param(self.fc, embeddings), columns=True)
        sims = sims.view(-1, self.num_classes, self.centers_per_class)
        # cosines are ≤ 1, so exp(γ⁻¹(s − 1)) cannot overflow; it underflows only when 2γ⁻¹ is large
        limit = 80.0 if sims.dtype == torch.float32 else 700.0
        shift = 1.0 if self.distance.is_cosine and 2.0 / self.gamma < limit else None
        logits = self.la * _SoftTripleSimilarity.apply(sims, 1.0 / self.gamma, shift)
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


class _SoftTripleSimilarity(torch.autograd.Function):
    """``S_c = Σ_k softmax_k(s_ck / γ) s_ck`` over the last dimension, with a fused backward pass:
    ``∂S_c/∂s_ck = p_ck (1 + (s_ck − S_c)/γ)``.

    ``torch.softmax`` over a short last dimension is slow on CPU; the exponentials are shifted by
    ``shift`` (an upper bound of ``s``, e.g. 1 for cosines) when given, else by the per-class maximum.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, sims: torch.Tensor, inv_gamma: float, shift: float | None
    ) -> torch.Tensor:
        if shift is None:
            probs = (sims - sims.amax(2, keepdim=True)).mul_(inv_gamma).exp_()
        else:
            probs = (sims - shift).mul_(inv_gamma).exp_()
        probs.div_(probs.sum(2, keepdim=True))
        out = (probs * sims).sum(2)
        ctx.save_for_backward(sims, probs, out)
        ctx.inv_gamma = inv_gamma  # type: ignore[attr-defined]
        return out

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor, None, None]:
        sims, probs, out = ctx.saved_tensors  # type: ignore[attr-defined]
        factor = (sims - out.unsqueeze(2)).mul_(ctx.inv_gamma).add_(1.0)  # type: ignore[attr-defined]
        return factor.mul_(probs).mul_(grad.unsqueeze(2)), None, None


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

    defaults: ClassVar[dict[str, Any]] = {"distance": "dot", "reduction": "mean"}
    class_vectors = ("W", "columns")

    def configure(self, temperature: float = 0.05) -> None:
        check_positive(self.who, temperature=temperature)
        self.temperature = float(temperature)
        self.W = nn.Parameter(torch.empty(self.embedding_size, self.num_classes))
        nn.init.normal_(self.W)

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        embeddings, labels = batch.embeddings, batch.labels
        weights = self.classes(batch)
        classes = self.param(self.W, embeddings)
        if not self.distance.is_cosine:  # (a cosine normalises the class weights itself)
            classes = F.normalize(classes, p=2, dim=0)
        mat = self.matrix_to(embeddings, classes, columns=True)
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
    defaults: ClassVar[dict[str, Any]] = {"distance": "cosine", "reduction": "mean"}
    class_vectors = ("proxies", "rows")
    allowed_distances = SIMILARITIES

    def configure(self, lambdaC: float = 1.0, alpha: float = 0.8, margin: float = 5e-4) -> None:
        if lambdaC < 0:
            raise ConfigError(f"manifold: lambdaC must be >= 0, got {lambdaC}")
        if not 0 < alpha < 1:
            raise ConfigError(f"manifold: alpha must be in (0, 1), got {alpha}")
        self.lambdaC = float(lambdaC)
        self.alpha = float(alpha)
        self.margin = float(margin)
        self.proxies = nn.Parameter(torch.empty(self.num_classes, self.embedding_size))
        nn.init.normal_(self.proxies)

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        self.classes(batch)
        embeddings, n = batch.embeddings, batch.embeddings.shape[0]
        nodes = torch.cat([embeddings, self.param(self.proxies, embeddings)], dim=0)
        affinity = torch.exp(self.distance.matrix(nodes).clamp_min(0) * 2.0)
        affinity = affinity.masked_fill(torch.eye(len(nodes), dtype=torch.bool, device=nodes.device), 0.0)
        scale = affinity.sum(1).rsqrt()
        normalized = affinity * scale.unsqueeze(1) * scale.unsqueeze(0)
        system = torch.eye(len(nodes), dtype=nodes.dtype, device=nodes.device) - self.alpha * normalized
        manifold = (1.0 - self.alpha) * torch.linalg.inv(system)
        target = batch.labels.unsqueeze(1)
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
