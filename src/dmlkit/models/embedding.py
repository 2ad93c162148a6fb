"""The embedding model: backbone → global pooling → head → optional L2 normalisation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dmlkit.errors import ConfigError
from dmlkit.models.backbones import Backbone, WeightsReport
from dmlkit.models.backbones import build as build_backbone
from dmlkit.models.heads import Head, for_embedding_size
from dmlkit.models.pooling import build as build_pooling

PlainValue = str | int | float | bool | None


def _plain(key: str, value: Any) -> Any:
    """``value`` as YAML/JSON-friendly data (tuples become lists); anything else is a ``ConfigError``."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):
        return [_plain(key, v) for v in value]
    raise ConfigError(
        f"model option '{key}' must be a str/int/float/bool/None (or a list of them) so checkpoints can "
        f"rebuild the model, got {type(value).__name__}"
    )


class EmbeddingModel(nn.Module):
    """``e = normalize(head(pool(backbone(x))))``.

    ``backbone`` is a :class:`~dmlkit.models.backbones.Backbone` (``out_channels``, ``weights_report``),
    ``head`` a :class:`~dmlkit.models.heads.Head` (``out_features``).

    ``config`` holds the :func:`build_model` keyword arguments that rebuild the architecture
    (``build_model(**model.config)``), as plain data so it can be stored in checkpoints; the weights file
    used at construction is not part of it (the checkpoint's state dict replaces it) and is kept in
    ``pretrained_weights`` instead.
    """

    def __init__(
        self,
        backbone: Backbone,
        pool: nn.Module,
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
        self._batchnorm_frozen = False
        self.feature_dim = int(backbone.out_channels)
        self.embedding_size = int(head.out_features)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features ``B × feature_dim`` (before head and normalisation)."""
        return self.pool(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embeddings = self.head(self.features(x))
        return F.normalize(embeddings, dim=1) if self.normalize else embeddings

    def train(self, mode: bool = True) -> EmbeddingModel:
        """Like ``nn.Module.train``, but BatchNorm layers stay frozen after :func:`freeze_batchnorm`."""
        super().train(mode)
        if mode and self._batchnorm_frozen:
            freeze_batchnorm(self)
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


def build_model(
    backbone: str = "small_cnn",
    embedding_size: int | None = 64,
    pooling: str = "avg",
    normalize: bool = True,
    pretrained_weights: str | None = None,
    in_channels: int = 3,
    image_size: int | None = None,
    **backbone_kwargs: Any,
) -> EmbeddingModel:
    """Build an :class:`EmbeddingModel`.

    ``backbone``: ``small_cnn``, ``timm:<model>`` or ``torchvision:<model>`` (see
    :mod:`dmlkit.models.backbones`); ``embedding_size``: output size of the linear head (``0``/``None``:
    no head, the pooled features are the embedding); ``pooling``: a name of
    :data:`dmlkit.models.pooling.REGISTRY` (``avg``, ``max``, ``gem``); ``normalize``: L2-normalise the
    output; ``pretrained_weights``: a local state-dict file loaded into the backbone (never downloaded);
    ``backbone_kwargs``: passed to the backbone constructor (e.g. ``widths`` of ``small_cnn``,
    ``drop_path_rate`` of a timm model).
    """
    if in_channels <= 0:
        raise ConfigError(f"in_channels must be positive, got {in_channels}")
    config = {
        "backbone": backbone,
        "embedding_size": embedding_size,
        "pooling": pooling,
        "normalize": normalize,
        "pretrained_weights": None,
        "in_channels": in_channels,
        "image_size": image_size,
    }
    config.update(backbone_kwargs)
    config = {key: _plain(key, value) for key, value in config.items()}
    pool = build_pooling(pooling)
    net = build_backbone(
        backbone,
        in_channels=in_channels,
        pretrained_weights=pretrained_weights,
        image_size=image_size,
        **backbone_kwargs,
    )
    head = for_embedding_size(int(net.out_channels), embedding_size)
    model = EmbeddingModel(net, pool, head, normalize=normalize, config=config)
    model.pretrained_weights = str(Path(pretrained_weights)) if pretrained_weights is not None else None
    return model


__all__ = ["EmbeddingModel", "build_model", "freeze_batchnorm"]
