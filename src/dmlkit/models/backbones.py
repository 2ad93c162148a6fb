"""Backbones: networks mapping images ``B × C_in × H × W`` to features, a map ``B × C × h × w`` or tokens
``B × N × C``.

Names accepted by :func:`build` (all resolved by :data:`REGISTRY`, a :class:`BackboneRegistry`):

- built-in entries (``small_cnn``);
- ``<family>:<model>``, one entry per model *family* (a library of many models, whose names the library
  itself knows): ``timm:<model>``, any ``timm`` model, run through ``forward_features`` without its
  classifier; ``torchvision:<model>``, a ``torchvision.models`` classifier cut before its global pooling /
  classifier.

Nothing is ever downloaded: weights come only from a local file or an installed weight package
(``pretrained_weights``), loaded by :func:`dmlkit.models.weights.load_local_weights`, which maps key names
and reports what it did. Every backbone is a :class:`Backbone`: it exposes ``out_channels`` (``C``),
``tokens`` (its :class:`TokenLayout`), ``weights_report`` and :meth:`Backbone.blocks` (its stages, for
partial fine-tuning).
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dmlkit.errors import ConfigError, UnknownNameError, closest, unknown_name_message
from dmlkit.models import weights
from dmlkit.models.weights import (
    WeightsReport,
    load_local_weights,
    map_state_dict_by_position,
    read_state_dict,
)
from dmlkit.registry import Registry

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenLayout:
    """How a token backbone's ``B × N × C`` output is laid out: ``prefix`` leading tokens that are no image
    patches (class, distillation and register tokens), the first of which is the class token when
    ``class_token``. Feature-map backbones have the empty layout (no prefix, no class token)."""

    prefix: int = 0
    class_token: bool = False


@dataclass(frozen=True)
class Block:
    """One stage of a backbone, for partial fine-tuning: a name for messages and the qualified names (within
    the backbone) of its parameters."""

    name: str
    parameters: tuple[str, ...]


class Backbone(nn.Module):
    """What :class:`~dmlkit.models.EmbeddingModel` needs of a backbone besides ``forward``.

    ``out_channels``: ``C`` of the ``B × C × h × w`` map or ``B × N × C`` tokens it outputs; ``tokens``: the
    :class:`TokenLayout` of token outputs (pooling reads it); ``weights_report``: the :class:`WeightsReport`
    of the local weights loaded at build time (``None`` without).
    """

    out_channels: int
    tokens: TokenLayout = TokenLayout()
    weights_report: WeightsReport | None = None

    def blocks(self) -> list[Block]:
        """The backbone's stages in order, stem first; together they hold every parameter.

        By default the modules of :func:`sequential_blocks`; libraries that know their stages override it.
        """
        return sequential_blocks(self)


# ------------------------------------------------------------------------------------------------- blocks

_POOLING_LAYERS = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd)
_NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


def _block_name(names: Sequence[str]) -> str:
    """A short name for a group of parameters: the module holding them all, cut after its first index
    (``layer1``, ``blocks.3``, ``stages.0``), else the modules they belong to (``conv1+bn1``,
    ``cls_token+pos_embed+patch_embed``)."""
    paths = [name.split(".")[:-1] or [name] for name in names]  # a root parameter (cls_token) names itself
    common = paths[0]
    for path in paths[1:]:
        pairs = zip(common, path, strict=False)
        common = [a for a, _ in itertools.takewhile(lambda pair: pair[0] == pair[1], pairs)]
    owners: dict[str, None] = {}
    for path in [common] if common else paths:
        index = next((i for i, part in enumerate(path) if part.isdigit()), None)
        owners[".".join(path[: index + 1] if index is not None else path if common else path[:1])] = None
    return "+".join(owners)


def _merge_trailing_norms(blocks: list[Block], backbone: nn.Module) -> list[Block]:
    """Fold a last block of normalisation layers only (Swin's and ConvNeXt's final norm, DenseNet's
    ``norm5``) into the stage before it: a norm after the last stage is no stage of its own."""
    if len(blocks) < 2:
        return blocks
    owners = [name.rpartition(".")[0] for name in blocks[-1].parameters]
    if not all(owner and isinstance(backbone.get_submodule(owner), _NORM_LAYERS) for owner in owners):
        return blocks
    last, norm = blocks[-2], blocks[-1]
    return [*blocks[:-2], Block(f"{last.name}+{norm.name}", (*last.parameters, *norm.parameters))]


def sequential_blocks(module: nn.Module, prefix: str = "") -> list[Block]:
    """Stages of a network whose children run in order (``nn.Sequential``-like), stem first.

    A lone child holding every parameter (``SmallCNN.features``, torchvision's ``features``) is entered.
    Each child that is a container (a residual stage, an inverted-residual block) is a stage; consecutive
    plain layers (convolution, norm, activation: ResNet's stem, VGG's convolutions) form one stage, which a
    pooling layer ends; parameterless layers join the stage before them. A last stage of norms only is
    folded into the one before (:func:`_merge_trailing_norms`).
    """
    root = module
    while True:
        holders = [(name, child) for name, child in module.named_children() if _has_parameters(child)]
        own = next(module.parameters(recurse=False), None)
        if own is None and len(holders) == 1 and not _is_leaf(holders[0][1]):
            prefix, module = f"{prefix}{holders[0][0]}.", holders[0][1]
        else:
            break
    groups: list[list[tuple[str, nn.Module]]] = []
    run_open = False  # the last group is a run of plain layers that the next plain layer joins
    for name, child in module.named_children():
        if not _has_parameters(child):
            if groups:
                groups[-1].append((name, child))
            if isinstance(child, _POOLING_LAYERS):
                run_open = False
            continue
        if _is_leaf(child) and run_open:
            groups[-1].append((name, child))
        else:
            groups.append([(name, child)])
            run_open = _is_leaf(child)
    own_names = [f"{prefix}{n}" for n, _ in module.named_parameters(recurse=False)]
    blocks = []
    for i, group in enumerate(groups):
        names = [
            *(own_names if i == 0 else []),
            *(f"{prefix}{c}.{p}" for c, m in group for p, _ in m.named_parameters()),
        ]
        label = "+".join(f"{prefix}{c}" for c, m in group if _has_parameters(m))
        blocks.append(Block(label, tuple(names)))
    if not blocks and own_names:
        blocks = [Block(_block_name(own_names), tuple(own_names))]
    return _merge_trailing_norms(blocks, root)


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
    closest-name suggestion only); ``create(model, in_channels, image_size, classifier, **kwargs)`` makes
    the library's own model (random init; with its classifier when ``classifier``, so that weight files
    with a classifier map one to one); ``discarded(library_model)`` names the state-dict keys the backbone
    drops (the classifier); ``wrap(library_model, model, image_size)`` turns it into a :class:`Backbone`.
    """

    prefix: str
    exists: Callable[[str], bool]
    models: Callable[[], Collection[str]]
    create: Callable[..., nn.Module]
    wrap: Callable[[nn.Module, str, int | None], Backbone]
    discarded: Callable[[nn.Module], set[str]]

    def build(
        self,
        model: str,
        in_channels: int,
        pretrained_weights: str | Path | None,
        image_size: int | None,
        allow_partial_weights: bool = False,
        **kwargs: Any,
    ) -> Backbone:
        """Create ``model``, load local weights into it (with the library's own key names, so files saved
        from the library load as they are) and wrap it; the report is kept as ``weights_report``."""
        weighted = pretrained_weights is not None
        library_model = self.create(model, in_channels, image_size, classifier=weighted, **kwargs)
        report = None
        if weighted:
            report = load_local_weights(
                library_model,
                pretrained_weights,  # type: ignore[arg-type]
                allow_partial=allow_partial_weights,
                discard=self.discarded(library_model),
            )
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
    few-shot learning (Vinyals et al. 2016; Snell et al. 2017). Its blocks are the four conv blocks.
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
    """A ``timm`` model's ``forward_features``: a ``B × C × h × w`` map or ``B × N × C`` tokens.

    Channel-last maps (``output_fmt == "NHWC"``, e.g. Swin) are permuted to ``B × C × h × w`` (a view, no
    copy). Token sequences (ViT, DeiT, DINOv2, MLP-Mixer) are returned whole; their :class:`TokenLayout`
    comes from the model's ``num_prefix_tokens`` (class + register tokens) and ``cls_token``, so pooling
    can take the class token or pool the patch tokens only. Blocks come from timm's own coarse
    ``group_matcher`` (the stem, each stage or transformer block; a final norm joins the last one).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.out_channels = int(model.num_features)  # type: ignore[arg-type]
        self.tokens = TokenLayout(
            prefix=int(getattr(model, "num_prefix_tokens", 0) or 0),
            class_token=getattr(model, "cls_token", None) is not None,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features(x)  # type: ignore[operator]
        if features.dim() == 4:
            if str(getattr(self.model, "output_fmt", "NCHW")).endswith("NHWC"):
                features = features.permute(0, 3, 1, 2)
            return features
        if features.dim() == 3:
            return features
        raise ConfigError(f"timm backbone returned features of unsupported shape {tuple(features.shape)}")

    def blocks(self) -> list[Block]:
        """timm's coarse parameter groups (``timm.models.group_parameters``) in order, stem first."""
        from timm.models import group_parameters

        try:
            matcher = self.model.group_matcher(coarse=True)  # type: ignore[operator]
        except (AttributeError, NotImplementedError, TypeError):  # a model without one: its children
            return sequential_blocks(self.model, "model.")
        groups = group_parameters(self.model, matcher)
        blocks = [
            Block(_block_name(names), tuple(f"model.{n}" for n in names))  # names as timm's
            for _, names in sorted(groups.items())
            if names
        ]
        return _merge_trailing_norms(blocks, self)


_TORCHVISION_HEAD_NAMES = frozenset({"avgpool", "fc", "classifier", "head", "heads", "dropout", "flatten"})
#: Auxiliary classifiers (GoogLeNet, Inception v3): created, so official files map one to one, but skipped.
_TORCHVISION_AUX_NAMES = frozenset({"aux1", "aux2", "AuxLogits"})


def _torchvision_kept(model: nn.Module) -> list[str]:
    """The leading children of a torchvision classifier up to its global pooling or classifier, without
    the auxiliary classifiers."""
    kept = []
    for child_name, child in model.named_children():
        if child_name in _TORCHVISION_HEAD_NAMES or isinstance(
            child, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d
        ):
            break
        if child_name not in _TORCHVISION_AUX_NAMES:
            kept.append(child_name)
    return kept


class TorchvisionBackbone(Backbone):
    """The leading children of a ``torchvision`` classifier, up to its global pooling or classifier.

    Children keep their torchvision names, so state-dict keys equal the official checkpoints' (minus the
    classifier). Works for families whose ``forward`` runs those children in order (ResNet, ResNeXt,
    Wide-ResNet, RegNet, VGG, AlexNet, MobileNet v2/v3, EfficientNet, ConvNeXt, DenseNet, MNASNet, ShuffleNet,
    SqueezeNet, GoogLeNet and Inception v3 without their auxiliary classifiers); others are rejected at build
    time by a trial forward. GoogLeNet's and Inception's ``transform_input`` is never applied (see
    :func:`dmlkit.models.preprocessing.of_backbone`).
    """

    def __init__(self, model: nn.Module, name: str, probe_sizes: Sequence[int] = (64,)) -> None:
        super().__init__()
        self._names = _torchvision_kept(model)
        for child_name in self._names:
            self.add_module(child_name, getattr(model, child_name))
        first = _first_conv(self)
        in_channels = first.in_channels if first is not None else 3
        probe, error = None, None
        was_training = self.training
        self.eval()
        for size in probe_sizes:  # Inception needs at least 75 px: a larger probe when no size is given
            try:
                with torch.no_grad():
                    probe = self(torch.zeros(1, in_channels, size, size))
                break
            except Exception as exc:
                error = exc
        self.train(was_training)
        if probe is None:
            raise ConfigError(
                f"torchvision model '{name}' cannot be used as a feature extractor ({error}); "
                "try the timm version of the model"
            ) from error
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
                    child.kernel_size,  # type: ignore[arg-type]
                    child.stride,  # type: ignore[arg-type]
                    child.padding,  # type: ignore[arg-type]
                    child.dilation,  # type: ignore[arg-type]
                    1,
                    child.bias is not None,
                    child.padding_mode,
                )
                setattr(parent, child_name, replacement)
                return
    raise ConfigError("cannot change the input channels: the model has no Conv2d")


