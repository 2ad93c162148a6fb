"""Embedding models: ``build_model(backbone, embedding_size, pooling, ...)`` → :class:`EmbeddingModel`.

The parts come from three registries, each with ``REGISTRY``, ``build(name, ...)`` and ``available()``:
:mod:`~dmlkit.models.backbones` (``small_cnn``, ``timm:<model>``, ``torchvision:<model>``),
:mod:`~dmlkit.models.pooling` (``avg``, ``max``, ``gem``) and :mod:`~dmlkit.models.heads` (``linear``,
``identity``). :data:`REGISTRY` is the backbone registry, the one ``dmlkit list backbones`` shows.
"""

from dmlkit.models import backbones, heads, pooling
from dmlkit.models.backbones import (
    Backbone,
    WeightsReport,
    load_local_weights,
    map_state_dict_by_position,
    read_state_dict,
)
from dmlkit.models.embedding import EmbeddingModel, build_model, freeze_batchnorm
from dmlkit.models.heads import Head, LinearHead
from dmlkit.models.pooling import GeM

REGISTRY = backbones.REGISTRY

__all__ = [
    "REGISTRY",
    "Backbone",
    "EmbeddingModel",
    "GeM",
    "Head",
    "LinearHead",
    "WeightsReport",
    "backbones",
    "build_model",
    "freeze_batchnorm",
    "heads",
    "load_local_weights",
    "map_state_dict_by_position",
    "pooling",
    "read_state_dict",
]
