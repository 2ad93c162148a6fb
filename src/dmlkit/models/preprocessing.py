"""What a backbone expects of its input: normalisation statistics, input size, interpolation, crop ratio.

:func:`of_backbone` reads it from the library that defines the model, without building the model or
downloading anything: timm's ``pretrained_cfg`` (``timm.models.get_pretrained_cfg``), torchvision's
weights metadata (``torchvision.models.get_model_weights(name).<tag>.transforms()``). The data pipeline
(:mod:`dmlkit.data.transforms`) applies it unless the user overrides a field. ``None`` fields mean "the
dataset recipe's own default".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dmlkit.models import weights


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


def _square(size: Any) -> int | None:
    """The side of a square ``(C, H, W)`` / ``(H, W)`` / ``H`` input size; ``None`` for a non-square one."""
    if isinstance(size, int):
        return size
    sides = [int(s) for s in size][-2:]
    return sides[0] if len(set(sides)) == 1 else None  # torchvision gives [224] for 224 × 224


def _floats(values: Any) -> tuple[float, ...] | None:
    return None if values is None else tuple(float(v) for v in values)


def _timm(model: str, tag: str | None) -> Preprocessing:
    """timm's pretrained configuration of ``model`` (its default tag, or ``tag``); nothing is built."""
    from timm.models import get_pretrained_cfg

    name = model if tag is None or "." in model else f"{model}.{tag}"
    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return Preprocessing()
    return Preprocessing(
        mean=_floats(cfg.mean),
        std=_floats(cfg.std),
        input_size=_square(cfg.input_size),
        interpolation=str(cfg.interpolation) if cfg.interpolation else None,
        crop_pct=float(cfg.crop_pct) if cfg.crop_pct else None,
    )


#: torchvision builders that set ``transform_input=True`` with their ImageNet weights: the model then maps
#: ImageNet-normalised input to ``(x − 0.5) / 0.5`` itself. dmlkit's feature extractor runs the layers
#: only, so it normalises with 0.5/0.5 directly, which is the same input.
_TRANSFORM_INPUT = frozenset({"googlenet", "inception_v3"})


def _torchvision(model: str, tag: str | None) -> Preprocessing:
    """torchvision's weights metadata of ``model`` (``DEFAULT`` or the member ``tag``); nothing is
    downloaded (the ``transforms`` preset only holds the numbers)."""
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(model)
    except (ValueError, KeyError):  # a model without published weights
        return Preprocessing()
    member = enum.DEFAULT if tag is None else enum[tag]
    preset = member.transforms()
    crop, resize = getattr(preset, "crop_size", None), getattr(preset, "resize_size", None)
    if crop is None or not hasattr(preset, "mean"):  # not an image-classification preset
        return Preprocessing()
    crop_side, resize_side = _square(crop), (_square(resize) if resize else None)
    mean, std = _floats(preset.mean), _floats(preset.std)
    if model in _TRANSFORM_INPUT:
        mean = std = (0.5, 0.5, 0.5)
    interpolation = getattr(preset, "interpolation", None)
    return Preprocessing(
        mean=mean,
        std=std,
        input_size=crop_side,
        interpolation=getattr(interpolation, "value", None),
        crop_pct=crop_side / resize_side if crop_side and resize_side else None,
    )


def of_backbone(backbone: str, pretrained_weights: str | Path | None = None) -> Preprocessing:
    """The preprocessing the backbone named ``backbone`` (``small_cnn``, ``timm:<model>``,
    ``torchvision:<model>``) expects; an empty :class:`Preprocessing` when its library says nothing.

    ``pretrained_weights``: with a ``package:`` shortcut, the metadata of those very weights (e.g. the
    MobileNetV2 file is torchvision's ``IMAGENET1K_V1``, evaluated at 256 → 224, not the ``DEFAULT`` V2's
    232 → 224); files and ``None`` use the library's default weights. Unknown backbone names raise
    ``UnknownNameError``.
    """
    from dmlkit.models.backbones import REGISTRY

    REGISTRY.get(backbone)  # an unknown name is an error here too, naming the closest
    parsed = REGISTRY.family_of(backbone)
    if parsed is None:
        return Preprocessing()
    family, model = parsed
    package = weights.shortcut_for(pretrained_weights)
    tag = package.tag if package is not None and package.backbone == backbone else None
    if family.prefix == "timm":
        return _timm(model, tag)
    if family.prefix == "torchvision":
        return _torchvision(model, tag)
    return Preprocessing()


__all__ = ["Preprocessing", "of_backbone"]
