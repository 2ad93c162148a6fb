"""``folder``: an ImageFolder tree ``root/<class_name>/<images>`` (searching sub-folders of a class too)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dmlkit.data.base import dataset_root
from dmlkit.data.catalog import DatasetInfo, register_file_dataset
from dmlkit.data.images import IMAGE_EXTENSIONS, image_files
from dmlkit.data.table import ItemTable
from dmlkit.errors import ConfigError, DataError


def folder_table(
    root: str | None = None,
    test_classes: float | list[str] = 0.5,
    split_seed: int | None = None,
    recursive: bool = True,
    class_depth: int = 1,
) -> ItemTable:
    """Images in ``root/<class_name>/...`` (extensions jpg, jpeg, png, bmp, webp; hidden entries ignored).

    Classes are the sorted sub-folder names; ``test_classes`` picks the zero-shot test classes (a fraction:
    the last ones in sorted order, or random ones with ``split_seed``; or a list of names); ``recursive``
    searches the sub-folders of a class folder too. ``class_depth`` 2 makes the folders two levels down the
    classes, named ``parent/child`` (Omniglot's ``alphabet/character``; the part before ``/`` is the
    hierarchical sampler's super-class). A class folder without images raises ``DataError`` naming it.
    """
    if class_depth < 1:
        raise ConfigError(f"class_depth must be at least 1, got {class_depth}")
    base = dataset_root(root, "folder", "the folder holding one sub-folder per class")
    if not base.is_dir():
        raise DataError(f"dataset folder not found: '{base}'")
    class_dirs = [base]
    for _ in range(class_depth):
        class_dirs = sorted(
            p for d in class_dirs for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
    if not class_dirs:
        layout = "/".join(["<class_name>"] * class_depth)
        raise DataError(f"'{base}' has no class sub-folders (expected root/{layout}/<images>)")
    paths: list[str] = []
    classes: list[str] = []
    for class_dir in class_dirs:
        found = image_files(class_dir, recursive=recursive, skip_hidden=True)
        if not found:
            raise DataError(
                f"class folder '{class_dir}' holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        paths += [str(p) for p in found]
        classes += [class_dir.relative_to(base).as_posix()] * len(found)
    ids = [Path(p).relative_to(base).as_posix() for p in paths]
    table = ItemTable(str(base), paths, classes, np.full(len(paths), "train"), ids)
    return table.with_class_split(test_classes, split_seed)


folder = register_file_dataset(
    DatasetInfo(
        name="folder",
        title="An image folder tree",
        protocol="zero-shot split by classes (test_classes); leave-one-out",
        layout="root/<class name>/<images> (sub-folders of a class are searched too)",
        table=folder_table,
    )
)


__all__ = ["folder", "folder_table"]
