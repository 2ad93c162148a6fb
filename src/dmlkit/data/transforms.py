"""Image pipelines (``torchvision.transforms.v2``) for training and evaluation.

Two recipes:

- ``photo`` (real RGB photos, e.g. ``folder``/``csv`` datasets), the usual deep-metric-learning pipeline
  (e.g. Musgrave et al., "A Metric Learning Reality Check", 2020): train = ``RandomResizedCrop(size)`` +
  ``RandomHorizontalFlip`` + ``Normalize`` (ImageNet statistics); eval = ``Resize(int(size × 1.14))`` (shorter
  side) + ``CenterCrop(size)`` + ``Normalize``.
- ``glyph`` (small in-memory grayscale images: ``synthetic``, ``omniglot``): train = a small
  ``RandomAffine`` (±10°, ±10 % shift, ×0.9–1.1 scale, bilinear); eval = nothing; both resize only when the
  stored size differs from ``image_size`` and normalise with the dataset's own mean/std (≈ zero mean, unit
  variance).

Both end with a float32 ``C × H × W`` plain tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

from dmlkit.errors import ConfigError, UnknownNameError, unknown_name_message

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
KINDS: tuple[str, ...] = ("train", "eval")
RECIPES: tuple[str, ...] = ("photo", "glyph")
EVAL_RESIZE_RATIO = 1.14  # 256/224: resize the shorter side, then centre-crop


def _stats(values: Sequence[float] | None, default: Sequence[float], channels: int, what: str) -> list[float]:
    values = list(default) if values is None else [float(v) for v in values]
    if len(values) == channels:
        return values
    if len(values) == 3 and channels == 1:
        return [sum(values) / 3.0]  # grayscale photos: the average of the RGB statistics
    if len(values) == 1:
        return values * channels
    raise ConfigError(f"{what} has {len(values)} values for {channels} channel(s)")


def build(
    kind: str,
    image_size: int,
    channels: int = 3,
    *,
    recipe: str = "photo",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    native_size: int | None = None,
    crop_scale: tuple[float, float] = (0.08, 1.0),
) -> v2.Compose:
    """The ``kind`` (``train``/``eval``) pipeline of ``recipe`` (``photo``/``glyph``) for ``image_size``.

    ``mean``/``std`` default to the ImageNet statistics for ``photo`` and to 0.5/0.5 for ``glyph`` (dataset
    builders pass the measured ones); ``native_size`` is the stored size of ``glyph`` images (a resize is
    added when it differs from ``image_size``); ``crop_scale`` is the area range of ``RandomResizedCrop``.
    """
    if kind not in KINDS:
        raise UnknownNameError(unknown_name_message("transform kind", kind, KINDS))
    if recipe not in RECIPES:
        raise UnknownNameError(unknown_name_message("transform recipe", recipe, RECIPES))
    if image_size <= 0:
        raise ConfigError(f"image_size must be positive, got {image_size}")
    if recipe == "photo":
        mean = _stats(mean, IMAGENET_MEAN, channels, "mean")
        std = _stats(std, IMAGENET_STD, channels, "std")
    else:
        mean = _stats(mean, (0.5,), channels, "mean")
        std = _stats(std, (0.5,), channels, "std")
    steps: list[v2.Transform] = [v2.ToImage()]
    if recipe == "photo":
        if kind == "train":
            steps += [
                v2.RandomResizedCrop(image_size, scale=crop_scale, antialias=True),
                v2.RandomHorizontalFlip(),
            ]
        else:
            steps += [
                v2.Resize(int(image_size * EVAL_RESIZE_RATIO), antialias=True),
                v2.CenterCrop(image_size),
            ]
    else:
        if native_size is not None and native_size != image_size:
            steps.append(v2.Resize((image_size, image_size), antialias=True))
        if kind == "train":
            steps.append(
                v2.RandomAffine(
                    degrees=10.0,
                    translate=(0.1, 0.1),
                    scale=(0.9, 1.1),
                    interpolation=v2.InterpolationMode.BILINEAR,
                )
            )
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std), v2.ToPureTensor()]
    return v2.Compose(steps)


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "KINDS", "RECIPES", "build"]
