"""Backbones: networks mapping images ``B × C_in × H × W`` to feature maps ``B × C × h × w``.

Names accepted by :func:`build` (all resolved by :data:`REGISTRY`, a :class:`BackboneRegistry`):

- built-in entries (``small_cnn``);
- ``<family>:<model>``, one entry per model *family* (a library of many models, whose names the library
  itself knows): ``timm:<model>``, any ``timm`` model, created with ``pretrained=False, num_classes=0,
  global_pool=""``; ``torchvision:<model>``, a ``torchvision.models`` classifier cut before its global
  pooling / classifier.

Nothing is ever downloaded: weights come only from a local file (``pretrained_weights``), loaded by
:func:`load_local_weights`, which reports missing, unexpected and shape-mismatched keys.
Every backbone is a :class:`Backbone`: it exposes ``out_channels`` (``C`` of its feature map) and
``weights_report``.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dmlkit.errors import ConfigError, DataError, UnknownNameError, closest, unknown_name_message
from dmlkit.registry import Registry
from dmlkit.train.checkpoint import load_weights_only

logger = logging.getLogger(__name__)


class Backbone(nn.Module):
    """What :class:`~dmlkit.models.EmbeddingModel` needs of a backbone besides ``forward``.

    ``out_channels``: ``C`` of the ``B × C × h × w`` feature map; ``weights_report``: the
    :class:`WeightsReport` of the local weights loaded at build time (``None`` without).
    """

    out_channels: int
    weights_report: WeightsReport | None = None


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


# ----------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class BackboneFamily:
    """Models of one library, named ``<prefix>:<model>`` (the library knows the model names).

    ``exists(model)`` says whether the library has ``model``; ``models()`` lists its models (for the
    closest-name suggestion only); ``create(model, in_channels, image_size, **kwargs)`` makes the library's
    own model (random init); ``wrap(library_model, model, image_size)`` turns it into a :class:`Backbone`.
    """

    prefix: str
    exists: Callable[[str], bool]
    models: Callable[[], Collection[str]]
    create: Callable[..., nn.Module]
    wrap: Callable[[nn.Module, str, int | None], Backbone]

    def build(
        self,
        model: str,
        in_channels: int,
        pretrained_weights: str | Path | None,
        image_size: int | None,
        **kwargs: Any,
    ) -> Backbone:
        """Create ``model``, load local weights into it (with the library's own key names, so files saved
        from the library load as they are) and wrap it; the report is kept as ``weights_report``."""
        library_model = self.create(model, in_channels, image_size, **kwargs)
        report = _weights(library_model, pretrained_weights)
        backbone = self.wrap(library_model, model, image_size)
        backbone.weights_report = report
        return backbone

    def check(self, model: str) -> None:
        """Raise ``UnknownNameError`` with the library's closest model name if ``model`` does not exist."""
        if not self.exists(model):
            # the libraries list hundreds of models: suggest the closest instead of listing them all
            valid = self.models()
            suggestion = closest(model, valid)
            hint = f"; did you mean '{self.prefix}:{suggestion}'?" if suggestion else ""
            raise UnknownNameError(
                f"unknown {self.prefix} model '{model}'{hint} ({self.prefix} lists {len(valid)} models)"
            )