# ----------------------------------------------------------------------------------------------- families


def _keys_under(model: nn.Module, names: Collection[str]) -> set[str]:
    """State-dict keys of ``model`` inside the submodules ``names``."""
    prefixes = tuple(f"{name}." for name in names)
    return {key for key in model.state_dict() if prefixes and key.startswith(prefixes)}


def _timm_exists(model: str) -> bool:
    import timm

    return bool(timm.is_model(model))


def _timm_models() -> list[str]:
    import timm

    return list(timm.list_models())


def _timm_create(
    model_name: str, in_channels: int, image_size: int | None, classifier: bool = False, **kwargs: Any
) -> nn.Module:
    """``timm.create_model(model_name, pretrained=False, in_chans=in_channels, num_classes=0,
    global_pool="", img_size=image_size)``.

    ``classifier=True`` keeps the model's classifier (for loading a weights file that has one; the wrap
    removes it). ``img_size`` is passed to the architectures that take it (ViTs), ``global_pool=""`` to
    those that accept it (a distilled DeiT does not): neither changes what ``forward_features`` computes
    for the others.
    """
    import timm

    args: dict[str, Any] = {"pretrained": False, "in_chans": in_channels, **kwargs}
    if not classifier:
        args.setdefault("num_classes", 0)
    optional: dict[str, Any] = {"global_pool": ""} if "global_pool" not in kwargs else {}
    if image_size is not None and "img_size" not in kwargs:
        optional["img_size"] = image_size
    attempts = [optional, {k: v for k, v in optional.items() if k != "img_size"}]
    attempts += [{k: v for k, v in optional.items() if k != "global_pool"}, {}]
    error: Exception | None = None
    for extra in dict.fromkeys(tuple(a.items()) for a in attempts):
        try:
            return timm.create_model(model_name, **args, **dict(extra))
        except (TypeError, AssertionError) as exc:  # an architecture without img_size / this global_pool
            error = exc
    raise ConfigError(f"cannot build timm model '{model_name}' with {kwargs}: {error}") from error


