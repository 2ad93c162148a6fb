"""Pairwise distances and similarities in one place.

Every loss, miner and metric asks this module for an ``n × m`` matrix and whether larger values
mean "closer" (a similarity) or "farther" (a distance), so each formula is written once.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

DistanceName = Literal["euclidean", "squared_euclidean", "cosine", "dot"]
DISTANCES: tuple[str, ...] = ("euclidean", "squared_euclidean", "cosine", "dot")


def is_similarity(distance: str) -> bool:
    """True when larger values mean more similar (``cosine`` and ``dot``)."""
    check_distance(distance)
    return distance in ("cosine", "dot")


def check_distance(distance: str) -> None:
    """Raise a ``ValueError`` naming ``distance`` if it is not one of :data:`DISTANCES`."""
    if distance not in DISTANCES:
        from dmlkit.errors import UnknownNameError, unknown_name_message

        raise UnknownNameError(unknown_name_message("distance", distance, DISTANCES))


def pairwise(x: torch.Tensor, y: torch.Tensor | None = None, distance: str = "cosine") -> torch.Tensor:
    """Matrix of ``distance`` between rows of ``x`` (n × d) and rows of ``y`` (m × d; ``x`` if None).

    - ``cosine``: ⟨x/‖x‖, y/‖y‖⟩ (a similarity)
    - ``dot``: ⟨x, y⟩ (a similarity)
    - ``euclidean``: ‖x − y‖₂, computed stably (clamped at 0 before the square root)
    - ``squared_euclidean``: ‖x − y‖₂²
    """
    check_distance(distance)
    if y is None:
        y = x
    if distance == "cosine":
        return F.normalize(x, dim=1) @ F.normalize(y, dim=1).T
    if distance == "dot":
        return x @ y.T
    squared = (x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1).unsqueeze(0) - 2.0 * (x @ y.T)).clamp_min(0.0)
    if distance == "squared_euclidean":
        return squared
    # sqrt has an infinite gradient at 0: the mask keeps identical pairs' gradient at 0 instead of NaN.
    zero = squared == 0
    return torch.sqrt(squared + zero.to(squared.dtype) * 1e-16) * (~zero).to(squared.dtype)