class BackboneRegistry(Registry[Backbone]):
    """The backbone registry: built-in entries by name plus :class:`BackboneFamily` entries by prefix.

    ``"timm:resnet18"`` is parsed into the family ``timm`` and the model ``resnet18``; the family checks
    the model (suggesting the closest on a typo) and builds it. A name whose prefix is no family is looked
    up among the built-ins like any other name. :meth:`available` lists the built-ins and the families as
    ``"<prefix>:<model>"``.
    """

    def __init__(self) -> None:
        super().__init__("backbone")
        self._families: dict[str, BackboneFamily] = {}

    def register_family(self, family: BackboneFamily) -> BackboneFamily:
        """Add ``family``: names ``"<family.prefix>:<model>"`` resolve to it."""
        if family.prefix in self._families:
            raise ValueError(f"backbone family '{family.prefix}' is registered twice")
        self._families[family.prefix] = family
        return family

    def family_of(self, name: str) -> tuple[BackboneFamily, str] | None:
        """``(family, model)`` if ``name`` is ``"<prefix>:<model>"`` of a registered family, else ``None``."""
        prefix, colon, model = name.partition(":")
        family = self._families.get(prefix) if colon else None
        return None if family is None else (family, model)

    def available(self) -> list[str]:
        """Built-in names, then ``"<prefix>:<model>"`` for every family."""
        return [*super().available(), *(f"{prefix}:<model>" for prefix in sorted(self._families))]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        parsed = self.family_of(name)
        return super().__contains__(name) if parsed is None else parsed[0].exists(parsed[1])

    def get(self, name: str) -> Callable[..., Backbone]:
        """The factory of ``name``: a built-in's class, or its family's ``build`` bound to the model.

        Unknown names raise ``UnknownNameError`` with the closest valid name (of the family for
        ``"<prefix>:<model>"``).
        """
        parsed = self.family_of(name)
        if parsed is not None:
            family, model = parsed
            family.check(model)
            return functools.partial(family.build, model)
        if not super().__contains__(name):
            raise UnknownNameError(unknown_name_message(self.kind, name, self.available()))
        return super().get(name)


REGISTRY = BackboneRegistry()


# ----------------------------------------------------------------------------------------------- built in


