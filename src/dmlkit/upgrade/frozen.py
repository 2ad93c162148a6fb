"""The old model inside a new model's training step: a frozen encoder fed through an input adapter.

Compatibility training (:mod:`dmlkit.upgrade.bct`, :mod:`dmlkit.upgrade.compatible`) needs the old model's
embedding of every training image. The batch is preprocessed for the *new* model; the old one may have been
trained with another normalisation, image size or channel count. :class:`InputAdapter` maps one to the
other on the device, without decoding the image again:

    pixels = x · std_new + mean_new                       (undo the new normalisation, per channel)
    pixels → the old channel count                        (gray repeated into RGB; RGB → gray by luma)
    pixels → resized to the old image size                (bilinear, antialiased; only if it differs)
    x_old  = (pixels − mean_old) / std_old

Resizing commutes with the per-channel affine maps (interpolation weights sum to 1), so the order only
matters for rounding. The crops of the two pipelines are not reconciled: the old model sees the new
pipeline's crop of the image, resized.

:class:`FrozenEncoder` runs the old model: always in eval mode (BatchNorm running statistics, no dropout),
under ``torch.no_grad``, its parameters never trainable. An owner keeps it in a tuple attribute (as
:class:`~dmlkit.train.step.EmbeddingStep` keeps the model) so the old weights are not saved again in every
checkpoint of the new model, and moves it to the training device itself (``Module.to`` does not reach it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dmlkit.data.transforms import LUMA_WEIGHTS, normalisation, recipe_of
from dmlkit.errors import ConfigError


def _size_pair(image_size: int | Sequence[int]) -> tuple[int, int]:
    """``(height, width)`` from an int (square) or a pair."""
    if isinstance(image_size, int):
        pair: tuple[int, ...] = (image_size, image_size)
    else:
        pair = tuple(int(s) for s in image_size)
    if len(pair) != 2 or min(pair) <= 0:
        raise ConfigError(f"image_size must be a positive int or (height, width), got {image_size!r}")
    return pair  # type: ignore[return-value]


@dataclass(frozen=True)
class Preprocessing:
    """How a model's input images are normalised: ``x = (pixels − mean) / std`` per channel, pixels in
    [0, 1], at ``image_size`` (an int for a square, or ``(height, width)``)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: tuple[int, int]

    def __init__(self, mean: Sequence[float], std: Sequence[float], image_size: int | Sequence[int]) -> None:
        mean_t, std_t = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if len(mean_t) not in (1, 3) or len(mean_t) != len(std_t):
            raise ConfigError(f"mean and std need 1 or 3 values each, got {list(mean_t)} and {list(std_t)}")
        if min(std_t) <= 0:
            raise ConfigError(f"std must be positive, got {list(std_t)}")
        object.__setattr__(self, "mean", mean_t)
        object.__setattr__(self, "std", std_t)
        object.__setattr__(self, "image_size", _size_pair(image_size))

    @property
    def channels(self) -> int:
        return len(self.mean)

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> Preprocessing:
        """From a dataset spec (:func:`dmlkit.data.data_spec`, stored in checkpoints as ``data_spec``):
        its ``mean``/``std``, or the recipe's defaults (ImageNet for photo recipes, 0.5 for ``glyph``)."""
        recipe = recipe_of(spec.get("recipe", "photo"), spec.get("recipe_args"), spec.get("crop_scale"))
        channels = int(spec.get("channels", 3))
        mean, std = normalisation(recipe.family, channels, spec.get("mean"), spec.get("std"))
        return cls(mean, std, spec["image_size"])


class InputAdapter(nn.Module):
    """Maps a batch preprocessed as ``new`` to the input the old model expects (``old``); see the module
    docstring for the formula. The identity (returns its input) when both descriptions are equal."""

    def __init__(self, new: Preprocessing, old: Preprocessing) -> None:
        super().__init__()
        self.new, self.old = new, old
        self.identity = new == old
        # Buffers (not persistent: the adapter is rebuilt from the two descriptions, never loaded) so that
        # ``.to(device)`` moves them with the frozen model.
        self.register_buffer("new_mean", torch.tensor(new.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("new_std", torch.tensor(new.std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("old_mean", torch.tensor(old.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("old_std", torch.tensor(old.std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("luma", torch.tensor(LUMA_WEIGHTS).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return images
        if images.dim() != 4 or images.shape[1] != self.new.channels:
            raise ConfigError(
                f"the input adapter expects N × {self.new.channels} × H × W images (the new model's "
                f"preprocessing), got shape {tuple(images.shape)}"
            )
        pixels = images.float() * self.new_std + self.new_mean
        if self.new.channels == 1 and self.old.channels == 3:
            pixels = pixels.expand(-1, 3, -1, -1)
        elif self.new.channels == 3 and self.old.channels == 1:
            pixels = (pixels * self.luma).sum(dim=1, keepdim=True)
        if tuple(pixels.shape[-2:]) != self.old.image_size:
            pixels = F.interpolate(
                pixels, size=self.old.image_size, mode="bilinear", align_corners=False, antialias=True
            )
        return (pixels - self.old_mean) / self.old_std

    def extra_repr(self) -> str:
        return f"new={self.new}, old={self.old}"


class FrozenEncoder(nn.Module):
    """A frozen model behind an optional :class:`InputAdapter`: ``forward(images) -> float32 embeddings``.

    Always in eval mode (``train()`` is a no-op), under ``torch.no_grad``, parameters ``requires_grad``
    False. Owners hold it outside their ``state_dict`` (a tuple attribute) and move it to their device.
    """

    def __init__(self, model: nn.Module, adapter: InputAdapter | None = None) -> None:
        super().__init__()
        self.model = model.requires_grad_(False)
        self.adapter = adapter if adapter is not None else nn.Identity()
        super().train(False)

    def train(self, mode: bool = True) -> FrozenEncoder:
        """Stay in eval mode whatever the owner's mode: the old model's BatchNorm statistics and dropout
        are those it was deployed with."""
        del mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.adapter(images)).float()  # type: ignore[no-any-return]


__all__ = ["FrozenEncoder", "InputAdapter", "Preprocessing"]
