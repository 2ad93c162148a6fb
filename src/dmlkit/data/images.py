"""Image files: the accepted extensions, one listing helper, one decoder and the build-time check.

Every path → PIL image decoding in dmlkit goes through :func:`load_image` (datasets, ``dmlkit embed`` /
``search`` / landmark benchmarks), so a broken file always raises the same ``DataError`` naming it.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from dmlkit.errors import DataError

_PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

#: Extensions (lower case; matched in any case) of the images the ``folder`` and ``csv`` datasets use.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(_PHOTO_EXTENSIONS)
#: Extensions ``dmlkit embed`` / ``search`` accept, in the order a suffix-less CSV entry tries them: the
#: dataset ones plus GIF and TIFF (kept apart so that the datasets' file lists stay as they are).
EMBED_EXTENSIONS: tuple[str, ...] = (*_PHOTO_EXTENSIONS, ".gif", ".tif", ".tiff")


def image_files(
    folder: Path, *, recursive: bool = True, extensions: Collection[str] = IMAGE_EXTENSIONS, skip_hidden: bool
) -> list[Path]:
    """Sorted files below ``folder`` (or directly in it) whose lower-cased suffix is in ``extensions``.

    ``skip_hidden`` leaves out every path with a component (below ``folder``) starting with ``.``.
    """
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        path
        for path in found
        if path.suffix.lower() in extensions
        and not (skip_hidden and any(part.startswith(".") for part in path.relative_to(folder).parts))
        and path.is_file()
    )


def load_image(path: str | Path, channels: int = 3) -> Image.Image:
    """Decode ``path`` with PIL into mode ``L`` (``channels == 1``) or ``RGB``; ``DataError`` names it."""
    try:
        with Image.open(path) as image:
            return image.convert("L" if channels == 1 else "RGB")
    except Exception as exc:
        raise DataError(f"cannot read image '{path}': {exc}") from exc


def is_readable(path: str | Path) -> bool:
    """Whether PIL parses the header of ``path`` and ``verify()`` passes (no full decode)."""
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:
        return False


def verify_images(paths: Sequence[str], skip_unreadable: bool, source: str) -> np.ndarray:
    """Check that every file opens as an image (:func:`is_readable`); boolean mask of the good ones.

    Unreadable or missing files raise ``DataError`` naming the first few, unless ``skip_unreadable`` is set,
    in which case they are dropped with a warning that reports how many.
    """
    # decoding headers is I/O bound: threads overlap the file reads
    with ThreadPoolExecutor(max_workers=8) as pool:
        ok = np.fromiter(pool.map(is_readable, paths, chunksize=64), dtype=bool, count=len(paths))
    bad = [paths[i] for i in np.flatnonzero(~ok)]
    if bad:
        shown = ", ".join(f"'{p}'" for p in bad[:3]) + (" ..." if len(bad) > 3 else "")
        if not skip_unreadable:
            raise DataError(
                f"{len(bad)} missing or unreadable image(s) in '{source}': {shown} "
                "(pass skip_unreadable=True to drop them)"
            )
        warnings.warn(
            f"skipped {len(bad)} missing or unreadable image(s) of {len(paths)} in '{source}': {shown}",
            stacklevel=3,
        )
    return ok


__all__ = [
    "EMBED_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "image_files",
    "is_readable",
    "load_image",
    "verify_images",
]
