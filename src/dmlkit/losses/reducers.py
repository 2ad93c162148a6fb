"""Reductions of per-element losses to a scalar, picked by name: ``build(name)`` and ``available()``.

- ``mean``: ``Σ lᵢ / N`` (PML ``MeanReducer``);
- ``avg_non_zero``: ``Σ_{lᵢ > 0} lᵢ / #{lᵢ > 0}`` (PML ``AvgNonZeroReducer``);
- ``sum``: ``Σ lᵢ`` (PML ``SumReducer``).

Nothing to reduce gives 0 (PML returns its "zero loss" before reducing), never NaN. Besides reducing a
tensor, a reducer reduces the elements a mask selects without listing them (:meth:`Reducer.masked`: no
data-dependent shape, so no device sync), and names the divisor of a sum (:meth:`Reducer.divisor`) for the
fused loss paths that compute sums and counts themselves.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from dmlkit.registry import Registry

REGISTRY: Registry[Reducer] = Registry("reduction")


class Reducer(ABC):
    """How per-element losses become one number."""

    @abstractmethod
    def __call__(self, losses: torch.Tensor) -> torch.Tensor:
        """The reduced scalar of ``losses`` (any shape; empty: 0)."""

    @abstractmethod
    def masked(self, losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``self(losses[mask])`` without building the index list. Unselected entries must be finite (their
        gradient is multiplied by 0)."""

    @abstractmethod
    def divisor(self, count: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """What a sum of ``count`` non-negative terms, ``active`` of them positive, is divided by (int64
        tensors; the result may be 0: callers clamp it at 1, an empty sum being 0)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _kept_mean(losses: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    # mean(losses[keep]) as a masked sum: no data-dependent shape (a device sync), and exactly the same
    # gradient, 1/count on kept elements and 0 elsewhere; 0 when nothing is kept.
    total = torch.where(keep, losses, torch.zeros_like(losses)).sum()
    return total / keep.sum().clamp_min(1).to(losses.dtype)


@REGISTRY.register("mean")
class MeanReducer(Reducer):
    """``Σ lᵢ / N`` over all elements (PML ``MeanReducer``)."""

    def __call__(self, losses: torch.Tensor) -> torch.Tensor:
        return losses.mean() if losses.numel() > 0 else losses.sum()

    def masked(self, losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return _kept_mean(losses, mask)

    def divisor(self, count: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        return count


@REGISTRY.register("avg_non_zero")
class AvgNonZeroReducer(Reducer):
    """``Σ_{lᵢ > 0} lᵢ / #{lᵢ > 0}``, the mean of the positive elements (PML ``AvgNonZeroReducer``)."""

    def __call__(self, losses: torch.Tensor) -> torch.Tensor:
        return _kept_mean(losses, losses > 0)

    def masked(self, losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return _kept_mean(losses, mask & (losses > 0))

    def divisor(self, count: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        return active


@REGISTRY.register("sum")
class SumReducer(Reducer):
    """``Σ lᵢ`` (PML ``SumReducer``)."""

    def __call__(self, losses: torch.Tensor) -> torch.Tensor:
        return losses.sum()

    def masked(self, losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, losses, torch.zeros_like(losses)).sum()

    def divisor(self, count: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(count)


def build(name: str, /, **kwargs: Any) -> Reducer:
    """The reducer registered as ``name``; an unknown name raises ``UnknownNameError`` naming the closest."""
    return REGISTRY.build(name, **kwargs)


def available() -> list[str]:
    """Sorted names of every registered reducer."""
    return REGISTRY.available()


def reduce(losses: torch.Tensor, how: str) -> torch.Tensor:
    """Reduce per-element losses to a scalar with the reducer named ``how``; an empty tensor reduces to 0."""
    return build(how)(losses)


__all__ = [
    "REGISTRY",
    "AvgNonZeroReducer",
    "MeanReducer",
    "Reducer",
    "SumReducer",
    "available",
    "build",
    "reduce",
]
