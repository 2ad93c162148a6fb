"""Distances and similarities as objects: every formula written once (PML's ``BaseDistance`` idea, typed).

Each class answers the questions every loss, miner, sampler, search backend and metric asks:

- :meth:`Distance.matrix` ``(q, r)``: the ``n × m`` matrix between rows of ``q`` and ``r`` (``q`` itself
  when ``r`` is None), differentiable;
- :meth:`Distance.paired` ``(a, b)``: the value of each row pair ``(a[i], b[i])``;
- :attr:`Distance.is_similarity`: whether larger means closer (``cosine``, ``dot``);
- :meth:`Distance.margin` ``(x, y)``: how much farther ``x`` is than ``y`` (``x − y`` for a distance,
  ``y − x`` for a similarity), so one loss formula serves both kinds;
- :attr:`Distance.index_metric` and :meth:`Distance.from_index`: the score a k-NN search ranks by (an inner
  product or a squared L2 distance between :meth:`Distance.prepare`-d rows) and how its values turn into
  this distance's units.

``normalize_embeddings=True`` L2-normalises both sides first (PML's default for every distance, so PML's
``LpDistance()`` is ``Euclidean(normalize_embeddings=True)``). Arithmetic runs with autocast disabled, in
float32 at least (float16/bfloat16 are upcast) and in the wider dtype of two inputs.

Registered names (``build(name, **kwargs)``, ``available()``): ``euclidean``, ``squared_euclidean``,
``cosine``, ``dot`` and ``snr``. A name is parsed once, at the edge (config, constructor); inside, code holds
the object. A distance compares equal to its registry name, so ``loss.distance == "cosine"`` reads naturally.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from typing import Any, ClassVar, Literal, TypeVar

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from dmlkit.registry import Registry

IndexMetric = Literal["inner_product", "l2"]
Number = TypeVar("Number", torch.Tensor, float)

REGISTRY: Registry[Distance] = Registry("distance")

# Half-precision types are upcast before any distance arithmetic (exp(50·s) and sums over many pairs lose
# too much in an 8-bit mantissa); float64 is kept as is.
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_NORM_EPS = 1e-12  # F.normalize's eps


def upcast(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 → float32; other dtypes unchanged."""
    return x.float() if x.dtype in _LOW_PRECISION else x