@REGISTRY.register("small_cnn")
class SmallCNN(Backbone):
    """Four conv(3×3)-BN-ReLU blocks with 2×2 max-pooling after all but the last one.

    Widths default to 32-64-128-128, so a 32×32 input gives a ``128 × 4 × 4`` feature map. Meant for small
    grayscale images (``synthetic``, ``omniglot``) and fast CPU runs, in the spirit of the 4-block ConvNets of
    few-shot learning (Vinyals et al. 2016; Snell et al. 2017).
    """

    def __init__(self, in_channels: int = 3, widths: Sequence[int] = (32, 64, 128, 128)) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if not widths or any(w <= 0 for w in widths):
            raise ConfigError(f"small_cnn widths must be positive integers, got {widths}")
        layers: list[nn.Module] = []
        previous = in_channels
        for i, width in enumerate(widths):
            layers.append(_conv_bn_relu(previous, width))
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            previous = width
        self.features = nn.Sequential(*layers)
        self.out_channels = previous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class TimmBackbone(Backbone):
    """A ``timm`` model's ``forward_features``, always returned as ``B × C × h × w``.

    Channel-last maps (``output_fmt == "NHWC"``, e.g. Swin) are permuted; token sequences (ViT-like
    ``B × N × C``) lose their prefix (class / register) tokens and are reshaped to the patch grid, so every
    pooling works on every backbone.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.out_channels = int(model.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features(x)
        if features.dim() == 4:
            if str(getattr(self.model, "output_fmt", "NCHW")).endswith("NHWC"):
                features = features.permute(0, 3, 1, 2)
            return features
        if features.dim() == 3:
            tokens = features[:, int(getattr(self.model, "num_prefix_tokens", 0)) :]
            n = tokens.shape[1]
            patch = getattr(getattr(self.model, "patch_embed", None), "patch_size", None)
            if patch is not None and (x.shape[2] // patch[0]) * (x.shape[3] // patch[1]) == n:
                h, w = x.shape[2] // patch[0], x.shape[3] // patch[1]
            elif math.isqrt(n) ** 2 == n:
                h = w = math.isqrt(n)
            else:
                raise ConfigError(f"cannot arrange {n} tokens of the timm backbone into a grid")
            return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)
        raise ConfigError(f"timm backbone returned features of unsupported shape {tuple(features.shape)}")


_TORCHVISION_HEAD_NAMES = frozenset({"avgpool", "fc", "classifier", "head", "heads", "dropout", "flatten"})


class TorchvisionBackbone(Backbone):
    """The leading children of a ``torchvision`` classifier, up to its global pooling or classifier.

    Children keep their torchvision names, so state-dict keys equal the official checkpoints' (minus the
    classifier). Works for families whose ``forward`` runs those children in order (ResNet, ResNeXt,
    Wide-ResNet, RegNet, VGG, AlexNet, MobileNet v2/v3, EfficientNet, ConvNeXt, DenseNet, MNASNet, ShuffleNet,
    SqueezeNet); others are rejected at build time by a trial forward.
    """

    def __init__(self, model: nn.Module, name: str, probe_size: int = 64) -> None:
        super().__init__()
        self._names: list[str] = []
        for child_name, child in model.named_children():
            if child_name in _TORCHVISION_HEAD_NAMES or isinstance(
                child, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d
            ):
                break
            self.add_module(child_name, child)
            self._names.append(child_name)
        first = _first_conv(self)
        in_channels = first.in_channels if first is not None else 3
        try:
            with torch.no_grad():
                was_training = self.training
                self.eval()
                probe = self(torch.zeros(1, in_channels, probe_size, probe_size))
                self.train(was_training)
        except Exception as exc:
            raise ConfigError(
                f"torchvision model '{name}' cannot be used as a feature extractor ({exc}); "
                "try the timm version of the model"
            ) from exc
        if probe.dim() != 4:
            raise ConfigError(
                f"torchvision model '{name}' does not give a B×C×H×W feature map "
                f"(got shape {tuple(probe.shape)}); try the timm version of the model"
            )
        self.out_channels = int(probe.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for child_name in self._names:
            x = getattr(self, child_name)(x)
        return x


def _first_conv(module: nn.Module) -> nn.Conv2d | None:
    return next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Swap the first ``Conv2d`` for one taking ``in_channels`` inputs (same everything else)."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels == in_channels:
                    return
                if child.groups != 1:
                    raise ConfigError("cannot change the input channels of a grouped first convolution")
                replacement = nn.Conv2d(
                    in_channels,
                    child.out_channels,
                    child.kernel_size,
                    child.stride,
                    child.padding,
                    child.dilation,
                    1,
                    child.bias is not None,
                    child.padding_mode,
                )
                setattr(parent, child_name, replacement)
                return
    raise ConfigError("cannot change the input channels: the model has no Conv2d")


# ----------------------------------------------------------------------------------------- local weights


@dataclass
class WeightsReport:
    """What :func:`load_local_weights` did with each tensor of a weights file."""

    path: str
    prefix: str = ""
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when every model tensor was loaded and every file tensor used."""
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        def head(keys: list[str]) -> str:
            shown = ", ".join(keys[:5])
            return f"{shown}, ... ({len(keys)} in all)" if len(keys) > 5 else shown

        lines = [f"weights '{self.path}': loaded {len(self.loaded)} tensors"]
        if self.prefix:
            lines.append(f"  stripped key prefix '{self.prefix}'")
        for label, keys in (
            ("adapted to the input channels", self.adapted),
            ("missing (left as initialised)", self.missing),
            ("unexpected (ignored)", self.unexpected),
            ("shape mismatch (ignored)", self.mismatched),
        ):
            if keys:
                lines.append(f"  {label}: {head(keys)}")
        return "\n".join(lines)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local ``.pt/.pth/.bin/.ckpt`` (``torch.load``, weights only) or ``.safetensors`` file.

    Checkpoint wrappers (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped. Raises ``DataError``
    on one line naming the file when it is missing, unreadable, holds Python objects other than tensors
    (never executed: :func:`dmlkit.train.checkpoint.load_weights_only`) or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pretrained weights file not found: '{path}'")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors' own error types, and OSError
            message = " ".join(str(exc).split())
            raise DataError(f"cannot read pretrained weights '{path}': {message}") from exc
    else:
        obj = load_weights_only(path, "pretrained weights")
    for _ in range(3):  # checkpoint wrappers nest at most a couple of levels
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in ("state_dict", "model", "module", "backbone") if k in obj), None)
            if inner is None:
                break
            obj = inner
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    tensors = (
        {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, Mapping) else {}
    )
    if not tensors:
        raise DataError(f"pretrained weights '{path}' hold no state dict (found {type(obj).__name__})")
    return tensors


def _best_prefix(source: Sequence[str], target: set[str]) -> str:
    """The key prefix whose removal makes most ``source`` keys valid ``target`` keys (e.g. ``module.``)."""
    candidates = {""}
    for key in source:
        parts = key.split(".")
        for depth in range(1, min(3, len(parts))):
            candidates.add(".".join(parts[:depth]) + ".")

    def hits(prefix: str) -> int:
        return sum(1 for k in source if k.startswith(prefix) and k[len(prefix) :] in target)

    return max(sorted(candidates), key=lambda p: (hits(p), -len(p)))


