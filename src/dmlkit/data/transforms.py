"""Image pipelines (``torchvision.transforms.v2``) for training and evaluation.

:func:`build` wraps a named augmentation recipe (:mod:`dmlkit.data.augment`: ``photo``, ``base``, ``big``,
``red``, ``adv``, ``randaugment``, ``test``, ``glyph``) between the same first and last steps:

- first :class:`MatchChannels` (any PIL image or ``uint8`` tensor, 1–4 channels, becomes ``channels``
  channels) and, for the ``glyph`` family, :class:`FitSize`;
- then the recipe's ``train`` or ``eval`` steps at ``image_size`` (interpolation and evaluation crop ratio
  as given, else the recipe's defaults);
- last :class:`Normalise` (``ToDtype(float32, scale=True)`` + ``Normalize(mean, std)`` fused): ImageNet
  statistics by default for the photo recipes, 0.5/0.5 for ``glyph`` (dataset builders pass the measured
  ones).

The output is always a float32 ``channels × image_size × image_size`` plain tensor, whatever the input.
So a checkpoint's recorded pipeline (``transforms.build("eval", **data_spec)``) applies to any dataset: a
glyph model evaluated on 105 px glyphs or on RGB photos of varying sizes sees what it was trained on.
The defaults are the two historical recipes: ``photo`` (``RandomResizedCrop`` + flip; eval shorter side
to ``int(1.14 · size)``, centre crop) and ``glyph`` (a small ``RandomAffine``; eval nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2

from dmlkit.data import augment
from dmlkit.data.images import to_channels
from dmlkit.errors import ConfigError, DataError, UnknownNameError, unknown_name_message

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
KINDS: tuple[str, ...] = ("train", "eval")
EVAL_RESIZE_RATIO = augment.PHOTO_EVAL_RATIO  # ``photo``: resize the shorter side to 1.14 · size, centre-crop
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


class Normalise:
    """Last step of every pipeline: ``(x / 255 − mean) / std`` for a ``uint8`` image (``(x − mean) / std``
    for a float one in [0, 1]) as a plain float32 tensor, in one fused multiply-add (``x · a + b``): the
    same values as ``ToDtype(float32, scale=True)`` + ``Normalize(mean, std)`` to float32 rounding (≤ 1e-6),
    at half the cost (one pass over the pixels instead of three)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        stats = torch.tensor([self.mean, self.std], dtype=torch.float32).view(2, -1, 1, 1)
        if (stats[1] <= 0).any():
            raise ConfigError(f"std must be positive, got {self.std}")
        self._scale = 1.0 / stats[1]
        self._shift = -stats[0] / stats[1]
        self._scale_u8 = self._scale / 255.0

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        tensor = image.as_subclass(torch.Tensor)
        if tensor.shape[-3] != self._scale.shape[0]:
            raise DataError(f"{tensor.shape[-3]} channel(s) for {len(self.mean)} mean/std value(s)")
        if tensor.dtype == torch.uint8:
            return torch.addcmul(self._shift, tensor, self._scale_u8)
        return torch.addcmul(self._shift, tensor.to(torch.float32), self._scale)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


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


def recipe_of(
    recipe: str, recipe_args: dict[str, Any] | None = None, crop_scale: Sequence[float] | None = None
) -> augment.Recipe:
    """The :class:`~dmlkit.data.augment.Recipe` ``recipe`` with ``recipe_args``; ``crop_scale`` (the older
    spelling of ``photo``'s ``scale``) is passed as ``scale``."""
    args = dict(recipe_args or {})
    if crop_scale is not None:
        if "scale" in args and list(args["scale"]) != list(crop_scale):
            given = f"crop_scale {list(crop_scale)} and recipe_args scale {args['scale']}"
            raise ConfigError(f"{given}: give one")
        args["scale"] = tuple(crop_scale)
    return augment.build(recipe, **args)


def normalisation(
    family: str, channels: int, mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[list[float], list[float]]:
    """``(mean, std)`` per channel: the given ones, else ImageNet's (``photo`` family) or 0.5 (``glyph``)."""
    if family == "glyph":
        return _stats(mean, (0.5,), channels, "mean"), _stats(std, (0.5,), channels, "std")
    return _stats(mean, IMAGENET_MEAN, channels, "mean"), _stats(std, IMAGENET_STD, channels, "std")


def build(
    kind: str,
    image_size: int,
    channels: int = 3,
    *,
    recipe: str = "photo",
    recipe_args: dict[str, Any] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    native_size: int | None = None,
    crop_scale: Sequence[float] | None = None,
    interpolation: str | None = None,
    crop_pct: float | None = None,
) -> v2.Compose:
    """The ``kind`` (``train``/``eval``) pipeline of the augmentation ``recipe`` at ``image_size``.

    ``recipe_args`` are the recipe's hyperparameters (:mod:`dmlkit.data.augment`); ``mean``/``std``
    default to the ImageNet statistics for photo recipes and to 0.5/0.5 for ``glyph``; ``interpolation``
    (``bilinear`` by default, ``bicubic``, ``nearest``) is used by every resize of a photo recipe;
    ``crop_pct`` sets the evaluation resize (shorter side to ``floor(image_size / crop_pct)``; default: the
    recipe's, e.g. 0.875 for ``base``, ``int(1.14 · size)`` for ``photo``); ``native_size`` records the
    stored size of a dataset's glyph images (kept in the spec for reference: :class:`FitSize` resizes by
    each input's actual size); ``crop_scale`` is ``photo``'s ``scale`` (the area range of
    ``RandomResizedCrop``). The output is always a float32 ``channels × image_size × image_size`` tensor.
    """
    if kind not in KINDS:
        raise UnknownNameError(unknown_name_message("transform kind", kind, KINDS))
    chosen = recipe_of(recipe, recipe_args, crop_scale)
    if image_size <= 0:
        raise ConfigError(f"image_size must be positive, got {image_size}")
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3, got {channels}")
    mean, std = normalisation(chosen.family, channels, mean, std)
    del native_size  # recorded in specs; the resize below depends on each input's size, not on it
    mode = augment.interpolation_mode(interpolation or "bilinear")
    crop_pct = crop_pct if crop_pct is not None else chosen.default_crop_pct
    steps: list[Any] = [MatchChannels(channels), v2.ToImage()]
    if chosen.family == "glyph":
        steps.append(FitSize(image_size))
    make = chosen.train_steps if kind == "train" else chosen.eval_steps
    steps += make(image_size, mode, crop_pct)
    steps.append(Normalise(mean, std))
    return v2.Compose(steps)


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KINDS",
    "LUMA_WEIGHTS",
    "FitSize",
    "MatchChannels",
    "Normalise",
    "augment",
    "build",
    "normalisation",
    "recipe_of",
]
