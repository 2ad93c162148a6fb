"""``csv``: a table listing one image per row with its class label (e.g. the clothing dataset)."""

from __future__ import annotations

import csv as csvlib
from collections.abc import Sequence
from pathlib import Path

from dmlkit.data.base import REGISTRY, DatasetSplits, dataset_file
from dmlkit.data.datasets.folder import FileOptions, file_splits
from dmlkit.data.images import DEFAULT_MAX_IMAGE_PIXELS, IMAGE_EXTENSIONS, OverlapCheck, VerifyMode
from dmlkit.errors import DataError

DEFAULT_CSV_NAME = "images.csv"


def _resolve(value: str, base: Path, extension: str) -> Path:
    path = Path(value)
    if extension and path.suffix.lower() not in IMAGE_EXTENSIONS:
        path = path.with_name(path.name + extension)
    return path if path.is_absolute() else base / path


@REGISTRY.register("csv")
def csv_dataset(
    root: str | None = None,
    image_column: str = "image",
    label_column: str = "label",
    images_dir: str | None = None,
    exclude_labels: Sequence[str] = (),
    extension: str = ".jpg",
    test_classes: float | list[str] = 0.5,
    image_size: int = 224,
    channels: int = 3,
    skip_unreadable: bool = False,
    split_seed: int | None = None,
    verify_images: VerifyMode = "auto",
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    overlap_check: OverlapCheck = "path",
) -> DatasetSplits:
    """Images listed in a CSV file: ``root`` is the file, or a folder holding ``images.csv``.

    ``image_column`` holds image paths or ids (``extension`` is appended when the value has no image
    extension), relative to ``images_dir`` (itself relative to the CSV's folder); by default the CSV's folder,
    or its ``images/`` sub-folder when the first image is found there. Rows whose label is in
    ``exclude_labels`` (e.g. ``["Not sure", "Skip"]``) are dropped. The zero-shot split by classes follows
    ``test_classes``/``split_seed`` as for ``folder``, and so do the checks (``verify_images``,
    ``max_image_pixels``, ``skip_unreadable``, ``overlap_check``: one file listed under a train label and a
    test label is warned about).
    """
    options = FileOptions(channels, skip_unreadable, verify_images, max_image_pixels, overlap_check)
    expected = f"a CSV file or a folder holding {DEFAULT_CSV_NAME}"
    table = dataset_file(root, "csv", expected, DEFAULT_CSV_NAME, "dataset CSV file")
    try:
        with table.open(newline="", encoding="utf-8-sig") as handle:
            reader = csvlib.DictReader(handle)
            columns = list(reader.fieldnames or [])
            for column in (image_column, label_column):
                if column not in columns:
                    raise DataError(f"'{table}' has no column '{column}' (columns: {', '.join(columns)})")
            rows = [(row[image_column], row[label_column], n) for n, row in enumerate(reader, start=2)]
    except (OSError, UnicodeDecodeError, csvlib.Error) as exc:
        raise DataError(f"cannot read dataset CSV '{table}': {exc}") from exc
    excluded = {str(label) for label in exclude_labels}
    rows = [row for row in rows if (row[1] or "").strip() not in excluded]
    for value, label, line in rows:
        if not (value or "").strip() or not (label or "").strip():
            raise DataError(f"'{table}' line {line}: empty '{image_column}' or '{label_column}'")
    if not rows:
        raise DataError(f"'{table}' lists no images (after excluding {sorted(excluded)})")

    if images_dir is not None:
        base = Path(images_dir).expanduser()
        base = base if base.is_absolute() else table.parent / base
        if not base.is_dir():
            raise DataError(f"images_dir not found: '{base}'")
    else:
        candidates = [table.parent, table.parent / "images"]
        base = next(
            (c for c in candidates if _resolve(rows[0][0].strip(), c, extension).is_file()), table.parent
        )
    paths = [str(_resolve(value.strip(), base, extension)) for value, _, _ in rows]
    ok = options.verify(paths, str(table))
    kept = [(path, row) for path, row, good in zip(paths, rows, ok, strict=True) if good]
    kept_paths = [path for path, _ in kept]
    labels, ids = [row[1].strip() for _, row in kept], [row[0].strip() for _, row in kept]
    return file_splits(
        kept_paths, labels, ids, "csv", str(table), test_classes, split_seed, image_size, options
    )


__all__ = ["csv_dataset"]
