"""Embedding models: ``build_model(backbone, embedding_size, pooling, ...)`` → :class:`EmbeddingModel`."""

from dmlkit.models.backbones import (
    BACKBONES,
    WeightsReport,
    available_backbones,
    backbone_exists,
    build_backbone,
    load_local_weights,
    map_state_dict_by_position,
    read_state_dict,
)
from dmlkit.models.embedding import EmbeddingModel, build_model, freeze_batchnorm
from dmlkit.models.heads import LinearHead, build_head
from dmlkit.models.pooling import POOLING, GeM, available_pooling, build_pooling, check_pooling

__all__ = [
    "BACKBONES",
    "POOLING",
    "EmbeddingModel",
    "GeM",
    "LinearHead",
    "WeightsReport",
    "available_backbones",
    "available_pooling",
    "backbone_exists",
    "build_backbone",
    "build_head",
    "build_model",
    "build_pooling",
    "check_pooling",
    "freeze_batchnorm",
    "load_local_weights",
    "map_state_dict_by_position",
    "read_state_dict",
]
