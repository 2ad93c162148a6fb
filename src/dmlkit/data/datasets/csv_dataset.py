"""``csv``: a table of images with their labels, in the open-metric-learning (OML) format or a plain
two-column one (e.g. the clothing dataset).

Columns (a file written for OML loads unchanged; ``docs/datasets.md`` gives the mapping):

- ``path`` (or ``image``, or ``image_column``) and ``label`` (or ``label_column``): required;
- ``split``: ``train``, ``validation`` or ``test``. Without ``test`` rows, ``validation`` is the test split
  (OML evaluates on it); with both, it is the run's validation split. Without the column the classes are
  split zero-shot by ``test_classes`` / ``split_seed``, as for ``folder``;
- ``is_query`` / ``is_gallery`` (``True``/``False``, ``1``/``0``, ``yes``/``no``; empty on train rows): the
  query/gallery protocol of the evaluation rows;
- ``category``: a super-label (hierarchical sampler, per-category metrics);
- ``x_1``, ``y_1``, ``x_2``, ``y_2``: a crop box in pixels (all four, or all empty);
- ``sequence``: items of one sequence never retrieve each other.
"""

from __future__ import annotations

import csv as csvlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dmlkit.data.base import dataset_file
from dmlkit.data.catalog import DatasetInfo, register_file_dataset
from dmlkit.data.images import IMAGE_EXTENSIONS
from dmlkit.data.table import ItemTable
from dmlkit.errors import ConfigError, DataError

DEFAULT_CSV_NAME = "images.csv"
#: The OML names of the optional columns.
BOX_COLUMNS: tuple[str, ...] = ("x_1", "y_1", "x_2", "y_2")
TRUE_WORDS = frozenset({"1", "true", "t", "yes", "y"})
FALSE_WORDS = frozenset({"0", "false", "f", "no", "n"})


def _resolve(value: str, base: Path, extension: str) -> Path:
    path = Path(value)
    if extension and path.suffix.lower() not in IMAGE_EXTENSIONS:
        path = path.with_name(path.name + extension)
    return path if path.is_absolute() else base / path


def _flag(value: str, column: str, where: str) -> bool:
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise DataError(f"{where}: {column} must be True or False (1/0, yes/no), got '{value}'")


def _box(row: dict[str, str], where: str) -> list[float]:
    values = [(row.get(column) or "").strip() for column in BOX_COLUMNS]
    if not any(values):
        return [np.nan] * 4
    if not all(values):
        empty = [c for c, v in zip(BOX_COLUMNS, values, strict=True) if not v]
        raise DataError(f"{where}: a crop box needs x_1, y_1, x_2 and y_2; {', '.join(empty)} empty")
    try:
        box = [float(v) for v in values]
    except ValueError:
        bad = next(c for c, v in zip(BOX_COLUMNS, values, strict=True) if not _is_number(v))
        raise DataError(f"{where}: {bad} must be a number, got '{row[bad]}'") from None
    if not (box[2] > box[0] and box[3] > box[1]):
        raise DataError(f"{where}: crop box x_1, y_1, x_2, y_2 = {box} is empty (needs x_2 > x_1, y_2 > y_1)")
    return box


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def csv_table(
    root: str | None = None,
    image_column: str | None = None,
    label_column: str = "label",
    images_dir: str | None = None,
    exclude_labels: Sequence[str] = (),
    extension: str = ".jpg",
    test_classes: float | list[str] | None = None,
    split_seed: int | None = None,
) -> ItemTable:
    """Images listed in a CSV file: ``root`` is the file, or a folder holding ``images.csv``.

    ``image_column`` (default ``path``, else ``image``) holds image paths or ids (``extension`` is
    appended when the value has no image extension), relative to ``images_dir`` (itself relative to the
    CSV's folder; OML's ``dataset_root``); by default the CSV's folder, or its ``images/`` sub-folder when
    the first image is found there. Rows whose label is in ``exclude_labels`` (e.g. ``["Not sure",
    "Skip"]``) are dropped. Without a ``split`` column the classes are split zero-shot by ``test_classes``
    (default 0.5) and ``split_seed``, as for ``folder``; with one, ``test_classes`` is an error. A malformed
    value raises ``DataError`` naming the file, the line and the column.
    """
    expected = f"a CSV file or a folder holding {DEFAULT_CSV_NAME}"
    table = dataset_file(root, "csv", expected, DEFAULT_CSV_NAME, "dataset CSV file")
    columns, rows = _read(table)
    image_column = image_column or ("path" if "path" in columns else "image")
    has_boxes = _check_columns(table, columns, image_column, label_column)
    has_split, has_flags = "split" in columns, "is_query" in columns
    if has_split and test_classes is not None:
        raise ConfigError(f"test_classes: '{table}' has a split column, which decides the test split")
    excluded = {str(label) for label in exclude_labels}
    rows = [(n, row) for n, row in rows if (row.get(label_column) or "").strip() not in excluded]
    for n, row in rows:
        if None in row or any(value is None for value in row.values()):
            raise DataError(f"'{table}' line {n}: {len(columns)} columns expected, the row has another count")
        if not row[image_column].strip() or not row[label_column].strip():
            raise DataError(f"'{table}' line {n}: empty '{image_column}' or '{label_column}'")
    if not rows:
        raise DataError(f"'{table}' lists no images (after excluding {sorted(excluded)})")
    values = [row[image_column].strip() for _, row in rows]
    base = _images_base(table, images_dir, values[0], extension)

    def column(name: str) -> list[str] | None:
        return [(row[name] or "").strip() for _, row in rows] if name in columns else None

    items = ItemTable(
        str(table),
        [str(_resolve(value, base, extension)) for value in values],
        [row[label_column].strip() for _, row in rows],
        [split.lower() for split in column("split") or ["train"] * len(rows)],
        values,
        lines=[n for n, _ in rows],
        categories=column("category"),
        sequences=column("sequence"),
        boxes=[_box(row, f"'{table}' line {n}") for n, row in rows] if has_boxes else None,
    )
    if not has_split:
        items = items.with_class_split(0.5 if test_classes is None else test_classes, split_seed)
    if has_flags:
        items.is_query, items.is_gallery = _query_flags(table, rows, items.splits)
    return items