def _timm_discarded(model: nn.Module) -> set[str]:
    """State-dict keys of the timm model's classifier (``get_classifier()``; two for distilled DeiTs)."""
    try:
        heads = model.get_classifier()  # type: ignore[operator]
    except (AttributeError, NotImplementedError):
        return set()
    heads = tuple(heads) if isinstance(heads, tuple | list) else (heads,)
    wanted = {id(head) for head in heads}
    names = [name for name, module in model.named_modules() if name and id(module) in wanted]
    return _keys_under(model, names)


def _timm_wrap(model: nn.Module, _name: str, _image_size: int | None) -> Backbone:
    """Drop the classifier a weights file was loaded with, then wrap."""
    if _timm_discarded(model):
        try:
            model.reset_classifier(0, "")  # type: ignore[operator]
        except TypeError:  # a reset_classifier without global_pool
            model.reset_classifier(0)  # type: ignore[operator]
    return TimmBackbone(model)


def _torchvision_exists(model: str) -> bool:
    return model in _torchvision_models()


def _torchvision_models() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models())


#: Constructor defaults dmlkit sets: ``init_weights=True`` is what torchvision uses when it is not given,
#: said explicitly to silence its FutureWarning.
_TORCHVISION_DEFAULTS: dict[str, dict[str, Any]] = {
    "googlenet": {"init_weights": True},
    "inception_v3": {"init_weights": True},
}


