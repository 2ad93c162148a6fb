"""Datasets for zero-shot retrieval: ``build(name, root, **kwargs)`` → :class:`DatasetSplits`.

Registered names (:data:`REGISTRY`, :func:`available`; described in :data:`CATALOG`): ``synthetic`` (built
in, the default), ``omniglot``, ``folder``, ``csv`` (OML-compatible), and the benchmarks ``cub200``,
``cars196``, ``sop``, ``inshop``, ``vehicleid``, ``inat2018``, ``gldv2``. A dataset of image files is listed
into an :class:`~dmlkit.data.table.ItemTable` (:mod:`dmlkit.data.table`) before any image is read; items
carry :class:`ItemAnnotations` (query/gallery flags, categories, sequences, crop boxes); :mod:`dmlkit.data.
download` fetches the public ones. Image files are listed, decoded and checked by :mod:`dmlkit.data.images`
(:func:`load_image` / :func:`load_image_tensor`; the build-time check, :func:`verify_images`; a pixel
limit); augmentation recipes are named in :mod:`dmlkit.data.augment` and pipelines built by
:mod:`dmlkit.data.transforms`; :mod:`dmlkit.data.cache` keeps decoded images, :mod:`dmlkit.data.gpu_pipeline`
decodes and crops on the GPU.
"""

from __future__ import annotations

from typing import Any

from dmlkit.data import augment, cache, catalog, images, table, transforms
from dmlkit.data.base import (
    REGISTRY,
    ArrayImageDataset,
    DatasetSplits,
    FileImageDataset,
    ImageDataset,
    ItemAnnotations,
    SharedCounter,
    auto_workers,
    item_seed,
)
from dmlkit.data.cache import DecodedCache
from dmlkit.data.catalog import CATALOG, DatasetInfo, register_file_dataset
from dmlkit.data.datasets import render_glyphs
from dmlkit.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGE_EXTENSIONS,
    ImageTooLargeError,
    find_overlap,
    load_image,
    load_image_tensor,
    verify_images,
)
from dmlkit.data.splits import class_disjoint_split, split_class_names
from dmlkit.data.table import ItemTable

DEFAULT_DATASET = "synthetic"


def build(name: str, root: str | None = None, **kwargs: Any) -> DatasetSplits:
    """Build dataset ``name`` from ``root`` (a path; ignored by ``synthetic``) with its keyword arguments.

    Unknown names and misspelt keywords raise ``UnknownNameError`` with the closest valid one; missing or
    malformed data raise ``DataError`` naming the path.
    """
    return REGISTRY.build(name, root=root, **kwargs)


def available() -> list[str]:
    """Names accepted by :func:`build`."""
    return REGISTRY.available()


def data_spec(splits: DatasetSplits) -> dict[str, Any]:
    """Plain data rebuilding the dataset's pipelines: ``transforms.build(kind, **data_spec(splits))``.

    Holds ``image_size``, ``channels`` and the transform arguments (``recipe``, ``mean``, ``std``, ...), so a
    checkpoint can embed new images exactly as the model was evaluated.
    """
    return splits.spec()


__all__ = [
    "CATALOG",
    "DEFAULT_DATASET",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "IMAGE_EXTENSIONS",
    "REGISTRY",
    "ArrayImageDataset",
    "DatasetInfo",
    "DatasetSplits",
    "DecodedCache",
    "FileImageDataset",
    "ImageDataset",
    "ImageTooLargeError",
    "ItemAnnotations",
    "ItemTable",
    "SharedCounter",
    "augment",
    "auto_workers",
    "available",
    "build",
    "cache",
    "catalog",
    "class_disjoint_split",
    "data_spec",
    "find_overlap",
    "images",
    "item_seed",
    "load_image",
    "load_image_tensor",
    "register_file_dataset",
    "render_glyphs",
    "split_class_names",
    "table",
    "transforms",
    "verify_images",
]
