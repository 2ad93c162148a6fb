"""``unlabelled``: every image under a folder, at any depth, without classes: data for self-supervised
training (``dmlkit train --ssl``), where each image is its own class and its positives are its own
augmented views (docs/ssl.md).

The dataset has a training part only: with no labels there is nothing to validate or test retrieval on, so
its :class:`~dmlkit.data.base.DatasetSplits` has ``test=None`` and the run measures no retrieval metric.
"""

from __future__ import annotations

import numpy as np

from dmlkit.data.base import REGISTRY, DatasetSplits, FileImageDataset, dataset_root
from dmlkit.data.catalog import CATALOG, DatasetInfo
from dmlkit.data.images import DEFAULT_MAX_IMAGE_PIXELS, IMAGE_EXTENSIONS, VerifyMode, image_files
from dmlkit.data.table import FileOptions, ItemTable
from dmlkit.errors import ConfigError, DataError

NAME = "unlabelled"


def unlabelled_table(root: str | None = None, recursive: bool = True) -> ItemTable:
    """Every image below ``root`` (the extensions of ``folder``: jpg, jpeg, png, bmp, webp, any case; hidden
    entries ignored; ``recursive`` False: only the files directly in ``root``), sorted by path. Each image is
    its own class, named by its path relative to ``root`` (its id); every row is a training row."""
    base = dataset_root(root, NAME, "the folder holding the images (at any depth)")
    if not base.is_dir():
        raise DataError(f"dataset folder not found: '{base}'")
    found = image_files(base, recursive=recursive, skip_hidden=True)
    if not found:
        where = "below" if recursive else "directly in"
        raise DataError(f"'{base}' holds no images {where} it ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    ids = [path.relative_to(base).as_posix() for path in found]
    return ItemTable(str(base), [str(path) for path in found], ids, np.full(len(ids), "train"), ids)


@REGISTRY.register(NAME)
def unlabelled(
    root: str | None = None,
    *,
    recursive: bool = True,
    image_size: int = 224,
    channels: int = 3,
    skip_unreadable: bool = False,
    verify_images: VerifyMode = "auto",
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> DatasetSplits:
    """The images of :func:`unlabelled_table` as a training part whose label of item ``i`` is ``i`` (each
    image its own class), checked first like every file dataset (``verify_images``; ``skip_unreadable``
    drops the files that fail, with a warning); no test split. The options are those of ``folder``, less
    its classes and the train/test overlap check (there is no test split to overlap)."""
    if image_size <= 0:
        raise ConfigError(f"image_size must be positive, got {image_size}")
    options = FileOptions(channels, skip_unreadable, verify_images, max_image_pixels)  # checked here
    table = unlabelled_table(root, recursive)
    usable = options.verify(table.paths.tolist(), table.source)
    if not usable.any():
        raise DataError(f"'{table.source}': none of its {len(table)} images is readable")
    table = table.select(np.flatnonzero(usable))
    ids = table.ids.tolist()
    train = FileImageDataset(
        table.paths.tolist(),
        np.arange(len(ids), dtype=np.int64),
        ids,
        ids,
        channels=channels,
        skip_unreadable=skip_unreadable,
        max_pixels=max_image_pixels,
    )
    splits = DatasetSplits(train, None, image_size, channels, NAME, {"recipe": "photo"})
    train.transform = splits.transform("train")
    return splits


CATALOG.add(
    DatasetInfo(
        name=NAME,
        title="An unlabelled image folder (self-supervised training)",
        protocol="no labels: dmlkit train --ssl only, each image its own class; no validation or test split",
        layout="root/<images, at any depth>",
        table=unlabelled_table,
        labelled=False,
    )
)


def is_labelled(dataset: str) -> bool:
    """Whether the registered dataset ``dataset`` has classes (unknown names count as labelled: the
    registry names them in its own error)."""
    return dataset not in CATALOG or CATALOG.get(dataset).labelled


__all__ = ["NAME", "is_labelled", "unlabelled", "unlabelled_table"]