def _torchvision_create(
    model_name: str, in_channels: int, image_size: int | None, classifier: bool = False, **kwargs: Any
) -> nn.Module:
    """``torchvision.models.get_model(model_name, weights=None, **kwargs)``, the whole classifier (so local
    weights load with the official key names); ``in_channels != 3`` replaces the first convolution."""
    import torchvision

    args = {**_TORCHVISION_DEFAULTS.get(model_name, {}), **kwargs}
    try:
        model = torchvision.models.get_model(model_name, weights=None, **args)
    except TypeError as exc:
        raise ConfigError(f"cannot build torchvision model '{model_name}' with {kwargs}: {exc}") from exc
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


def _torchvision_discarded(model: nn.Module) -> set[str]:
    kept = set(_torchvision_kept(model))
    return _keys_under(model, [name for name, _ in model.named_children() if name not in kept])


def _torchvision_wrap(model: nn.Module, model_name: str, image_size: int | None) -> Backbone:
    """The classifier cut before its pooling; ``image_size`` (at least 32) sizes the trial forward (64,
    then 224, without one)."""
    sizes = (max(image_size, 32),) if image_size else (64, 224)
    return TorchvisionBackbone(model, model_name, probe_sizes=sizes)


REGISTRY.register_family(
    BackboneFamily("timm", _timm_exists, _timm_models, _timm_create, _timm_wrap, _timm_discarded)
)
REGISTRY.register_family(
    BackboneFamily(
        "torchvision",
        _torchvision_exists,
        _torchvision_models,
        _torchvision_create,
        _torchvision_wrap,
        _torchvision_discarded,
    )
)


