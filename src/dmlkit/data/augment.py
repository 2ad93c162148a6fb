"""Augmentation recipes by name: each gives a training pipeline and the evaluation pipeline that goes with it.

A recipe covers the geometric and photometric steps between the input (already ``channels`` channels, a
``uint8`` tensor: :class:`~dmlkit.data.transforms.MatchChannels`) and the float conversion and normalisation
that :func:`dmlkit.data.transforms.build` adds around it. Recipes are registered in :data:`REGISTRY`
(``--augment NAME --augment-args MAP``):

==============  ===========================================================================================
``photo``       dmlkit's default for photos (Musgrave et al. 2020): ``RandomResizedCrop(size, scale)`` +
                horizontal flip; eval: shorter side to ``int(1.14 · size)``, centre crop ``size``.
``base``        Roth et al. 2020 (``--augmentation base``): ``RandomResizedCrop(size)`` + flip; eval
                (their test recipe): shorter side to ``size / crop_pct`` (256 for 224), centre crop.
``big``         Roth's ``big``: ``base`` at 256 px (``RandomResizedCrop(256)`` + flip; eval shorter side to
                256, centre crop 256).
``red``         Roth's ``red`` (reduced): shorter side to ``size / crop_pct``, ``RandomCrop(size)`` + flip.
``adv``         Roth's ``adv``: ``RandomResizedCrop`` + ``RandomGrayscale(0.2)`` + ``ColorJitter(0.2, 0.2,
                0.2, 0.2)`` + flip.
``randaugment`` Berton et al. 2025: ``RandomResizedCrop`` + flip + ``RandAugment(num_ops=3, magnitude)``.
``test``        no augmentation: training sees the evaluation pipeline (resize + centre crop).
``glyph``       small grayscale glyphs: ``RandomAffine`` (±10°, ±10 % shift, ×0.9–1.1); eval: nothing. Both
                resize an input of another size to ``size × size`` (:class:`~dmlkit.data.transforms.FitSize`).
==============  ===========================================================================================

A recipe's ``family`` says whose statistics it normalises with: ``photo`` recipes take the backbone's
preprocessing (mean, std, input size, interpolation, crop ratio) unless a flag overrides it, ``glyph`` keeps
the dataset's own. Every random draw goes through torch's default generator, which
:class:`~dmlkit.data.base.ImageDataset` seeds per item from (seed, epoch, index).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from torchvision.transforms import v2

from dmlkit.errors import ConfigError
from dmlkit.registry import Registered, Registry, SharedOptions, extends

#: The interpolation names a recipe accepts (``torchvision.transforms.InterpolationMode`` values).
INTERPOLATIONS: tuple[str, ...] = ("nearest", "bilinear", "bicubic")
#: dmlkit's historical evaluation resize for ``photo``: shorter side to ``int(size · 1.14)`` (256/224).
PHOTO_EVAL_RATIO = 1.14
#: The test recipe of Roth et al. and timm's default: resize to ``size / 0.875`` (256 for 224), centre crop.
DEFAULT_CROP_PCT = 0.875
#: ``RandomResizedCrop``'s defaults (torchvision, Szegedy et al. 2015).
DEFAULT_SCALE: tuple[float, float] = (0.08, 1.0)
DEFAULT_RATIO: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
Mode = v2.InterpolationMode


def interpolation_mode(name: str) -> v2.InterpolationMode:
    """The ``InterpolationMode`` called ``name`` (:data:`INTERPOLATIONS`)."""
    if name not in INTERPOLATIONS:
        raise ConfigError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got '{name}'")
    return v2.InterpolationMode(name)


def eval_resize(size: int, crop_pct: float | None) -> int:
    """The shorter side before the centre crop of ``size``: ``floor(size / crop_pct)`` (timm's rule), or
    ``int(size · 1.14)`` when ``crop_pct`` is None (``photo``'s historical rule)."""
    if crop_pct is None:
        return int(size * PHOTO_EVAL_RATIO)
    if not 0.0 < crop_pct <= 1.0:
        raise ConfigError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return math.floor(size / crop_pct + 1e-6)  # 224 / (224/232) is 231.99999999999997


def _pair(values: tuple[float, float] | list[float], what: str, low: float) -> tuple[float, float]:
    pair = tuple(float(v) for v in values)
    if len(pair) != 2 or not low <= pair[0] <= pair[1]:
        raise ConfigError(f"{what} must be two increasing numbers from {low}, got {list(values)}")
    return pair  # type: ignore[return-value]


@dataclass(frozen=True)
class CropPlan:
    """A training pipeline that is exactly ``RandomResizedCrop(size, scale, ratio)`` + a horizontal flip of
    probability ``flip``: what the GPU pipeline (:mod:`dmlkit.data.gpu_pipeline`) can run batched."""

    scale: tuple[float, float]
    ratio: tuple[float, float]
    flip: float


class Recipe(Registered, SharedOptions):
    """Base of the recipes: the steps of the training and evaluation pipelines at a size.

    Subclasses declare their hyperparameters as the keyword parameters of ``configure`` (a subclass adds
    to its base's with :func:`~dmlkit.registry.extends`; the registry checks names and types) and implement
    :meth:`train_steps`; the evaluation steps default to resize + centre crop. :attr:`default_size` /
    :attr:`default_crop_pct` are what the recipe uses when nothing more specific is given.
    """

    #: ``photo``: the backbone's preprocessing applies; ``glyph``: the dataset's statistics do.
    family: ClassVar[str] = "photo"
    #: The input size the recipe itself asks for (``big``: 256), below a flag, above backbone and dataset.
    default_size: ClassVar[int | None] = None
    #: The evaluation crop ratio when neither a flag nor the backbone gives one.
    default_crop_pct: ClassVar[float | None] = DEFAULT_CROP_PCT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.apply_arguments(args, kwargs)

    def arguments(self) -> dict[str, Any]:
        """The recipe's hyperparameters as plain data (recorded in a checkpoint's data spec)."""
        return {}

    def train_steps(self, size: int, mode: Mode, crop_pct: float | None) -> list[Any]:
        """The training steps on a ``uint8`` image, ending at ``size × size``."""
        raise NotImplementedError

    def eval_steps(self, size: int, mode: Mode, crop_pct: float | None) -> list[Any]:
        """The evaluation steps: shorter side to :func:`eval_resize`, centre crop ``size``."""
        return [
            v2.Resize(eval_resize(size, crop_pct), interpolation=mode, antialias=True),
            v2.CenterCrop(size),
        ]

    def crop_plan(self) -> CropPlan | None:
        """The training pipeline as a :class:`CropPlan` when it is one (the GPU pipeline needs it)."""
        return None


#: The recipes: ``REGISTRY.build(name, **args)`` → :class:`Recipe`.
REGISTRY: Registry[Recipe] = Registry("augmentation")


class _ResizedCropRecipe(Recipe):
    """``RandomResizedCrop(size, scale, ratio)`` + horizontal flip (``flip``: its probability)."""

    def configure(
        self,
        scale: tuple[float, float] = DEFAULT_SCALE,
        ratio: tuple[float, float] = DEFAULT_RATIO,
        flip: float = 0.5,
    ) -> None:
        self.scale = _pair(scale, "scale", 0.0)
        self.ratio = _pair(ratio, "ratio", 1e-6)
        if self.scale[1] > 1.0 or self.scale[1] <= 0.0:
            raise ConfigError(f"scale must lie in (0, 1], got {list(scale)}")
        if not 0.0 <= flip <= 1.0:
            raise ConfigError(f"flip is a probability, got {flip}")
        self.flip = float(flip)

    def arguments(self) -> dict[str, Any]:
        return {"scale": list(self.scale), "ratio": list(self.ratio), "flip": self.flip}

    def crop_steps(self, size: int, mode: Mode) -> list[Any]:
        crop = v2.RandomResizedCrop(
            size, scale=self.scale, ratio=self.ratio, interpolation=mode, antialias=True
        )
        return [crop, v2.RandomHorizontalFlip(self.flip)]

    def train_steps(self, size: int, mode: Mode, crop_pct: float | None) -> list[Any]:
        return self.crop_steps(size, mode)

    def crop_plan(self) -> CropPlan | None:
        return CropPlan(self.scale, self.ratio, self.flip)


@REGISTRY.register("photo")
class Photo(_ResizedCropRecipe):
    """dmlkit's default for photos: ``RandomResizedCrop`` + flip; eval resize ``int(1.14 · size)`` + crop."""

    default_crop_pct = None


@REGISTRY.register("base")
class Base(_ResizedCropRecipe):
    """Roth et al. (2020) ``base``: ``RandomResizedCrop`` + flip; eval ``size / 0.875`` + centre crop."""


@REGISTRY.register("big")
class Big(_ResizedCropRecipe):
    """Roth et al. (2020) ``big``: ``base`` at 256 px, evaluated by resizing to 256 and cropping 256."""

    default_size = 256
    default_crop_pct = 1.0


@REGISTRY.register("red")
class Reduced(Recipe):
    """Roth et al. (2020) ``red``: shorter side to ``size / crop_pct`` (256), ``RandomCrop(size)`` + flip."""

    def configure(self, flip: float = 0.5) -> None:
        if not 0.0 <= flip <= 1.0:
            raise ConfigError(f"flip is a probability, got {flip}")
        self.flip = float(flip)

    def arguments(self) -> dict[str, Any]:
        return {"flip": self.flip}

    def train_steps(self, size: int, mode: Mode, crop_pct: float | None) -> list[Any]:
        return [
            v2.Resize(eval_resize(size, crop_pct), interpolation=mode, antialias=True),
            v2.RandomCrop(size),
            v2.RandomHorizontalFlip(self.flip),
        ]


@REGISTRY.register("adv")
class Adversarial(_ResizedCropRecipe):
    """Roth et al. (2020) ``adv``: ``RandomResizedCrop``, ``RandomGrayscale(gray)``, ``ColorJitter(jitter,
    jitter, jitter, jitter)`` (brightness, contrast, saturation, hue), flip; in their order."""

    @extends(_ResizedCropRecipe.configure)
    def configure(self, gray: float = 0.2, jitter: float = 0.2, **inherited: Any) -> None:
        super().configure(**inherited)
        if not 0.0 <= gray <= 1.0:
            raise ConfigError(f"gray is a probability, got {gray}")
        if not 0.0 <= jitter <= 0.5:
            raise ConfigError(f"jitter must lie in [0, 0.5] (hue's range), got {jitter}")
        self.gray, self.jitter = float(gray), float(jitter)

    def arguments(self) -> dict[str, Any]:
        return {**super().arguments(), "gray": self.gray, "jitter": self.jitter}

    def train_steps(self, size: int, mode: Mode, crop_pct: float | None) -> list[Any]:
        crop, flip = self.crop_steps(size, mode)
        jitter = self.jitter
        return [crop, v2.RandomGrayscale(self.gray), v2.ColorJitter(jitter, jitter, jitter, jitter), flip]

    def crop_plan(self) -> CropPlan | None:
        return None


@REGISTRY.register("randaugment")
class RandAugment(_ResizedCropRecipe):
    """Berton et al. (2025): ``RandomResizedCrop`` + flip + ``RandAugment(num_ops, magnitude)`` (Cubuk et
    al. 2020: ``num_ops`` operations drawn per image, each at ``magnitude`` of 0 … ``num_magnitude_bins − 1``
    = 30)."""

    @extends(_ResizedCropRecipe.configure)
    def configure(self, num_ops: int = 3, magnitude: int = 9, **inherited: Any) -> None:
        super().configure(**inherited)
        if num_ops < 0 or not 0 <= magnitude < 31:
            raise ConfigError(f"num_ops must be ≥ 0 and magnitude in 0 … 30, got {num_ops} and {magnitude}")
        self.num_ops, self.magnitude = int(num_ops), int(magnitude)

    def arguments(self) -> dict[str, Any]:
        return {**super().arguments(), "num_ops": self.num_ops, "magnitude": self.magnitude}

    def train_steps(self, size: int, mode: Mode, crop_pct: float | None) -> list[Any]:
        # torchvision's own interpolation for its geometric operations (nearest), as the paper's code ran
        randaugment = v2.RandAugment(self.num_ops, self.magnitude)
        return [*self.crop_steps(size, mode), randaugment]

    def crop_plan(self) -> CropPlan | None:
        return None


@REGISTRY.register("test")
class NoAugmentation(Recipe):
    """No augmentation: training images go through the evaluation pipeline (resize + centre crop)."""

    def train_steps(self, size: int, mode: Mode, crop_pct: float | None) -> list[Any]:
        return self.eval_steps(size, mode, crop_pct)


@REGISTRY.register("glyph")
class Glyph(Recipe):
    """Small grayscale glyphs (``synthetic``, ``omniglot``): ``RandomAffine(degrees, translate, scale)``,
    bilinear; evaluation leaves them as they are. Inputs of another size are resized to ``size × size``."""

    family = "glyph"
    default_crop_pct = None

    def configure(
        self,
        degrees: float = 10.0,
        translate: tuple[float, float] = (0.1, 0.1),
        scale: tuple[float, float] = (0.9, 1.1),
    ) -> None:
        if degrees < 0:
            raise ConfigError(f"degrees must be ≥ 0, got {degrees}")
        if len(translate) != 2 or not all(0.0 <= t <= 1.0 for t in translate):
            raise ConfigError(f"translate must be two fractions in [0, 1] (x, y), got {list(translate)}")
        self.degrees = float(degrees)
        self.translate = (float(translate[0]), float(translate[1]))
        self.scale = _pair(scale, "scale", 1e-6)

    def arguments(self) -> dict[str, Any]:
        return {"degrees": self.degrees, "translate": list(self.translate), "scale": list(self.scale)}

    def train_steps(self, size: int, mode: Mode, crop_pct: float | None) -> list[Any]:
        return [
            v2.RandomAffine(
                degrees=self.degrees,
                translate=self.translate,
                scale=self.scale,
                interpolation=v2.InterpolationMode.BILINEAR,
            )
        ]

    def eval_steps(self, size: int, mode: Mode, crop_pct: float | None) -> list[Any]:
        return []


def build(name: str, /, **kwargs: Any) -> Recipe:
    """The recipe ``name`` with its hyperparameters (unknown names and keywords name the closest one)."""
    return REGISTRY.build(name, **kwargs)


def available() -> list[str]:
    """The recipe names."""
    return REGISTRY.available()


__all__ = [
    "DEFAULT_CROP_PCT",
    "DEFAULT_RATIO",
    "DEFAULT_SCALE",
    "INTERPOLATIONS",
    "PHOTO_EVAL_RATIO",
    "REGISTRY",
    "CropPlan",
    "Recipe",
    "available",
    "build",
    "eval_resize",
    "interpolation_mode",
]
