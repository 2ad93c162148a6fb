"""``folder``: an ImageFolder tree ``root/<class_name>/<images>`` (searching sub-folders of a class too)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dmlkit.data.base import REGISTRY, DatasetSplits, FileImageDataset, dataset_root
from dmlkit.data.images import IMAGE_EXTENSIONS, image_files, verify_images
from dmlkit.data.splits import split_class_names
from dmlkit.errors import ConfigError, DataError


def file_splits(
    paths: Sequence[str],
    item_classes: Sequence[str],
    ids: Sequence[str],
    name: str,
    source: str,
    test_classes: float | Sequence[str],
    split_seed: int | None,
    image_size: int,
    channels: int,
) -> DatasetSplits:
    """Zero-shot :class:`DatasetSplits` of image files with class names (shared by ``folder`` and ``csv``).

    ``source`` names the data in errors; ``test_classes`` / ``split_seed`` choose the test classes (see
    :func:`~dmlkit.data.splits.split_class_names`); both splits decode to ``channels`` and get the
    ``photo`` pipelines at ``image_size``.
    """
    if image_size <= 0:
        raise ConfigError(f"image_size must be positive, got {image_size}")
    item_classes = np.asarray(item_classes, dtype=np.str_)
    train_names, test_names = split_class_names(
        np.unique(item_classes).tolist(), test_classes, split_seed, source
    )
    parts = []
    for names in (train_names, test_names):
        rows = np.flatnonzero(np.isin(item_classes, names))
        # names are sorted, so a binary search gives each item's class code
        codes = np.searchsorted(np.asarray(names, dtype=np.str_), item_classes[rows])
        subset_paths, subset_ids = [paths[i] for i in rows], [ids[i] for i in rows]
        parts.append(FileImageDataset(subset_paths, codes, names, subset_ids, channels=channels))
    photo = {"recipe": "photo"}
    return DatasetSplits.checked(parts[0], parts[1], image_size, channels, name, photo, source=source)


@REGISTRY.register("folder")
def folder(
    root: str | None = None,
    test_classes: float | list[str] = 0.5,
    image_size: int = 224,
    channels: int = 3,
    recursive: bool = True,
    skip_unreadable: bool = False,
    split_seed: int | None = None,
) -> DatasetSplits:
    """Images in ``root/<class_name>/...`` (extensions jpg, jpeg, png, bmp, webp; hidden entries ignored).

    Classes are the sorted sub-folder names; ``test_classes`` picks the zero-shot test classes (a fraction:
    the last ones in sorted order, or random ones with ``split_seed``; or a list of names). Every file is
    checked with PIL at build time: unreadable ones raise ``DataError`` unless ``skip_unreadable``; a class
    folder without images raises ``DataError`` naming it.
    """
    base = dataset_root(root, "folder", "the folder holding one sub-folder per class")
    if not base.is_dir():
        raise DataError(f"dataset folder not found: '{base}'")
    class_dirs = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"'{base}' has no class sub-folders (expected root/<class_name>/<images>)")
    paths: list[str] = []
    classes: list[str] = []
    for class_dir in class_dirs:
        images = image_files(class_dir, recursive=recursive, skip_hidden=True)
        if not images:
            raise DataError(
                f"class folder '{class_dir}' holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        paths += [str(p) for p in images]
        classes += [class_dir.name] * len(images)
    ok = verify_images(paths, skip_unreadable, str(base))
    emptied = sorted(set(classes) - {c for c, good in zip(classes, ok, strict=True) if good})
    if emptied:
        raise DataError(f"class folder '{base / emptied[0]}' holds no readable images")
    paths = [p for p, good in zip(paths, ok, strict=True) if good]
    classes = [c for c, good in zip(classes, ok, strict=True) if good]
    ids = [Path(p).relative_to(base).as_posix() for p in paths]
    return file_splits(
        paths, classes, ids, "folder", str(base), test_classes, split_seed, image_size, channels
    )


__all__ = ["file_splits", "folder"]
