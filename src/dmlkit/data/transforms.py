"""Image pipelines (``torchvision.transforms.v2``) for training and evaluation.

Two recipes:

- ``photo`` (real RGB photos, e.g. ``folder``/``csv`` datasets), the usual deep-metric-learning pipeline
  (e.g. Musgrave et al., "A Metric Learning Reality Check", 2020): train = ``RandomResizedCrop(size)`` +
  ``RandomHorizontalFlip`` + ``Normalize`` (ImageNet statistics); eval = ``Resize(int(size × 1.14))`` (shorter
  side) + ``CenterCrop(size)`` + ``Normalize``.
- ``glyph`` (small in-memory grayscale images: ``synthetic``, ``omniglot``): train = a small
  ``RandomAffine`` (±10°, ±10 % shift, ×0.9–1.1 scale, bilinear); eval = nothing; both resize an input
  whose size is not ``image_size`` × ``image_size`` (:class:`FitSize`) and normalise with the dataset's own
  mean/std (≈ zero mean, unit variance).

Every pipeline starts with :class:`MatchChannels` and ends with a float32 ``channels × image_size ×
image_size`` plain tensor, whatever the input: a PIL image of any mode or a ``uint8`` tensor, of any size,
with 1, 3 (or with an alpha channel 2 or 4) channels. So a checkpoint's recorded pipeline
(``transforms.build("eval", **data_spec)``) applies to any dataset: a glyph model evaluated on 105 px glyphs
or on RGB photos of varying sizes sees what it was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2

from dmlkit.data.images import to_channels
from dmlkit.errors import ConfigError, DataError, UnknownNameError, unknown_name_message

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
KINDS: tuple[str, ...] = ("train", "eval")
RECIPES: tuple[str, ...] = ("photo", "glyph")
EVAL_RESIZE_RATIO = 1.14  # 256/224: resize the shorter side, then centre-crop
#: RGB → gray weights (ITU-R 601-2 luma), the ones of Pillow's ``convert("L")``: a tensor and a decoded file
#: become the same gray image.
LUMA_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)


class MatchChannels:
    """First step of every pipeline: the input as ``channels`` channels (1 or 3).

    A PIL image goes through :func:`dmlkit.data.images.to_channels` (the decoder's own conversion: 16-bit
    scaling, transparency onto white, ``L`` / ``RGB``). A tensor (``C × H × W`` or ``H × W``; ``uint8`` or
    float in [0, 1]) has a trailing alpha channel (C = 2 or 4) composited onto white, then gray is repeated
    into RGB or RGB is reduced to gray with :data:`LUMA_WEIGHTS`; its dtype is kept.
    """

    def __init__(self, channels: int) -> None:
        if channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3, got {channels}")
        self.channels = channels

    def __call__(self, image: Any) -> Any:
        if isinstance(image, Image.Image):
            return to_channels(image, self.channels)
        tensor = image if isinstance(image, torch.Tensor) else v2.functional.to_image(image)
        tensor = tensor.as_subclass(torch.Tensor)
        if tensor.dim() == 2:
            tensor = tensor.unsqueeze(0)
        if tensor.dim() != 3:
            raise DataError(f"expected a C × H × W image, got a tensor of shape {tuple(tensor.shape)}")
        if tensor.shape[0] in (2, 4):
            tensor = self._without_alpha(tensor)
        count = tensor.shape[0]
        if count == self.channels:
            return tensor
        if count == 1 and self.channels == 3:
            return tensor.expand(3, -1, -1).contiguous()
        if count == 3 and self.channels == 1:
            weights = torch.tensor(LUMA_WEIGHTS, dtype=torch.float32).view(3, 1, 1)
            gray = (tensor.float() * weights).sum(0, keepdim=True)
            return gray.round_().clamp_(0, 255).to(tensor.dtype) if tensor.dtype == torch.uint8 else gray
        raise DataError(f"cannot turn a {count}-channel image into {self.channels} channel(s)")

    @staticmethod
    def _without_alpha(tensor: torch.Tensor) -> torch.Tensor:
        full = 255.0 if tensor.dtype == torch.uint8 else 1.0
        colour, alpha = tensor[:-1].float(), tensor[-1:].float() / full
        out = colour * alpha + full * (1.0 - alpha)  # onto white, like the decoder
        return out.round_().to(torch.uint8) if tensor.dtype == torch.uint8 else out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(channels={self.channels})"


class FitSize:
    """Resize (bilinear, antialiased) an image whose size is not ``size × size`` to exactly that; others
    pass untouched. Decided per input, so stored glyphs of the training size are never resampled."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if tuple(image.shape[-2:]) == (self.size, self.size):
            return image
        return v2.functional.resize(image, [self.size, self.size], antialias=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


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
    builders pass the measured ones); ``native_size`` records the stored size of a dataset's ``glyph``
    images (kept in the spec for reference: :class:`FitSize` resizes by each input's actual size);
    ``crop_scale`` is the area range of ``RandomResizedCrop``. The output is always a float32 ``channels ×
    image_size × image_size`` tensor (:class:`MatchChannels`, :class:`FitSize`).
    """
    if kind not in KINDS:
        raise UnknownNameError(unknown_name_message("transform kind", kind, KINDS))
    if recipe not in RECIPES:
        raise UnknownNameError(unknown_name_message("transform recipe", recipe, RECIPES))
    if image_size <= 0:
        raise ConfigError(f"image_size must be positive, got {image_size}")
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3, got {channels}")
    if recipe == "photo":
        mean = _stats(mean, IMAGENET_MEAN, channels, "mean")
        std = _stats(std, IMAGENET_STD, channels, "std")
    else:
        mean = _stats(mean, (0.5,), channels, "mean")
        std = _stats(std, (0.5,), channels, "std")
    del native_size  # recorded in specs; the resize below depends on each input's size, not on it
    steps: list[Any] = [MatchChannels(channels), v2.ToImage()]
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
        steps.append(FitSize(image_size))
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


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KINDS",
    "LUMA_WEIGHTS",
    "RECIPES",
    "FitSize",
    "MatchChannels",
    "build",
]
