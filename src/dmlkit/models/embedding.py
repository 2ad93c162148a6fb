"""The embedding model: backbone → global pooling → head → optional L2 normalisation; partial fine-tuning."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dmlkit.errors import ConfigError
from dmlkit.models import weights
from dmlkit.models.backbones import Backbone, Block, WeightsReport
from dmlkit.models.backbones import build as build_backbone
from dmlkit.models.heads import Head, for_embedding_size
from dmlkit.models.heads import check as check_head
from dmlkit.models.pooling import Pooling
from dmlkit.models.pooling import build as build_pooling

PlainValue = str | int | float | bool | None


def _plain(key: str, value: Any) -> Any:
    """``value`` as YAML/JSON-friendly data (tuples become lists); anything else is a ``ConfigError``."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):
        return [_plain(key, v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(f"{key}.{k}", v) for k, v in value.items()}
    raise ConfigError(
        f"model option '{key}' must be a str/int/float/bool/None (or a list or mapping of them) so "
        f"checkpoints can rebuild the model, got {type(value).__name__}"
    )


class EmbeddingModel(nn.Module):
    """``e = normalize(head(pool(backbone(x))))``.

    ``backbone`` is a :class:`~dmlkit.models.backbones.Backbone` (``out_channels``, ``tokens``,
    ``weights_report``, ``blocks()``), ``pool`` a :class:`~dmlkit.models.pooling.Pooling`, ``head`` a
    :class:`~dmlkit.models.heads.Head` (``out_features``).

    ``config`` holds the :func:`build_model` keyword arguments that rebuild the architecture
    (``build_model(**model.config)``), as plain data so it can be stored in checkpoints; the weights file
    used at construction is not part of it (the checkpoint's state dict replaces it) and is kept in
    ``pretrained_weights`` instead.
    """

    def __init__(
        self,
        backbone: Backbone,
        pool: Pooling,
        head: Head,
        normalize: bool = True,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.pool = pool
        self.head = head
        self.normalize = normalize
        self.config: dict[str, Any] = dict(config or {})
        self.pretrained_weights: str | None = None
        self.weights_report: WeightsReport | None = backbone.weights_report
        self.trainable_blocks: int | None = None
        self._batchnorm_frozen = False
        # backbone modules of frozen blocks: kept in eval mode by train() (see set_trainable_blocks)
        self._frozen_modules: list[nn.Module] = []
        self.feature_dim = int(pool.out_features(int(backbone.out_channels)))
        self.embedding_size = int(head.out_features)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features ``B × feature_dim`` (before head and normalisation)."""
        return self.pool(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embeddings = self.head(self.features(x))
        return F.normalize(embeddings, dim=1) if self.normalize else embeddings

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The backbone's parameters (frozen ones included: callers filter on ``requires_grad``)."""
        return list(self.backbone.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        """The parameters after the backbone: the pooling's (GeM's ``p``) and the head's (``--head-lr``)."""
        return [*self.pool.parameters(), *self.head.parameters()]

    def train(self, mode: bool = True) -> EmbeddingModel:
        """Like ``nn.Module.train``, but BatchNorm layers stay frozen after :func:`freeze_batchnorm` and the
        frozen blocks of :func:`set_trainable_blocks` stay in eval mode."""
        super().train(mode)
        if mode:
            if self._batchnorm_frozen:
                freeze_batchnorm(self)
            for module in self._frozen_modules:
                module.eval()
        return self


def freeze_batchnorm(model: nn.Module) -> int:
    """Put every BatchNorm layer in eval mode (running statistics fixed) and stop its affine gradients.

    Returns the number of layers frozen. ``nn.Module.train()`` switches BatchNorm back to training mode,
    so call this again after every ``model.train()`` — except on an :class:`EmbeddingModel`, whose ``train``
    re-applies it once it has been frozen. Freezing BN is the usual choice for small batches of
    class-balanced samples when fine-tuning pretrained backbones (e.g. Musgrave et al., "A Metric Learning
    Reality Check", ECCV 2020).
    """
    count = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
            for parameter in module.parameters(recurse=False):
                parameter.requires_grad_(False)
            count += 1
    if isinstance(model, EmbeddingModel):
        model._batchnorm_frozen = True
    return count


def _fully_frozen(backbone: nn.Module, frozen: set[str]) -> list[nn.Module]:
    """The outermost backbone modules all of whose parameters are in ``frozen`` (the backbone itself when
    every parameter is)."""
    found: list[str] = []
    modules: list[nn.Module] = []
    for name, module in backbone.named_modules():
        if any(name == f or name.startswith(f"{f}.") or not f for f in found):
            continue
        names = [f"{name}.{p}" if name else p for p, _ in module.named_parameters()]
        if names and all(n in frozen for n in names):
            found.append(name)
            modules.append(module)
    return modules


def _batchnorm_parameters(module: nn.Module) -> set[str]:
    return {
        f"{name}.{p}" if name else p
        for name, m in module.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for p, _ in m.named_parameters(recurse=False)
    }


def set_trainable_blocks(model: EmbeddingModel, count: int | None) -> list[Block]:
    """Train only the last ``count`` blocks of the backbone (``None``: every block; ``0``: none).

    The blocks are :meth:`Backbone.blocks` (stem first). Parameters of the other blocks stop their
    gradients, and the backbone modules made only of them run in eval mode (BatchNorm statistics and
    dropout fixed), so a frozen stage computes exactly what it did; :meth:`EmbeddingModel.train` keeps them
    so. Pooling and head always train. BatchNorm frozen by :func:`freeze_batchnorm` stays frozen. Calling
    it again re-decides every backbone parameter (e.g. to unfreeze after a warm-up). Returns the frozen
    blocks; ``count`` outside ``0..len(blocks)`` raises ``ConfigError`` naming the blocks.
    """
    blocks = model.backbone.blocks()
    if count is not None and not 0 <= count <= len(blocks):
        names = ", ".join(block.name for block in blocks)
        raise ConfigError(
            f"trainable_blocks={count}, but the backbone {model.config.get('backbone', '')} has "
            f"{len(blocks)} blocks: {names}"
        )
    frozen_blocks = [] if count is None else blocks[: len(blocks) - count]
    frozen = {name for block in frozen_blocks for name in block.parameters}
    keep_frozen = _batchnorm_parameters(model.backbone) if model._batchnorm_frozen else set()
    for name, parameter in model.backbone.named_parameters():
        parameter.requires_grad_(name not in frozen and name not in keep_frozen)
    model._frozen_modules = _fully_frozen(model.backbone, frozen)
    model.trainable_blocks = count
    model.train(model.training)
    return frozen_blocks


def build_model(
    backbone: str = "small_cnn",
    embedding_size: int | None = 64,
    pooling: str = "avg",
    normalize: bool = True,
    pretrained_weights: str | None = None,
    in_channels: int = 3,
    image_size: int | None = None,
    *,
    head: str = "linear",
    head_args: dict[str, Any] | None = None,
    allow_partial_weights: bool = False,
    trainable_blocks: int | None = None,
    **backbone_kwargs: Any,
) -> EmbeddingModel:
    """Build an :class:`EmbeddingModel`.

    ``backbone``: ``small_cnn``, ``timm:<model>`` or ``torchvision:<model>`` (see
    :mod:`dmlkit.models.backbones`); ``embedding_size``: output size of the head (``0``/``None``: no head,
    the pooled features are the embedding); ``pooling``: a name of :data:`dmlkit.models.pooling.REGISTRY`
    (``avg``, ``max``, ``gem``, ``cls``, ``cls+avg``); ``head``/``head_args``: a name of
    :data:`dmlkit.models.heads.REGISTRY` (``linear``, ``mlp``, ``none``) and its options; ``normalize``:
    L2-normalise the output; ``pretrained_weights``: a local state-dict file or a ``package:`` shortcut
    loaded into the backbone (never downloaded; a partial load is refused unless
    ``allow_partial_weights``); ``trainable_blocks``: train only the last K blocks of the backbone
    (:func:`set_trainable_blocks`); ``backbone_kwargs``: passed to the backbone constructor (e.g. ``widths``
    of ``small_cnn``, ``drop_path_rate`` of a timm model).

    ``model.config`` records the architecture (not the weights file, ``allow_partial_weights`` or
    ``trainable_blocks``, which do not change it).
    """
    if in_channels <= 0:
        raise ConfigError(f"in_channels must be positive, got {in_channels}")
    check_head(head, embedding_size, head_args)
    config = {
        "backbone": backbone,
        "embedding_size": embedding_size,
        "pooling": pooling,
        "head": head,
        "head_args": dict(head_args or {}),
        "normalize": normalize,
        "pretrained_weights": None,
        "in_channels": in_channels,
        "image_size": image_size,
    }
    config.update(backbone_kwargs)
    config = {key: _plain(key, value) for key, value in config.items()}
    weights.check_fits(pretrained_weights, backbone)
    net = build_backbone(
        backbone,
        in_channels=in_channels,
        pretrained_weights=pretrained_weights,
        image_size=image_size,
        allow_partial_weights=allow_partial_weights,
        **backbone_kwargs,
    )
    pool = build_pooling(pooling, tokens=net.tokens)
    features = pool.out_features(int(net.out_channels))
    net_head = for_embedding_size(features, embedding_size, head, head_args)
    model = EmbeddingModel(net, pool, net_head, normalize=normalize, config=config)
    if pretrained_weights is not None:
        file, _ = weights.resolve(pretrained_weights)
        model.pretrained_weights = str(file)
    if trainable_blocks is not None:
        set_trainable_blocks(model, trainable_blocks)
    return model


__all__ = ["EmbeddingModel", "build_model", "freeze_batchnorm", "set_trainable_blocks"]