def _common(x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    x = upcast(x)
    if y is None:
        return x, None
    y = upcast(y)
    if y.dtype != x.dtype:
        dtype = torch.promote_types(x.dtype, y.dtype)
        x, y = x.to(dtype), y.to(dtype)
    return x, y


def full_precision(x: torch.Tensor) -> AbstractContextManager[Any]:
    """A context with autocast off on ``x``'s device (nothing to switch off: a no-op, which is cheaper; the
    losses call their distances with autocast already off)."""
    device = x.device.type
    return (
        torch.autocast(device_type=device, enabled=False)
        if torch.is_autocast_enabled(device)
        else nullcontext()
    )


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class Distance(ABC):
    """A distance (or similarity) between embeddings; see the module docstring."""

    #: Registry name, set by :func:`register`.
    name: ClassVar[str] = ""
    #: True when larger values mean more similar.
    is_similarity: ClassVar[bool] = False
    #: What a k-NN index ranks :meth:`prepare`-d rows by (None: this distance cannot be indexed).
    index_metric: ClassVar[IndexMetric | None] = None

    def __init__(self, normalize_embeddings: bool = False) -> None:
        self.normalize_embeddings = bool(normalize_embeddings)

    # -- the formulas ----------------------------------------------------------------------------------------

    @abstractmethod
    def matrix(
        self, query: torch.Tensor, ref: torch.Tensor | None = None, scale: float = 1.0
    ) -> torch.Tensor:
        """``scale ×`` the ``len(query) × len(ref)`` matrix (``ref`` None: ``query`` against itself)."""

    @abstractmethod
    def paired(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The value of every row pair ``(a[i], b[i])``, shape ``(n,)``."""

    def margin(self, x: Number, y: Number) -> Number:
        """How much farther ``x`` is than ``y``: ``x − y`` for a distance, ``y − x`` for a similarity."""
        return y - x if self.is_similarity else x - y

    @property
    def worst(self) -> float:
        """The value no real pair can have on the far side: ``+inf`` for a distance, ``−inf`` for a
        similarity (empty top-k slots hold it)."""
        return float("-inf") if self.is_similarity else float("inf")

    # -- k-NN search -----------------------------------------------------------------------------------------

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Rows as an index stores them: L2-normalised when this distance normalises."""
        return F.normalize(upcast(x), dim=1) if self.normalizes else upcast(x)

    def from_index(self, values: torch.Tensor) -> torch.Tensor:
        """Index scores (inner products, or squared L2 distances ≥ 0) in this distance's units."""
        return values

    @property
    def normalizes(self) -> bool:
        """Whether rows are L2-normalised before the formula."""
        return self.normalize_embeddings

    @property
    def is_cosine(self) -> bool:
        """Whether the values are cosines: inner products of L2-normalised rows (bounded by ±1)."""
        return self.index_metric == "inner_product" and self.normalizes

    def _rows(
        self, query: torch.Tensor, ref: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Both sides upcast to one dtype (:func:`upcast`) and L2-normalised if this distance normalises."""
        x, y = _common(query, ref)
        if self.normalizes:
            x = F.normalize(x, p=2, dim=1)
            y = None if y is None else F.normalize(y, p=2, dim=1)
        return x, y

    # -- identity ------------------------------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            return other == self.name
        if isinstance(other, Distance):
            return type(other) is type(self) and other.normalizes == self.normalizes
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.name, self.normalizes))

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(normalize_embeddings={self.normalize_embeddings})"


def register(name: str) -> Any:
    """Class decorator: register a distance under ``name`` and record the name on the class."""

    def decorator(cls: type[Distance]) -> type[Distance]:
        cls.name = name
        REGISTRY.register(name)(cls)
        return cls

    return decorator


# ---------------------------------------------------------------------------------------------------------
# Inner products and L2 distances: one Gram-form computation with a closed-form backward pass


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


def _gram_forward(xn: torch.Tensor, yn: torch.Tensor, same: bool, kind: str, scale: float) -> torch.Tensor:
    """``scale·⟨x, y⟩`` (kind ``dot``) or ``‖x‖² + ‖y‖² − 2⟨x, y⟩`` clamped at 0 (``squared``), square-rooted
    for ``euclidean``; rows already normalised if they should be."""
    if kind == "dot":
        if scale == 1.0:
            return xn @ yn.T
        return torch.addmm(xn.new_zeros(()), xn, yn.T, beta=0, alpha=scale)
    x_sq = xn.pow(2).sum(1)
    y_sq = x_sq if same else yn.pow(2).sum(1)
    mat = torch.addmm(x_sq.unsqueeze(1) + y_sq.unsqueeze(0), xn, yn.T, alpha=-2.0).clamp_min_(0.0)
    return mat.sqrt_() if kind == "euclidean" else mat


class _GramMatrix(torch.autograd.Function):
    """:func:`_gram_forward` with its backward pass in closed form.

    One matrix product for a batch-against-itself matrix (``(A + Aᵀ) x``) instead of autograd's two, and no
    chain of temporaries through the normalisation, the norms, the clamp and the square root (whose gradient
    is 0 where the distance is 0). First-order only.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, ref: torch.Tensor | None, kind: str, normalize: bool, scale: float
    ) -> torch.Tensor:
        same = ref is None
        xn, x_denom = _unit_rows(x) if normalize else (x, None)
        if same:
            yn, y_denom = xn, x_denom
        else:
            yn, y_denom = _unit_rows(ref) if normalize else (ref, None)  # type: ignore[arg-type]
        mat = _gram_forward(xn, yn, same, kind, scale)
        ctx.kind, ctx.same, ctx.normalize, ctx.scale = kind, same, normalize, scale
        ctx.save_for_backward(xn, yn, x_denom, y_denom, None if kind == "dot" else mat)
        return mat

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xn, yn, x_denom, y_denom, mat = ctx.saved_tensors
        need_x, need_ref = ctx.needs_input_grad[0], ctx.needs_input_grad[1] and not ctx.same
        if ctx.kind == "dot":
            coef, norm_coef, mat_grad = ctx.scale, 0.0, grad  # mat = scale·⟨x, y⟩
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
        if ctx.same:
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


class _GramDistance(Distance):
    """Inner products and L2 distances, computed from ⟨x, y⟩ (kind ``dot``, ``squared`` or ``euclidean``)."""

    kind: ClassVar[str] = "dot"

    def matrix(
        self, query: torch.Tensor, ref: torch.Tensor | None = None, scale: float = 1.0
    ) -> torch.Tensor:
        """With autograd, the Gram form and its closed-form backward (:class:`_GramMatrix`); without (mining,
        sampling), L2 distances come from ``torch.cdist``, the values of PML's ``LpDistance``."""
        with full_precision(query):
            x, y = _common(query, ref)
            if y is x:
                y = None
            if self.kind == "dot":  # the scale is folded into the product (and its backward)
                return _GramMatrix.apply(x, y, self.kind, self.normalizes, scale)  # type: ignore[no-any-return]
            if _needs_grad(x, y):
                mat = _GramMatrix.apply(x, y, self.kind, self.normalizes, 1.0)
            else:
                x, y = self._rows(x, y)
                mat = torch.cdist(x, x if y is None else y)
                mat = mat.pow(2) if self.kind == "squared" else mat
            return mat if scale == 1.0 else mat * scale

    def paired(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        with full_precision(a):
            x, y = self._rows(a, b)
            assert y is not None
            if self.kind == "dot":
                return (x * y).sum(1)
            squared = (x - y).pow(2).sum(1)
            if self.kind == "squared":
                return squared
            # √ has an infinite gradient at 0: identical rows get distance 0 and gradient 0, not NaN.
            zero = squared == 0
            return torch.sqrt(squared + zero.to(squared.dtype)) * (~zero).to(squared.dtype)


@register("euclidean")
class Euclidean(_GramDistance):
    """``‖x − y‖₂`` (PML ``LpDistance()``)."""

    kind = "euclidean"
    index_metric = "l2"

    def from_index(self, values: torch.Tensor) -> torch.Tensor:
        return values.clamp_min(0).sqrt()


@register("squared_euclidean")
class SquaredEuclidean(_GramDistance):
    """``‖x − y‖₂²`` (PML ``LpDistance(power=2)``)."""

    kind = "squared"
    index_metric = "l2"

    def from_index(self, values: torch.Tensor) -> torch.Tensor:
        return values.clamp_min(0)


@register("dot")
class Dot(_GramDistance):
    """``⟨x, y⟩``, a similarity (PML ``DotProductSimilarity``; equal to cosine on normalised rows)."""

    is_similarity = True
    index_metric = "inner_product"


@register("cosine")
class Cosine(_GramDistance):
    """``⟨x/‖x‖, y/‖y‖⟩``, a similarity (PML ``CosineSimilarity``); rows are always normalised."""

    is_similarity = True
    index_metric = "inner_product"

    def __init__(self, normalize_embeddings: bool = True) -> None:
        super().__init__(normalize_embeddings)

    @property
    def normalizes(self) -> bool:
        return True


# ---------------------------------------------------------------------------------------------------------
# Signal-to-noise ratio


@register("snr")
class SNR(Distance):
    """Signal-to-noise-ratio distance ``d(x, y) = var(x − y) / var(x)`` (Yuan et al., "Signal-to-Noise Ratio:
    A Robust Distance Metric for Deep Metric Learning", CVPR 2019, Eq. 5; PML ``SNRDistance``).

    Asymmetric (the anchor ``x`` in the denominator), so it cannot be indexed for k-NN search. With
    ``x̃ = x − mean(x)`` (centred over dimensions), ``var(x − y) / var(x) = ‖x̃ − ỹ‖² / ‖x̃‖²``: a centred
    squared-L2 Gram computation (the unbiased ``1/(D − 1)`` cancels).
    """

    def matrix(
        self, query: torch.Tensor, ref: torch.Tensor | None = None, scale: float = 1.0
    ) -> torch.Tensor:
        with full_precision(query):
            x, y = self._rows(query, ref)
            xc = x - x.mean(dim=1, keepdim=True)
            yc = xc if y is None else y - y.mean(dim=1, keepdim=True)
            x2 = xc.pow(2).sum(1)
            y2 = x2 if y is None else yc.pow(2).sum(1)
            diff = (x2.unsqueeze(1) + y2.unsqueeze(0) - 2.0 * (xc @ yc.T)).clamp_min(0.0)
            mat = diff / x2.unsqueeze(1)
            return mat if scale == 1.0 else mat * scale

    def paired(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        with full_precision(a):
            x, y = self._rows(a, b)
            assert y is not None
            return torch.var(x - y, dim=1) / torch.var(x, dim=1)


# ---------------------------------------------------------------------------------------------------------
# Registry


DistanceLike = Distance | str


def build(name: str, /, **kwargs: Any) -> Distance:
    """The distance registered as ``name``; unknown names or keywords raise with the closest valid one."""
    return REGISTRY.build(name, **kwargs)


def available(indexable: bool = False) -> list[str]:
    """Registered names; ``indexable=True``: only those a k-NN search can rank by (not ``snr``)."""
    names = REGISTRY.available()
    return [n for n in names if REGISTRY.get(n).index_metric is not None] if indexable else names  # type: ignore[attr-defined]


def resolve(distance: DistanceLike, normalize_embeddings: bool = False) -> Distance:
    """``distance`` as an object: a name is built with ``normalize_embeddings``; an object is returned."""
    if isinstance(distance, Distance):
        return distance
    return build(distance, normalize_embeddings=normalize_embeddings)


__all__ = [
    "REGISTRY",
    "SNR",
    "Cosine",
    "Distance",
    "DistanceLike",
    "Dot",
    "Euclidean",
    "IndexMetric",
    "SquaredEuclidean",
    "available",
    "build",
    "register",
    "resolve",
    "upcast",
]
