"""Item tables: what a file dataset lists before any image is read, and the splits built from one.

Every dataset of image files (``folder``, ``csv``, the standard benchmarks) first reads its list files into
an :class:`ItemTable`: one row per image with its path, class, split and, when the dataset has them, the
query/gallery flags, a category, a crop box and a sequence. The table is all that ``dmlkit datasets check``
(counts, missing files) and ``dmlkit datasets convert`` (the OML-compatible CSV) need; :func:`table_splits`
turns it into the :class:`~dmlkit.data.base.DatasetSplits` a run trains on, checking every image first.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from dmlkit.data import images
from dmlkit.data.base import DatasetSplits, FileImageDataset, ItemAnnotations
from dmlkit.data.images import DEFAULT_MAX_IMAGE_PIXELS, OVERLAP_CHECKS, VERIFY_MODES, find_overlap
from dmlkit.data.splits import split_class_names
from dmlkit.errors import ConfigError, DataError

#: The split names a table may hold (an OML CSV's ``validation``; see :func:`table_splits` for its role).
SPLITS: tuple[str, ...] = ("train", "validation", "test")


@dataclass(frozen=True)
class FileOptions:
    """How the file datasets check and read their images: the options they all share."""

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


def _strings(values: Sequence[str] | np.ndarray) -> np.ndarray:
    """``values`` as a numpy string array (no copy when they are one already: GLDv2 lists 4·10⁶ rows)."""
    array = np.asarray(values)
    return array if array.dtype.kind == "U" else array.astype(np.str_)


@dataclass
class ItemTable:
    """The items of a dataset of image files, one row each (arrays of equal length).

    - ``source``: the list file (or folder) the rows come from; errors name it with ``lines``;
    - ``paths``: image files; ``ids``: stable ids (paths relative to the dataset root);
    - ``labels``: class names; ``splits``: one of :data:`SPLITS` per row;
    - ``lines``: the 1-based line that lists each row (``None``: not from a text file), in ``source`` or,
      for a dataset listed in several files (VehicleID's train and test lists), in ``sources`` (per row);
      ``unit`` names what a line is (``line``; ``entry`` for the struct array of a ``.mat`` file);
    - ``is_query`` / ``is_gallery`` (bool): the query/gallery protocol of the evaluation rows;
    - ``categories``: super-labels ("" for none); ``sequences``: items of one sequence never retrieve
      each other ("" for none);
    - ``boxes`` (float64 ``n × 4``): crop boxes ``x1, y1, x2, y2`` in pixels of the stored image, a row
      of NaN for none.
    """

    source: str
    paths: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    ids: np.ndarray
    lines: np.ndarray | None = None
    sources: np.ndarray | None = None
    unit: str = "line"
    is_query: np.ndarray | None = None
    is_gallery: np.ndarray | None = None
    categories: np.ndarray | None = None
    sequences: np.ndarray | None = None
    boxes: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.paths, self.labels = _strings(self.paths), _strings(self.labels)
        self.splits, self.ids = _strings(self.splits), _strings(self.ids)
        size = len(self.paths)
        if self.lines is not None:
            self.lines = np.asarray(self.lines, dtype=np.int64)
        for name in ("is_query", "is_gallery"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, np.asarray(value, dtype=bool))
        for name in ("categories", "sequences", "sources"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, _strings(value))
        if self.boxes is not None:
            self.boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, np.ndarray) and len(value) != size:
                raise DataError(f"'{self.source}': {len(value)} {item.name} for {size} items")
        if (self.is_query is None) != (self.is_gallery is None):
            raise DataError(f"'{self.source}': is_query and is_gallery go together (give both or neither)")
        unknown = np.flatnonzero(~np.isin(self.splits, SPLITS))
        if len(unknown):
            i = int(unknown[0])
            raise DataError(f"{self.where(i)}: split '{self.splits[i]}' is not one of {', '.join(SPLITS)}")

    def __len__(self) -> int:
        return len(self.paths)

    def where(self, row: int) -> str:
        """``'<list file>' line N`` (or ``item '<path>'`` when the rows have no lines), for messages."""
        if self.lines is not None:
            source = self.source if self.sources is None else self.sources[row]
            return f"'{source}' {self.unit} {int(self.lines[row])}"
        return f"'{self.source}' item '{self.paths[row]}'"

    def select(self, rows: np.ndarray) -> ItemTable:
        """The table of ``rows`` (indices or a boolean mask), in that order."""
        picked = {
            item.name: getattr(self, item.name)[rows]
            for item in fields(self)
            if isinstance(getattr(self, item.name), np.ndarray)
        }
        return replace(self, **picked)

    @classmethod
    def concatenate(cls, tables: Sequence[ItemTable], source: str) -> ItemTable:
        """One table of ``tables``' rows in order (e.g. a train list and a test list), named ``source``;
        each row keeps its list file (``sources``) and line for messages. A column missing from some of the
        tables is filled: flags False, categories and sequences "", boxes NaN."""
        if not tables:
            raise ValueError("concatenate needs at least one table")

        def joined(name: str, fill: object) -> np.ndarray | None:
            values = [getattr(t, name) for t in tables]
            if all(v is None for v in values):
                return None

            def filled(table: ItemTable) -> np.ndarray:
                return np.full((len(table), 4) if name == "boxes" else len(table), fill)

            return np.concatenate(
                [v if v is not None else filled(t) for v, t in zip(values, tables, strict=True)]
            )

        with_lines = all(t.lines is not None for t in tables)
        sources = [t.sources if t.sources is not None else np.full(len(t), t.source) for t in tables]
        return cls(
            source,
            np.concatenate([t.paths for t in tables]),
            np.concatenate([t.labels for t in tables]),
            np.concatenate([t.splits for t in tables]),
            np.concatenate([t.ids for t in tables]),
            lines=np.concatenate([t.lines for t in tables]) if with_lines else None,  # type: ignore[misc]
            sources=np.concatenate(sources) if with_lines else None,
            unit=tables[0].unit,
            is_query=joined("is_query", False),
            is_gallery=joined("is_gallery", False),
            categories=joined("categories", ""),
            sequences=joined("sequences", ""),
            boxes=joined("boxes", np.nan),
        )

    def split_rows(self, split: str) -> np.ndarray:
        """Indices of the rows of ``split``."""
        return np.flatnonzero(self.splits == split)

    def counts(self, total: bool = False) -> dict[str, tuple[int, int]]:
        """Split → (images, classes), for the splits present, in :data:`SPLITS` order; with ``total`` also
        ``"all"``: the whole table (what GLDv2's official counts describe)."""
        found = {"all": (len(self), len(np.unique(self.labels)))} if total else {}
        for split in SPLITS:
            rows = self.split_rows(split)
            if len(rows):
                found[split] = (len(rows), len(np.unique(self.labels[rows])))
        return found

    def with_class_split(self, test_classes: float | Sequence[str], split_seed: int | None) -> ItemTable:
        """Every row in ``train`` or ``test`` by its class (a zero-shot split: see
        :func:`~dmlkit.data.splits.split_class_names`)."""
        names, codes = np.unique(self.labels, return_inverse=True)
        _, test = split_class_names(names.tolist(), test_classes, split_seed, self.source)
        in_test = np.isin(names, np.asarray(test, dtype=names.dtype))[codes]  # one pass over the rows
        return replace(self, splits=np.where(in_test, "test", "train"))

    def check_queries(self) -> None:
        """``DataError`` naming the line of the first query (a row with ``is_query``) of an evaluation split
        that has no gallery item of its class besides itself: its metrics would be undefined."""
        if self.is_query is None or self.is_gallery is None:
            return
        for split in ("validation", "test"):
            rows = self.split_rows(split)
            queries = rows[self.is_query[rows]]
            if not len(queries):
                continue
            gallery = rows[self.is_gallery[rows]]
            if not len(gallery):
                raise DataError(
                    f"{self.where(int(queries[0]))}: the {split} split has {len(queries)} queries and no "
                    "gallery item (is_gallery is false on every row)"
                )
            classes, counts = np.unique(self.labels[gallery], return_counts=True)
            per_class = dict(zip(classes.tolist(), counts.tolist(), strict=True))
            others = np.array(
                [per_class.get(label, 0) - int(both) for label, both in
                 zip(self.labels[queries], self.is_gallery[queries], strict=True)]
            )  # fmt: skip
            lonely = queries[others < 1]
            if len(lonely):
                i = int(lonely[0])
                raise DataError(
                    f"{self.where(i)}: query '{self.ids[i]}' of class '{self.labels[i]}' has no gallery item "
                    f"of its class in the {split} split ({len(lonely)} such queries)"
                )

    def missing_files(self) -> np.ndarray:
        """Indices of the rows whose image file does not exist."""
        return np.flatnonzero([not Path(p).is_file() for p in self.paths])

    def require_files(self) -> None:
        """``DataError`` naming the line of the first row whose image is missing (and how many are)."""
        missing = self.missing_files()
        if len(missing):
            i = int(missing[0])
            raise DataError(
                f"{self.where(i)} names a missing image '{self.paths[i]}' ({len(missing)} of {len(self)} "
                "listed images are missing)"
            )


def read_lines(path: Path, what: str) -> list[str]:
    """The lines of a list file; ``DataError`` ``"<what> not found: '<path>'"`` or naming why it cannot be
    read."""
    if not path.is_file():
        raise DataError(f"{what} not found: '{path}'")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {what} '{path}': {exc}") from exc


def list_rows(
    path: Path, lines: Sequence[str], fields: Sequence[str], header_line: int = 0
) -> list[tuple[int, list[str]]]:
    """``(1-based line, fields)`` of the rows of a whitespace-separated list (runs of spaces or tabs; blank
    lines skipped). ``header_line`` (1-based; 0: no header) must hold exactly ``fields``, and the rows
    follow it; lines before it are the caller's (In-shop's count). A header or a row that does not fit is a
    ``DataError`` naming the file and the line, with what was expected and what was found."""
    if header_line:
        got = lines[header_line - 1].strip() if len(lines) >= header_line else ""
        if tuple(got.split()) != tuple(fields):
            raise DataError(
                f"'{path}' line {header_line}: expected the header '{' '.join(fields)}', got '{got}'"
            )
    rows = []
    for n, line in enumerate(lines[header_line:], start=header_line + 1):
        values = line.split()
        if not values:
            continue
        if len(values) != len(fields):
            raise DataError(
                f"'{path}' line {n}: {len(fields)} fields expected ({' '.join(fields)}), got {len(values)}: "
                f"'{line.strip()}'"
            )
        rows.append((n, values))
    return rows


def image_sizes(paths: Sequence[str], max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """``(width, height)`` of every image from its header (threads), int64 ``n × 2``."""

    def size(path: str) -> tuple[int, int]:
        with images.open_image(path, max_pixels) as opened:
            return opened.width, opened.height

    with ThreadPoolExecutor(max_workers=16) as pool:
        found = list(pool.map(size, paths))
    return np.asarray(found, dtype=np.int64).reshape(-1, 2)


def box_fractions(table: ItemTable, max_pixels: int | None) -> np.ndarray | None:
    """The table's crop boxes as fractions of each image's size, clipped to the image (one warning counts
    the clipped boxes); a box that is empty after clipping raises ``DataError`` naming its line."""
    if table.boxes is None:
        return None
    boxes = table.boxes
    fractions = np.full(boxes.shape, np.nan, dtype=np.float64)
    rows = np.flatnonzero(~np.isnan(boxes).any(axis=1))
    if not len(rows):
        return fractions
    sizes = image_sizes([str(p) for p in table.paths[rows]], max_pixels).astype(np.float64)
    limits = np.concatenate([sizes, sizes], axis=1)  # width, height, width, height
    given = boxes[rows]
    clipped = np.clip(given, 0.0, limits)
    changed = int((np.abs(clipped - given) > 1e-9).any(axis=1).sum())
    empty = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
    if empty.any():
        i = int(rows[np.flatnonzero(empty)[0]])
        raise DataError(
            f"{table.where(i)}: crop box {boxes[i].tolist()} holds no pixel of the "
            f"{int(sizes[np.flatnonzero(empty)[0], 0])}×{int(sizes[np.flatnonzero(empty)[0], 1])} image "
            f"'{table.paths[i]}'"
        )
    if changed:
        warnings.warn(
            f"'{table.source}': {changed} of {len(rows)} crop boxes reach outside their image and were "
            "clipped to it",
            stacklevel=3,
        )
    fractions[rows] = clipped / limits
    return fractions


def _codes(values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    names, codes = np.unique(values, return_inverse=True)
    return codes.astype(np.int64), names.tolist()


def _annotations(table: ItemTable, split: str, rows: np.ndarray, boxes: np.ndarray | None) -> ItemAnnotations:
    """The annotations of one split's ``rows``: query/gallery flags only on an evaluation split and when
    some row is not both (every item both query and gallery, itself excluded, is leave-one-out), sequences
    coded per split; no categories on a split whose rows have none."""
    annotations = ItemAnnotations()
    if split != "train" and table.is_query is not None and table.is_gallery is not None:
        query, gallery = table.is_query[rows], table.is_gallery[rows]
        if not (query.all() and gallery.all()):
            annotations.is_query, annotations.is_gallery = query, gallery
    if table.categories is not None and (table.categories[rows] != "").any():
        codes, names = _codes(table.categories)
        annotations.categories, annotations.category_names = codes[rows], names
    if table.sequences is not None:
        values = table.sequences[rows]
        codes, _ = _codes(values)
        alone = values == ""
        # an item in no sequence gets a code of its own: it excludes nothing but itself
        codes[alone] = codes.max(initial=-1) + 1 + np.arange(int(alone.sum()))
        annotations.sequences = codes
    if boxes is not None:
        annotations.boxes = boxes[rows]
    return annotations


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


def table_splits(
    table: ItemTable,
    name: str,
    image_size: int,
    options: FileOptions,
    transform_args: dict[str, object] | None = None,
) -> DatasetSplits:
    """The :class:`DatasetSplits` of ``table``: every image checked first (``options``), crop boxes made
    fractions of their image (:func:`box_fractions`), queries checked (:meth:`ItemTable.check_queries`).

    Splits: ``train`` and ``test`` as listed; ``validation`` rows are the run's validation split when the
    table also has ``test`` rows, and its test split when it has none (an OML CSV: OML evaluates on its
    ``validation`` rows). Classes are coded per split in sorted order; a class left without images by
    ``skip_unreadable`` disappears with the warning that names its files. Images in both train and test are
    warned about (``options.overlap_check``). The pipelines are the ``photo`` ones unless ``transform_args``
    says otherwise.
    """
    if image_size <= 0:
        raise ConfigError(f"image_size must be positive, got {image_size}")
    if not len(table):
        raise DataError(f"'{table.source}' lists no images")
    if not (table.splits == "test").any():
        table = replace(table, splits=np.where(table.splits == "validation", "test", table.splits))
    table.check_queries()
    ok = options.verify(table.paths.tolist(), table.source)
    if not ok.all():
        emptied = sorted(set(table.labels.tolist()) - set(table.labels[ok].tolist()))
        if emptied:
            raise DataError(f"class '{emptied[0]}' of '{table.source}' holds no readable images")
        table = table.select(np.flatnonzero(ok))
    boxes = box_fractions(table, options.max_image_pixels)
    parts: dict[str, FileImageDataset] = {}
    for split in SPLITS:
        rows = table.split_rows(split)
        if not len(rows):
            continue
        codes, names = _codes(table.labels[rows])
        dataset = FileImageDataset(
            table.paths[rows].tolist(),
            codes,
            names,
            table.ids[rows].tolist(),
            channels=options.channels,
            skip_unreadable=options.skip_unreadable,
            max_pixels=options.max_image_pixels,
        )
        parts[split] = dataset.annotate(_annotations(table, split, rows, boxes))
    for split in ("train", "test"):
        if split not in parts:
            raise DataError(f"'{table.source}' lists no {split} images")
    splits = DatasetSplits.checked(
        parts["train"],
        parts["test"],
        image_size,
        options.channels,
        name,
        dict(transform_args or {"recipe": "photo"}),
        source=table.source,
        val=parts.get("validation"),
    )
    warn_overlap(parts["train"], parts["test"], options.overlap_check, table.source)
    return splits


__all__ = [
    "SPLITS",
    "FileOptions",
    "ItemTable",
    "box_fractions",
    "image_sizes",
    "list_rows",
    "read_lines",
    "table_splits",
    "warn_overlap",
]