# ----------------------------------------------------------------------------------------------- factory


def build(
    name: str,
    /,
    in_channels: int = 3,
    pretrained_weights: str | Path | None = None,
    image_size: int | None = None,
    allow_partial_weights: bool = False,
    **kwargs: Any,
) -> Backbone:
    """Build backbone ``name`` (see the module docstring) and optionally load local weights into it.

    ``pretrained_weights``: a file or a ``package:`` shortcut (:mod:`dmlkit.models.weights`), which must fit
    ``name``; a partial load is refused unless ``allow_partial_weights``. ``image_size`` is passed to timm
    models that take ``img_size`` (ViTs) and sizes the trial forward of torchvision models; built-ins ignore
    it. The :class:`WeightsReport` is kept as ``backbone.weights_report``. Unknown names and keywords raise
    ``UnknownNameError`` naming the closest.
    """
    weights.check_fits(pretrained_weights, name)
    factory = REGISTRY.get(name)
    if REGISTRY.family_of(name) is not None:  # a family loads the weights into the library's own model
        return factory(
            in_channels=in_channels,
            pretrained_weights=pretrained_weights,
            image_size=image_size,
            allow_partial_weights=allow_partial_weights,
            **kwargs,
        )
    REGISTRY.check_kwargs(name, kwargs)
    backbone = factory(in_channels=in_channels, **kwargs)
    if pretrained_weights is not None:
        backbone.weights_report = load_local_weights(
            backbone, pretrained_weights, allow_partial=allow_partial_weights
        )
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
    "Block",
    "SmallCNN",
    "TimmBackbone",
    "TokenLayout",
    "TorchvisionBackbone",
    "WeightsReport",
    "available",
    "build",
    "exists",
    "load_local_weights",
    "map_state_dict_by_position",
    "read_state_dict",
    "sequential_blocks",
]