def _is_counter(key: str, value: torch.Tensor) -> bool:
    # BatchNorm's num_batches_tracked: an integer scalar, whatever a re-export renamed it to
    return key.endswith("num_batches_tracked") or (value.dim() == 0 and not value.is_floating_point())


def map_state_dict_by_position(
    state_dict: Mapping[str, torch.Tensor], module: nn.Module, path: str = "<state dict>"
) -> dict[str, torch.Tensor]:
    """Rename an ordered state dict onto ``module``'s keys by position, 1:1.

    For weight packages whose key names differ from the model's but whose tensors come in the same order
    with the same shapes (e.g. a re-exported timm model). BatchNorm ``num_batches_tracked`` counters
    (integer scalars) are ignored on both sides. Raises ``DataError`` naming the first position where
    counts or shapes disagree.
    """
    source = [(k, v) for k, v in state_dict.items() if not _is_counter(k, v)]
    target = [(k, v) for k, v in module.state_dict().items() if not _is_counter(k, v)]
    if len(source) != len(target):
        raise DataError(
            f"'{path}' has {len(source)} tensors but the model has {len(target)}: cannot map by position"
        )
    renamed: dict[str, torch.Tensor] = {}
    for i, ((src_key, src), (dst_key, dst)) in enumerate(zip(source, target, strict=True)):
        if src.shape != dst.shape:
            raise DataError(
                f"'{path}': tensor #{i} '{src_key}' {tuple(src.shape)} does not fit model tensor "
                f"'{dst_key}' {tuple(dst.shape)}"
            )
        renamed[dst_key] = src
    return renamed


def load_local_weights(module: nn.Module, path: str | Path, *, by_position: bool = False) -> WeightsReport:
    """Load a local weights file into ``module`` as far as keys and shapes match, and report the rest.

    A common key prefix (``module.``, ``backbone.``, ...) is stripped automatically. A first-conv weight
    that differs only in its input channels is adapted with ``timm.models.adapt_input_conv`` (summed to
    one channel, or tiled and rescaled). ``by_position=True`` maps keys with
    :func:`map_state_dict_by_position` instead of by name. Raises ``DataError`` naming the file when it
    cannot be read or no tensor matches.
    """
    path = Path(path)
    source = read_state_dict(path)
    target = module.state_dict()
    report = WeightsReport(path=str(path))
    if by_position:
        source = map_state_dict_by_position(source, module, str(path))
    prefix = _best_prefix(list(source), set(target))
    report.prefix = prefix
    to_load: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        name = key[len(prefix) :] if key.startswith(prefix) else key
        if name not in target:
            report.unexpected.append(key)
            continue
        expected = target[name]
        if value.shape != expected.shape:
            if (
                value.dim() == 4
                and value.shape[0] == expected.shape[0]
                and value.shape[2:] == expected.shape[2:]
                and value.shape[1] != expected.shape[1]
            ):
                from timm.models import adapt_input_conv

                try:
                    value = adapt_input_conv(int(expected.shape[1]), value.float()).to(expected.dtype)
                    report.adapted.append(name)
                except (ValueError, NotImplementedError, RuntimeError):
                    report.mismatched.append(f"{name} {tuple(value.shape)}→{tuple(expected.shape)}")
                    continue
            else:
                report.mismatched.append(f"{name} {tuple(value.shape)}→{tuple(expected.shape)}")
                continue
        to_load[name] = value
    if all(_is_counter(k, v) for k, v in to_load.items()):
        raise DataError(
            f"no tensor of pretrained weights '{path}' matches the model "
            f"(file keys like {list(source)[:3]}, model keys like {list(target)[:3]})"
        )
    module.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    report.missing = [k for k in target if k not in to_load and not k.endswith("num_batches_tracked")]
    if report.complete:
        logger.info("%s", report)
    else:
        logger.warning("%s", report)
    return report


# ----------------------------------------------------------------------------------------------- families


def _weights(module: nn.Module, path: str | Path | None) -> WeightsReport | None:
    return None if path is None else load_local_weights(module, path)


