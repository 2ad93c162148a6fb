"""What a backbone expects of its input: normalisation statistics, input size, interpolation, crop ratio.

:func:`of_backbone` reads it from the library that defines the model (timm's ``pretrained_cfg``,
torchvision's weights metadata); the data pipeline (:mod:`dmlkit.data.transforms`) applies it unless the
user overrides a field. ``None`` fields mean "the dataset recipe's own default".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Preprocessing:
    """A backbone's input expectations (every field optional).

    ``mean``/``std``: per-channel normalisation in [0, 1] units; ``input_size``: the square side it was
    trained at; ``interpolation``: a ``torchvision.transforms.InterpolationMode`` name (``bilinear``,
    ``bicubic``, ...); ``crop_pct``: evaluation resizes the shorter side to ``input_size / crop_pct`` and
    centre-crops ``input_size``.
    """

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    input_size: int | None = None
    interpolation: str | None = None
    crop_pct: float | None = None

    def given(self) -> dict[str, Any]:
        """The fields that are set, as plain data (lists for tuples)."""
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in asdict(self).items()
            if value is not None
        }


def of_backbone(backbone: str) -> Preprocessing:
    """The preprocessing the backbone named ``backbone`` (``small_cnn``, ``timm:<model>``,
    ``torchvision:<model>``) expects; an empty :class:`Preprocessing` when its library says nothing."""
    return Preprocessing()


__all__ = ["Preprocessing", "of_backbone"]
