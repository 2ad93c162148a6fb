"""Regularizers: penalties on a matrix of vectors that a loss adds to its value (PML ``regularizers``).

Every loss takes two (shared options, see :class:`dmlkit.losses.base.BaseLoss`): an
``embedding_regularizer`` applied to the call's embeddings (as given, before any normalisation), weighted
by ``embedding_reg_weight``, and a ``weight_regularizer`` applied to the loss's class vectors (proxies,
class weights, one row per vector), weighted by ``weight_reg_weight`` (PML's ``EmbeddingRegularizerMixin``
and ``WeightRegularizerMixin``)::

    loss = reduced loss + embedding_reg_weight · R_e(embeddings) + weight_reg_weight · R_w(class vectors)

Each regularizer maps an ``N × d`` matrix ``X`` to per-element losses reduced by its own ``reduction``
(``mean`` unless said otherwise; PML's ``BaseRegularizer`` reducer):

- ``lp``: ``‖xᵢ‖_p^power`` per row (PML ``LpRegularizer``; with ``p=2``, weight 0.005 and ``mean``: the L2
  penalty of Roth et al.'s N-pair and angular losses, and of Sohn's N-pair loss);
- ``zero_mean``: ``|Σⱼ xᵢⱼ|`` per row (PML ``ZeroMeanRegularizer``);
- ``center_invariant``: ``(‖xᵢ‖² − mean_k ‖x_k‖²)² / 4`` per row (PML ``CenterInvariantRegularizer``;
  Wu et al., "Deep Face Recognition with Center Invariant Loss", 2017);
- ``regular_face``: ``max_{j≠i} cos(xᵢ, xⱼ)`` per row, the gradient flowing through the most similar
  other row only (PML ``RegularFaceRegularizer``; Zhao et al., "RegularFace", CVPR 2019);
- ``sparse_centers``: ``√(2 − 2 cos(c, c′))`` over the pairs of centres of the same class, ``Σ / (2·#pairs)``
  by default (PML ``SparseCentersRegularizer`` with its ``DivisorReducer``).

PML applies the first two to embeddings and the last three to class weights, but each works on any
matrix, in either role. ``build(name, **options)``, ``from_spec(spec)`` (a name or
``{name: ..., args: {...}}``) and ``available()`` as for every registry.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from dmlkit import distances
from dmlkit.errors import ConfigError, DataError
from dmlkit.losses import reducers
from dmlkit.losses.reducers import Elements, Reducer
from dmlkit.registry import Registered, Registry, SharedOptions

REGISTRY: Registry[Regularizer] = Registry("regularizer")


class Regularizer(Registered, SharedOptions):
    """``reduction(losses(X))`` of an ``N × d`` matrix ``X``.

    Subclasses implement :meth:`losses`, declare their own options in ``configure`` and may change the
    default ``reduction`` in ``defaults``. ``reduction`` is any reducer that reduces (a name,
    ``{name, args}`` or a :class:`~dmlkit.losses.reducers.Reducer`); it is told that element ``i`` is
    row ``i`` with label ``i`` (as PML's ``BaseRegularizer`` does), so ``class_weighted`` weighs rows.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.apply_arguments(args, kwargs)

    def shared_options(self, *, reduction: str | Mapping[str, Any] | Reducer | None = "mean") -> None:
        """Build the reducer (None: the regularizer's own reduction, :meth:`default_reduce`)."""
        self.reducer = None if reduction is None else reducers.from_spec(reduction, f"{self.who}: reduction")
        if self.reducer is not None and not self.reducer.reduces:
            raise ConfigError(f"regularizer '{self.who}': its reduction must give a number, not 'do_nothing'")

    @abstractmethod
    def losses(self, x: torch.Tensor) -> torch.Tensor:
        """The per-element losses of ``x`` (``N × d``), a 1-D tensor."""

    def default_reduce(self, losses: torch.Tensor) -> torch.Tensor:
        """The reduction used with ``reduction=None``."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The reduced penalty of ``x`` (``N × d``), a scalar."""
        if x.ndim != 2:
            raise DataError(f"regularizer '{self.who}': expected an N × d matrix, got shape {tuple(x.shape)}")
        losses = self.losses(distances.upcast(x))
        if self.reducer is None:
            return self.default_reduce(losses)
        rows = torch.arange(len(losses), device=losses.device)
        return self.reducer(losses, Elements((rows,), rows, len(losses)))

    def options(self) -> dict[str, Any]:
        """The regularizer's own options, for its ``repr``."""
        return {}

    def __repr__(self) -> str:
        shown = {**self.options(), "reduction": self.reducer}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


@REGISTRY.register("lp")
class LpRegularizer(Regularizer):
    """``‖xᵢ‖_p^power`` per row (PML ``LpRegularizer``). Roth et al.'s N-pair/angular L2 penalty is
    ``embedding_regularizer: lp`` (``p=2``) with ``embedding_reg_weight: 0.005``."""

    def configure(self, p: float = 2, power: float = 1) -> None:
        if not p > 0:
            raise ConfigError(f"regularizer 'lp': p must be > 0, got {p}")
        self.p, self.power = p, power

    def losses(self, x: torch.Tensor) -> torch.Tensor:
        norms = torch.linalg.vector_norm(x, ord=self.p, dim=1)
        return norms if self.power == 1 else norms**self.power

    def options(self) -> dict[str, Any]:
        return {"p": self.p, "power": self.power}


@REGISTRY.register("zero_mean")
class ZeroMeanRegularizer(Regularizer):
    """``|Σⱼ xᵢⱼ|`` per row: the sum of each vector's components pushed to 0 (PML
    ``ZeroMeanRegularizer``)."""

    def losses(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=1).abs()


@REGISTRY.register("center_invariant")
class CenterInvariantRegularizer(Regularizer):
    """``(‖xᵢ‖² − mean_k ‖x_k‖²)² / 4`` per row: the squared norms pulled to their mean, so that every
    class centre has the same norm (PML ``CenterInvariantRegularizer``; Wu et al., 2017)."""

    def losses(self, x: torch.Tensor) -> torch.Tensor:
        squared_norms = x.square().sum(dim=1)
        return (squared_norms - squared_norms.mean()).square() / 4


@REGISTRY.register("regular_face")
class RegularFaceRegularizer(Regularizer):
    """``max_{j≠i} cos(xᵢ, xⱼ)`` per row: each class vector pushed from its most similar other one
    (PML ``RegularFaceRegularizer``; Zhao et al., "RegularFace", CVPR 2019). The nearest row is chosen
    without gradient; the gradient flows through that cosine. Fewer than two rows: nothing (0)."""

    def losses(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) < 2:
            return x.sum(dim=1)[:0]  # nothing, still connected to x (a zero gradient)
        cos = distances.build("cosine").matrix(x)
        with torch.no_grad():
            nearest = cos.detach().clone().fill_diagonal_(float("-inf")).argmax(dim=1, keepdim=True)
        return cos.gather(1, nearest).squeeze(1)


@REGISTRY.register("sparse_centers")
class SparseCentersRegularizer(Regularizer):
    """``√(2 + ε − min(2 cos(c, c′), 2))`` for every pair ``c < c′`` of centres of the same class, reduced
    by ``Σ / (2·#pairs)`` unless a ``reduction`` is given (PML ``SparseCentersRegularizer`` and its
    ``DivisorReducer``; ε the dtype's smallest normal number). The rows are ``num_classes`` blocks of
    ``centers_per_class`` consecutive centres (SoftTriple's and sub-centre ArcFace's layout);
    ``num_classes`` defaults to the number of rows divided by ``centers_per_class``."""

    defaults: ClassVar[dict[str, Any]] = {"reduction": None}

    def configure(self, centers_per_class: int, num_classes: int | None = None) -> None:
        who = "regularizer 'sparse_centers'"
        if (
            isinstance(centers_per_class, bool)
            or not isinstance(centers_per_class, int)
            or centers_per_class < 2
        ):
            raise ConfigError(f"{who}: centers_per_class must be an int > 1, got {centers_per_class!r}")
        if num_classes is not None and (isinstance(num_classes, bool) or num_classes < 1):
            raise ConfigError(f"{who}: num_classes must be ≥ 1, got {num_classes!r}")
        self.centers_per_class, self.num_classes = centers_per_class, num_classes

    def pairs(self, num_rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Row indices ``(i, j)``, ``i < j``, of the same-class centre pairs, in row-major order."""
        k = self.centers_per_class
        classes = self.num_classes if self.num_classes is not None else num_rows // k
        if num_rows % k or classes * k != num_rows:
            raise DataError(
                f"regularizer 'sparse_centers': {num_rows} rows are not num_classes={classes} blocks of "
                f"centers_per_class={k} centres"
            )
        block = torch.triu_indices(k, k, offset=1, device=device)
        offsets = torch.arange(classes, device=device).unsqueeze(1) * k
        return (offsets + block[0]).reshape(-1), (offsets + block[1]).reshape(-1)

    def losses(self, x: torch.Tensor) -> torch.Tensor:
        i, j = self.pairs(len(x), x.device)
        cos = distances.build("cosine").matrix(x)[i, j]
        return torch.sqrt(2.0 + torch.finfo(x.dtype).tiny - torch.clamp(2.0 * cos, max=2.0))

    def default_reduce(self, losses: torch.Tensor) -> torch.Tensor:
        return losses.sum() / (2 * len(losses))

    def options(self) -> dict[str, Any]:
        return {"centers_per_class": self.centers_per_class, "num_classes": self.num_classes}


def build(name: str, /, **kwargs: Any) -> Regularizer:
    """The regularizer registered as ``name`` with its options (unknown names and misspelt options raise
    ``UnknownNameError`` naming the closest)."""
    return REGISTRY.build(name, **kwargs)


def from_spec(spec: str | Mapping[str, Any] | Regularizer, what: str = "regularizer") -> Regularizer:
    """A regularizer from a name, ``{name: ..., args: {...}}`` or a :class:`Regularizer` (returned as
    is)."""
    if isinstance(spec, Regularizer):
        return spec
    return reducers.build_spec(REGISTRY, spec, what)


def available() -> list[str]:
    """Sorted names of every registered regularizer."""
    return REGISTRY.available()


__all__ = [
    "REGISTRY",
    "CenterInvariantRegularizer",
    "LpRegularizer",
    "RegularFaceRegularizer",
    "Regularizer",
    "SparseCentersRegularizer",
    "ZeroMeanRegularizer",
    "available",
    "build",
    "from_spec",
]
