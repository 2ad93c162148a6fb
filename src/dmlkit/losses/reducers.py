"""Reductions of per-element losses to a scalar, picked by name: ``build(name, **options)``,
``from_spec(spec)`` and ``available()``.

- ``mean``: ``Σ lᵢ / N`` (PML ``MeanReducer``);
- ``avg_non_zero``: ``Σ_{lᵢ > 0} lᵢ / #{lᵢ > 0}`` (PML ``AvgNonZeroReducer``);
- ``sum``: ``Σ lᵢ`` (PML ``SumReducer``);
- ``threshold``: the mean of the elements with ``low < lᵢ < high`` (PML ``ThresholdReducer``);
- ``per_anchor``: pair and triplet losses averaged per anchor first, then reduced by an inner reducer
  (PML ``PerAnchorReducer``);
- ``class_weighted``: ``Σ w[y(i)]·lᵢ / N`` with ``y(i)`` the label of element ``i``'s anchor (PML
  ``ClassWeightedReducer``);
- ``do_nothing``: the per-element losses themselves (PML ``DoNothingReducer``; for Python use: a loss
  reduced this way returns a tensor of losses, which training cannot minimise).

Nothing to reduce gives 0 (PML returns its "zero loss" before reducing), never NaN. A reducer may be told
what each element is (:class:`Elements`: the anchor, and the other items of its pair or triplet: PML's
loss ``indices`` and ``reduction_type``); ``per_anchor`` and ``class_weighted`` need it
(:attr:`Reducer.needs_elements`). Besides reducing a tensor, a reducer reduces the elements a mask
selects (:meth:`Reducer.masked`: for ``mean``, ``avg_non_zero``, ``sum`` and ``threshold`` without
listing them, so without a device sync); the reducers that are a sum divided by a count
(:attr:`Reducer.fusable`: ``mean``, ``avg_non_zero``, ``sum``) name that count (:meth:`Reducer.divisor`)
for the fused loss paths that compute sums and counts themselves.

A configuration names a reducer as ``"name"`` or ``{name: ..., args: {...}}`` (:func:`from_spec`), e.g.
``--loss-args '{reduction: {name: threshold, args: {low: 0.1}}}'``.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal, TypeVar

import torch

from dmlkit.errors import ConfigError
from dmlkit.registry import Registered, Registry

REGISTRY: Registry[Reducer] = Registry("reduction")

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Elements:
    """What each per-element loss of a 1-D ``losses`` tensor belongs to: PML's loss ``indices`` (and, by
    their number, its ``reduction_type``).

    ``indices``: int64 tensors as long as ``losses``: ``(anchor,)`` for one loss per anchor or sample
    (PML's ``"element"``), ``(anchor, other)`` for pairs (``"pos_pair"``/``"neg_pair"``),
    ``(anchor, positive, negative)`` for triplets (``"triplet"``). Anchors index ``labels`` (the batch's);
    the other items index the reference set, of ``num_refs`` items.
    """

    indices: tuple[torch.Tensor, ...]
    labels: torch.Tensor
    num_refs: int

    @property
    def kind(self) -> Literal["element", "pair", "triplet"]:
        """``"element"``, ``"pair"`` or ``"triplet"``, from the number of index tensors."""
        kinds: dict[int, Literal["element", "pair", "triplet"]] = {1: "element", 2: "pair", 3: "triplet"}
        return kinds[len(self.indices)]

    @property
    def anchors(self) -> torch.Tensor:
        """The anchor (batch row) of every element."""
        return self.indices[0]

    @property
    def num_anchors(self) -> int:
        """The batch size (the rows anchors index)."""
        return len(self.labels)

    def check(self, losses: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``losses`` is 1-D and each index tensor has one entry per loss."""
        if not 1 <= len(self.indices) <= 3:
            raise ValueError(f"Elements: 1 to 3 index tensors, got {len(self.indices)}")
        if losses.ndim != 1 or any(i.shape != losses.shape for i in self.indices):
            shapes = [tuple(i.shape) for i in self.indices]
            raise ValueError(
                f"Elements: losses must be 1-D with one index per loss, got losses {tuple(losses.shape)} "
                f"and indices {shapes}"
            )

    def select(self, mask: torch.Tensor) -> Elements:
        """The elements ``mask`` keeps (boolean indexing: a device sync)."""
        return dataclasses.replace(self, indices=tuple(i[mask] for i in self.indices))


class Reducer(Registered, ABC):
    """How per-element losses become one number.

    Capabilities (class attributes): :attr:`fusable` (the reduction is a sum divided by
    :meth:`divisor`), :attr:`reduces` (False for ``do_nothing``: the losses come back unreduced),
    :attr:`needs_elements` (the reduction needs :class:`Elements`).
    """

    #: The reduction is ``Σ lᵢ / divisor(count, active)``: a loss may compute the sum and the counts
    #: itself (its fused path) and ask :meth:`divisor` only.
    fusable: ClassVar[bool] = False
    #: False: the per-element losses are returned as they are (a tensor, not a scalar).
    reduces: ClassVar[bool] = True
    #: The reduction needs to know each element's anchor (:class:`Elements`); a loss that cannot say
    #: raises a ``ConfigError`` naming itself.
    needs_elements: ClassVar[bool] = False

    @abstractmethod
    def __call__(self, losses: torch.Tensor, elements: Elements | None = None) -> torch.Tensor:
        """The reduced scalar of ``losses`` (any shape; 1-D with ``elements``; empty: 0)."""

    def masked(
        self, losses: torch.Tensor, mask: torch.Tensor, elements: Elements | None = None
    ) -> torch.Tensor:
        """``self(losses[mask])`` (``elements`` selected alike). Unselected entries must be finite (their
        gradient is multiplied by 0). This default lists the selected entries (a device sync); the built-in
        sum-like reducers and ``threshold`` override it without one."""
        return self(losses[mask], None if elements is None else elements.select(mask))

    def divisor(self, count: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """What a sum of ``count`` non-negative terms, ``active`` of them positive, is divided by (int64
        tensors; the result may be 0: callers clamp it at 1, an empty sum being 0). Only for
        :attr:`fusable` reducers; the others raise ``ConfigError``."""
        raise ConfigError(
            f"reduction '{self.who}' is not a sum divided by a count: a loss path that can only divide a "
            "sum (no per-element losses) cannot use it"
        )

    def options(self) -> dict[str, Any]:
        """The reducer's options, for its ``repr``."""
        return {}

    def __repr__(self) -> str:
        shown = ", ".join(f"{key}={value!r}" for key, value in self.options().items())
        return f"{type(self).__name__}({shown})"


def _kept_mean(losses: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    # mean(losses[keep]) as a masked sum: no data-dependent shape (a device sync), and exactly the same
    # gradient, 1/count on kept elements and 0 elsewhere; 0 when nothing is kept.
    total = torch.where(keep, losses, torch.zeros_like(losses)).sum()
    return total / keep.sum().clamp_min(1).to(losses.dtype)


def _mean(losses: torch.Tensor) -> torch.Tensor:
    """``losses.mean()``, 0 (connected to the graph) when empty."""
    return losses.mean() if losses.numel() > 0 else losses.sum()


# ---------------------------------------------------------------------------------------------- sum-like


@REGISTRY.register("mean")
class MeanReducer(Reducer):
    """``Σ lᵢ / N`` over all elements (PML ``MeanReducer``)."""

    fusable = True

    def __call__(self, losses: torch.Tensor, elements: Elements | None = None) -> torch.Tensor:
        return _mean(losses)

    def masked(
        self, losses: torch.Tensor, mask: torch.Tensor, elements: Elements | None = None
    ) -> torch.Tensor:
        return _kept_mean(losses, mask)

    def divisor(self, count: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        return count


@REGISTRY.register("avg_non_zero")
class AvgNonZeroReducer(Reducer):
    """``Σ_{lᵢ > 0} lᵢ / #{lᵢ > 0}``, the mean of the positive elements (PML ``AvgNonZeroReducer``)."""

    fusable = True

    def __call__(self, losses: torch.Tensor, elements: Elements | None = None) -> torch.Tensor:
        return _kept_mean(losses, losses > 0)

    def masked(
        self, losses: torch.Tensor, mask: torch.Tensor, elements: Elements | None = None
    ) -> torch.Tensor:
        return _kept_mean(losses, mask & (losses > 0))

    def divisor(self, count: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        return active


@REGISTRY.register("sum")
class SumReducer(Reducer):
    """``Σ lᵢ`` (PML ``SumReducer``)."""

    fusable = True

    def __call__(self, losses: torch.Tensor, elements: Elements | None = None) -> torch.Tensor:
        return losses.sum()

    def masked(
        self, losses: torch.Tensor, mask: torch.Tensor, elements: Elements | None = None
    ) -> torch.Tensor:
        return torch.where(mask, losses, torch.zeros_like(losses)).sum()

    def divisor(self, count: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(count)


# ---------------------------------------------------------------------------------------------- PML's others


@REGISTRY.register("threshold")
class ThresholdReducer(Reducer):
    """The mean of the elements strictly inside the thresholds, ``low < lᵢ < high`` (either may be None,
    not both); 0 when none is (PML ``ThresholdReducer``; ``low=0`` alone is ``avg_non_zero``)."""

    def __init__(self, low: float | None = None, high: float | None = None) -> None:
        if low is None and high is None:
            raise ConfigError("reduction 'threshold': give low, high or both")
        if low is not None and high is not None and not low < high:
            raise ConfigError(f"reduction 'threshold': low must be < high (none passes), got {low}, {high}")
        self.low = None if low is None else float(low)
        self.high = None if high is None else float(high)

    def inside(self, losses: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the elements inside the thresholds."""
        keep = torch.ones_like(losses, dtype=torch.bool)
        if self.low is not None:
            keep &= losses > self.low
        if self.high is not None:
            keep &= losses < self.high
        return keep

    def __call__(self, losses: torch.Tensor, elements: Elements | None = None) -> torch.Tensor:
        return _kept_mean(losses, self.inside(losses))

    def masked(
        self, losses: torch.Tensor, mask: torch.Tensor, elements: Elements | None = None
    ) -> torch.Tensor:
        return _kept_mean(losses, mask & self.inside(losses))

    def options(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high}


def _require_elements(reducer: Reducer, losses: torch.Tensor, elements: Elements | None) -> Elements:
    if elements is None:
        raise ConfigError(
            f"reduction '{reducer.who}' needs to know the anchor of each per-element loss (PML's loss "
            "indices); this call gave none"
        )
    elements.check(losses)
    return elements


@REGISTRY.register("class_weighted")
class ClassWeightedReducer(Reducer):
    """``Σ w[y(i)]·lᵢ / N``: each element weighted by the class of its anchor (the anchor's label indexes
    ``weights``), then averaged over all elements (PML ``ClassWeightedReducer``). Labels must lie in
    ``0 … len(weights) − 1``."""

    needs_elements = True

    def __init__(self, weights: Sequence[float]) -> None:
        values = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        if values.numel() == 0 or not torch.isfinite(values).all():
            raise ConfigError(
                f"reduction 'class_weighted': weights must be a non-empty list of finite numbers, one per "
                f"class, got {weights!r}"
            )
        self.weights = values

    def element_weights(self, elements: Elements, like: torch.Tensor) -> torch.Tensor:
        """``w[y(anchor)]`` of every element, in ``like``'s dtype and device."""
        labels = elements.labels[elements.anchors]
        outside = labels[(labels < 0) | (labels >= len(self.weights))]
        if outside.numel() > 0:  # (a device sync: an index out of range on a GPU is an opaque assert)
            raise ConfigError(
                f"reduction 'class_weighted': {len(self.weights)} class weights (labels 0 … "
                f"{len(self.weights) - 1}), but an anchor has label {int(outside[0])}"
            )
        return self.weights.to(device=like.device, dtype=like.dtype)[labels]

    def __call__(self, losses: torch.Tensor, elements: Elements | None = None) -> torch.Tensor:
        elements = _require_elements(self, losses, elements)
        return _mean(losses * self.element_weights(elements, losses))

    def masked(
        self, losses: torch.Tensor, mask: torch.Tensor, elements: Elements | None = None
    ) -> torch.Tensor:
        elements = _require_elements(self, losses, elements)
        return _kept_mean(losses * self.element_weights(elements, losses), mask)

    def options(self) -> dict[str, Any]:
        return {"weights": self.weights.tolist()}


@REGISTRY.register("per_anchor")
class PerAnchorReducer(Reducer):
    """Per-anchor first: the losses of each anchor's pairs (or triplets) are averaged, an anchor without
    any giving 0, and the ``B`` per-anchor values are reduced by the inner ``reduction`` (``mean`` by
    default) as one loss per anchor (PML ``PerAnchorReducer``). Losses that already are one per anchor or
    sample go to the inner reducer as they are.

    Pairs: each distinct ``(anchor, other)`` pair counts once (PML writes the losses into a
    ``B × R`` matrix; a pair listed twice has the same loss). Triplets (PML raises): each listed triplet
    counts.
    """

    needs_elements = True

    def __init__(self, reduction: str | Mapping[str, Any] | Reducer = "mean") -> None:
        self.inner = from_spec(reduction, "per_anchor: reduction")

    def per_anchor(self, losses: torch.Tensor, elements: Elements) -> torch.Tensor:
        """The ``B`` per-anchor means of pair or triplet ``losses``."""
        num, anchors = elements.num_anchors, elements.anchors
        if elements.kind == "pair":
            where = (anchors, elements.indices[1])
            shape = (num, elements.num_refs)
            values = losses.new_zeros(shape).index_put(where, losses)
            present = torch.zeros(shape, dtype=torch.bool, device=losses.device)
            present = present.index_put(where, torch.ones_like(anchors, dtype=torch.bool))
            sums, counts = values.sum(1), present.sum(1)
        else:
            sums = losses.new_zeros(num).index_add(0, anchors, losses)
            counts = torch.bincount(anchors, minlength=num)
        return sums / counts.clamp_min(1).to(losses.dtype)

    def __call__(self, losses: torch.Tensor, elements: Elements | None = None) -> torch.Tensor:
        elements = _require_elements(self, losses, elements)
        if elements.kind == "element":
            return self.inner(losses, elements)
        rows = torch.arange(elements.num_anchors, device=losses.device)
        return self.inner(self.per_anchor(losses, elements), dataclasses.replace(elements, indices=(rows,)))

    def masked(
        self, losses: torch.Tensor, mask: torch.Tensor, elements: Elements | None = None
    ) -> torch.Tensor:
        elements = _require_elements(self, losses, elements)
        if elements.kind == "element":
            return self.inner.masked(losses, mask, elements)
        return self(losses[mask], elements.select(mask))

    def options(self) -> dict[str, Any]:
        return {"reduction": self.inner}


@REGISTRY.register("do_nothing")
class DoNothingReducer(Reducer):
    """No reduction: the per-element losses are returned as they are (PML ``DoNothingReducer``, which
    returns its loss dictionary). For Python use (inspecting or weighting per-element losses yourself):
    a loss reduced this way returns a tensor, and ``dmlkit train`` refuses it."""

    reduces = False

    def __call__(self, losses: torch.Tensor, elements: Elements | None = None) -> torch.Tensor:
        return losses

    def masked(
        self, losses: torch.Tensor, mask: torch.Tensor, elements: Elements | None = None
    ) -> torch.Tensor:
        return losses[mask]


# ---------------------------------------------------------------------------------------------- lookup


def build(name: str, /, **kwargs: Any) -> Reducer:
    """The reducer registered as ``name`` with its options; an unknown name raises ``UnknownNameError``
    naming the closest, a misspelt option likewise."""
    return REGISTRY.build(name, **kwargs)


def build_spec(registry: Registry[T], spec: object, what: str) -> T:
    """A component of ``registry`` from a configuration value: its name, or ``{name: ..., args: {...}}``
    (``args`` optional). Anything else is a ``ConfigError`` naming ``what``."""
    if isinstance(spec, str):
        return registry.build(spec)
    if isinstance(spec, Mapping) and "name" in spec and set(spec) <= {"name", "args"}:
        args = spec.get("args") or {}
        if isinstance(spec["name"], str) and isinstance(args, Mapping):
            return registry.build(spec["name"], **{str(k): v for k, v in args.items()})
    raise ConfigError(f"{what} must be a name or {{name: ..., args: {{...}}}}, got {spec!r}")


def from_spec(spec: str | Mapping[str, Any] | Reducer, what: str = "reduction") -> Reducer:
    """A reducer from a name, ``{name: ..., args: {...}}`` or a :class:`Reducer` (returned as is)."""
    if isinstance(spec, Reducer):
        return spec
    return build_spec(REGISTRY, spec, what)


def available() -> list[str]:
    """Sorted names of every registered reducer."""
    return REGISTRY.available()


def reduce(losses: torch.Tensor, how: str | Mapping[str, Any] | Reducer) -> torch.Tensor:
    """Reduce per-element losses with the reducer ``how`` (a name, ``{name, args}`` or a reducer); an
    empty tensor reduces to 0."""
    return from_spec(how)(losses)


__all__ = [
    "REGISTRY",
    "AvgNonZeroReducer",
    "ClassWeightedReducer",
    "DoNothingReducer",
    "Elements",
    "MeanReducer",
    "PerAnchorReducer",
    "Reducer",
    "SumReducer",
    "ThresholdReducer",
    "available",
    "build",
    "build_spec",
    "from_spec",
    "reduce",
]