def _read(table: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The columns and the ``(line, row)`` pairs of a CSV file."""
    try:
        with table.open(newline="", encoding="utf-8-sig") as handle:
            reader = csvlib.DictReader(handle)
            columns = list(reader.fieldnames or [])
            return columns, [(n, row) for n, row in enumerate(reader, start=2)]
    except (OSError, UnicodeDecodeError, csvlib.Error) as exc:
        raise DataError(f"cannot read dataset CSV '{table}': {exc}") from exc


def _check_columns(table: Path, columns: list[str], image_column: str, label_column: str) -> bool:
    """``DataError`` for a missing required column, half of the query/gallery pair or of the box columns;
    whether the crop box columns are there."""
    for column in (image_column, label_column):
        if column not in columns:
            raise DataError(f"'{table}' has no column '{column}' (columns: {', '.join(columns)})")
    if ("is_query" in columns) != ("is_gallery" in columns):
        raise DataError(f"'{table}' has only one of the columns is_query and is_gallery (both are needed)")
    present = [c for c in BOX_COLUMNS if c in columns]
    if present and len(present) != 4:
        missing = [c for c in BOX_COLUMNS if c not in columns]
        raise DataError(f"'{table}' has crop box column(s) {present} but not {missing}")
    return bool(present)


def _images_base(table: Path, images_dir: str | None, first: str, extension: str) -> Path:
    """The folder image paths are relative to: ``images_dir`` (relative to the CSV's folder), else the
    CSV's folder, or its ``images/`` sub-folder when the first image is found there."""
    if images_dir is not None:
        base = Path(images_dir).expanduser()
        base = base if base.is_absolute() else table.parent / base
        if not base.is_dir():
            raise DataError(f"images_dir not found: '{base}'")
        return base
    candidates = [table.parent, table.parent / "images"]
    return next((c for c in candidates if _resolve(first, c, extension).is_file()), table.parent)


def _query_flags(
    table: Path, rows: list[tuple[int, dict[str, str]]], splits: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``is_query`` and ``is_gallery`` of every row; training rows are not read (OML leaves them empty)."""
    flags = np.zeros((2, len(rows)), dtype=bool)
    for i, (n, row) in enumerate(rows):
        if splits[i] != "train":
            for j, column in enumerate(("is_query", "is_gallery")):
                flags[j, i] = _flag(row[column] or "", column, f"'{table}' line {n}")
    return flags[0], flags[1]


csv_dataset = register_file_dataset(
    DatasetInfo(
        name="csv",
        title="A CSV list of images (OML-compatible)",
        protocol="the split column, or a zero-shot split by classes; leave-one-out or query/gallery",
        layout="a CSV file (or a folder holding images.csv): path,label[,split,is_query,is_gallery,...]",
        table=csv_table,
    )
)

__all__ = ["BOX_COLUMNS", "csv_dataset", "csv_table"]