def _timm_exists(model: str) -> bool:
    import timm

    return bool(timm.is_model(model))


def _timm_models() -> list[str]:
    import timm

    return list(timm.list_models())


def _timm_create(model_name: str, in_channels: int, image_size: int | None, **kwargs: Any) -> nn.Module:
    """``timm.create_model(model_name, pretrained=False, num_classes=0, global_pool="", in_chans=...)``.

    ``image_size`` is passed as ``img_size`` to the architectures that take it (ViTs).
    """
    import timm

    args = {"pretrained": False, "num_classes": 0, "global_pool": "", "in_chans": in_channels, **kwargs}
    try:
        if image_size is not None and "img_size" not in args:
            try:
                model = timm.create_model(model_name, img_size=image_size, **args)
            except TypeError:  # the architecture has no img_size (CNNs take any size)
                model = timm.create_model(model_name, **args)
        else:
            model = timm.create_model(model_name, **args)
    except TypeError as exc:
        raise ConfigError(f"cannot build timm model '{model_name}' with {kwargs}: {exc}") from exc
    return model


def _torchvision_exists(model: str) -> bool:
    return model in _torchvision_models()


def _torchvision_models() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models())


def _torchvision_create(
    model_name: str, in_channels: int, image_size: int | None, **kwargs: Any
) -> nn.Module:
    """``torchvision.models.get_model(model_name, weights=None, **kwargs)``, the whole classifier (so local
    weights load with the official key names); ``in_channels != 3`` replaces the first convolution."""
    import torchvision

    try:
        model = torchvision.models.get_model(model_name, weights=None, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"cannot build torchvision model '{model_name}' with {kwargs}: {exc}") from exc
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


def _torchvision_wrap(model: nn.Module, model_name: str, image_size: int | None) -> Backbone:
    """The classifier cut before its pooling; ``image_size`` (at least 32, default 64) sizes the probe."""
    return TorchvisionBackbone(model, model_name, probe_size=max(image_size or 64, 32))


REGISTRY.register_family(
    BackboneFamily(
        "timm", _timm_exists, _timm_models, _timm_create, lambda model, _name, _size: TimmBackbone(model)
    )
)
REGISTRY.register_family(
    BackboneFamily(
        "torchvision", _torchvision_exists, _torchvision_models, _torchvision_create, _torchvision_wrap
    )
)


# ----------------------------------------------------------------------------------------------- factory


def build(
    name: str,
    /,
    in_channels: int = 3,
    pretrained_weights: str | Path | None = None,
    image_size: int | None = None,
    **kwargs: Any,
) -> Backbone:
    """Build backbone ``name`` (see the module docstring) and optionally load local weights into it.

    ``image_size`` is passed to timm models that take ``img_size`` (ViTs) and sizes the trial forward of
    torchvision models; built-ins ignore it. The :class:`WeightsReport` of loaded weights is kept as
    ``backbone.weights_report``. Unknown names and keywords raise ``UnknownNameError`` naming the closest.
    """
    factory = REGISTRY.get(name)
    if REGISTRY.family_of(name) is not None:  # a family loads the weights into the library's own model
        return factory(
            in_channels=in_channels, pretrained_weights=pretrained_weights, image_size=image_size, **kwargs
        )
    REGISTRY.check_kwargs(name, kwargs)
    backbone = factory(in_channels=in_channels, **kwargs)
    backbone.weights_report = _weights(backbone, pretrained_weights)
    return backbone


def available() -> list[str]:
    """Built-in backbone names plus the ``timm:<model>`` and ``torchvision:<model>`` patterns."""
    return REGISTRY.available()


def exists(name: str) -> bool:
    """Whether :func:`build` knows ``name`` (a built-in, an existing timm or torchvision model)."""
    return name in REGISTRY


__all__ = [
    "REGISTRY",
    "Backbone",
    "BackboneFamily",
    "BackboneRegistry",
    "SmallCNN",
    "TimmBackbone",
    "TorchvisionBackbone",
    "WeightsReport",
    "available",
    "build",
    "exists",
    "load_local_weights",
    "map_state_dict_by_position",
    "read_state_dict",
]
