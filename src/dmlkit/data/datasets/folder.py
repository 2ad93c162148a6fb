"""``folder``: an ImageFolder tree ``root/<class_name>/<images>`` (searching sub-folders of a class too)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dmlkit.data import images
from dmlkit.data.base import REGISTRY, DatasetSplits, FileImageDataset, dataset_root
from dmlkit.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGE_EXTENSIONS,
    OVERLAP_CHECKS,
    VERIFY_MODES,
    OverlapCheck,
    VerifyMode,
    find_overlap,
    image_files,
)
from dmlkit.data.splits import split_class_names
from dmlkit.errors import ConfigError, DataError


@dataclass(frozen=True)
class FileOptions:
    """How the file datasets (``folder``, ``csv``) check and read their images: the options they share."""

    channels: int = 3
    skip_unreadable: bool = False
    verify_images: str = "auto"
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    overlap_check: str = "path"

    def __post_init__(self) -> None:
        # checked before any file is read, so a typo costs nothing
        if self.channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3, got {self.channels}")
        if self.verify_images not in VERIFY_MODES:
            raise ConfigError(
                f"verify_images must be one of {', '.join(VERIFY_MODES)}, got '{self.verify_images}'"
            )
        if self.max_image_pixels is not None and self.max_image_pixels < 1:
            raise ConfigError(
                f"max_image_pixels must be a positive number or none, got {self.max_image_pixels}"
            )
        if self.overlap_check not in OVERLAP_CHECKS:
            raise ConfigError(
                f"overlap_check must be one of {', '.join(OVERLAP_CHECKS)}, got '{self.overlap_check}'"
            )

    def verify(self, paths: Sequence[str], source: str) -> np.ndarray:
        """:func:`~dmlkit.data.images.verify_images` with these options: the mask of the usable files."""
        return images.verify_images(
            paths,
            self.skip_unreadable,
            source,
            mode=self.verify_images,
            channels=self.channels,
            max_pixels=self.max_image_pixels,
        )


def warn_overlap(train: FileImageDataset, test: FileImageDataset, by: str, source: str) -> int:
    """Warn when images of ``train`` are also in ``test`` (``by`` resolved path or content, see
    :func:`~dmlkit.data.images.find_overlap`): zero-shot results would be inflated. Returns the count."""
    pairs = find_overlap(train.paths.tolist(), test.paths.tolist(), by)
    if pairs:
        shown = ", ".join(f"'{a}'" if a == b else f"'{a}' = '{b}'" for a, b in pairs[:3])
        warnings.warn(
            f"{len(pairs)} image(s) of the train split of '{source}' are also in its test split (same "
            f"{by}): {shown}{' ...' if len(pairs) > 3 else ''}; test results would be optimistic "
            "(overlap_check=none silences this)",
            stacklevel=4,
        )
    return len(pairs)


def file_splits(
    paths: Sequence[str],
    item_classes: Sequence[str],
    ids: Sequence[str],
    name: str,
    source: str,
    test_classes: float | Sequence[str],
    split_seed: int | None,
    image_size: int,
    options: FileOptions,
) -> DatasetSplits:
    """Zero-shot :class:`DatasetSplits` of image files with class names (shared by ``folder`` and ``csv``).

    ``source`` names the data in errors; ``test_classes`` / ``split_seed`` choose the test classes (see
    :func:`~dmlkit.data.splits.split_class_names`); both splits decode to ``options.channels`` (with its
    ``skip_unreadable`` and ``max_image_pixels``) and get the ``photo`` pipelines at ``image_size``; files in
    both splits are warned about (``options.overlap_check``).
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
        parts.append(
            FileImageDataset(
                subset_paths,
                codes,
                names,
                subset_ids,
                channels=options.channels,
                skip_unreadable=options.skip_unreadable,
                max_pixels=options.max_image_pixels,
            )
        )
    photo = {"recipe": "photo"}
    splits = DatasetSplits.checked(
        parts[0], parts[1], image_size, options.channels, name, photo, source=source
    )
    warn_overlap(parts[0], parts[1], options.overlap_check, source)
    return splits


@REGISTRY.register("folder")
def folder(
    root: str | None = None,
    test_classes: float | list[str] = 0.5,
    image_size: int = 224,
    channels: int = 3,
    recursive: bool = True,
    skip_unreadable: bool = False,
    split_seed: int | None = None,
    verify_images: VerifyMode = "auto",
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    overlap_check: OverlapCheck = "path",
) -> DatasetSplits:
    """Images in ``root/<class_name>/...`` (extensions jpg, jpeg, png, bmp, webp; hidden entries ignored).

    Classes are the sorted sub-folder names; ``test_classes`` picks the zero-shot test classes (a fraction:
    the last ones in sorted order, or random ones with ``split_seed``; or a list of names). Every file is
    checked at build time (``verify_images``: ``header``, ``full`` decode, or ``auto``: full up to
    :data:`~dmlkit.data.images.FULL_VERIFY_PIXEL_BUDGET` pixels in all): unusable ones, and images above
    ``max_image_pixels`` pixels (``None``: no limit), raise ``DataError`` unless ``skip_unreadable`` (then
    dropped with a warning, and files failing later are replaced by another image of their class); a class
    folder without images raises ``DataError`` naming it. A file in both splits is warned about
    (``overlap_check``: ``path``, ``content`` or ``none``).
    """
    options = FileOptions(channels, skip_unreadable, verify_images, max_image_pixels, overlap_check)
    base = dataset_root(root, "folder", "the folder holding one sub-folder per class")
    if not base.is_dir():
        raise DataError(f"dataset folder not found: '{base}'")
    class_dirs = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"'{base}' has no class sub-folders (expected root/<class_name>/<images>)")
    paths: list[str] = []
    classes: list[str] = []
    for class_dir in class_dirs:
        found = image_files(class_dir, recursive=recursive, skip_hidden=True)
        if not found:
            raise DataError(
                f"class folder '{class_dir}' holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        paths += [str(p) for p in found]
        classes += [class_dir.name] * len(found)
    ok = options.verify(paths, str(base))
    emptied = sorted(set(classes) - {c for c, good in zip(classes, ok, strict=True) if good})
    if emptied:
        raise DataError(f"class folder '{base / emptied[0]}' holds no readable images")
    paths = [p for p, good in zip(paths, ok, strict=True) if good]
    classes = [c for c, good in zip(classes, ok, strict=True) if good]
    ids = [Path(p).relative_to(base).as_posix() for p in paths]
    return file_splits(
        paths, classes, ids, "folder", str(base), test_classes, split_seed, image_size, options
    )


__all__ = ["FileOptions", "file_splits", "folder", "warn_overlap"]
