"""Embedding models: ``build_model(backbone, embedding_size, pooling, ...)`` → :class:`EmbeddingModel`.

The parts come from registries, each with ``REGISTRY``, ``build(name, ...)`` and ``available()``:
:mod:`~dmlkit.models.backbones` (``small_cnn``, ``timm:<model>``, ``torchvision:<model>``),
:mod:`~dmlkit.models.pooling` (``avg``, ``max``, ``gem``, ``cls``, ``cls+avg``),
:mod:`~dmlkit.models.heads` (``linear``, ``mlp``, ``none``) and :mod:`~dmlkit.models.weights` (the
``package:`` weight shortcuts). :data:`REGISTRY` is the backbone registry, the one ``dmlkit list backbones``
shows. :mod:`~dmlkit.models.preprocessing` says what input a backbone expects.
"""

from dmlkit.models import backbones, heads, pooling, preprocessing, weights
from dmlkit.models.backbones import Backbone, Block, TokenLayout
from dmlkit.models.embedding import EmbeddingModel, build_model, freeze_batchnorm, set_trainable_blocks
from dmlkit.models.heads import Head, LinearHead, MLPHead
from dmlkit.models.pooling import GeM, Pooling
from dmlkit.models.weights import (
    WeightsPackage,
    WeightsReport,
    load_local_weights,
    map_state_dict_by_position,
    read_state_dict,
)

REGISTRY = backbones.REGISTRY

__all__ = [
    "REGISTRY",
    "Backbone",
    "Block",
    "EmbeddingModel",
    "GeM",
    "Head",
    "LinearHead",
    "MLPHead",
    "Pooling",
    "TokenLayout",
    "WeightsPackage",
    "WeightsReport",
    "backbones",
    "build_model",
    "freeze_batchnorm",
    "heads",
    "load_local_weights",
    "map_state_dict_by_position",
    "pooling",
    "preprocessing",
    "read_state_dict",
    "set_trainable_blocks",
    "weights",
]
