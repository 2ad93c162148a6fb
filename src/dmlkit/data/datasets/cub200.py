"""``cub200``: Caltech-UCSD Birds-200-2011 in the deep-metric-learning protocol (classes 1–100 train,
101–200 test, leave-one-out), read from the list files of the official ``CUB_200_2011.tgz``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dmlkit.data.base import dataset_root
from dmlkit.data.catalog import DatasetInfo, Download, register_file_dataset
from dmlkit.data.table import ItemTable, list_rows, read_lines
from dmlkit.errors import DataError

FOLDER = "CUB_200_2011"
#: The last class of the training split (classes 1..100 train, 101..200 test).
LAST_TRAIN_CLASS = 100
NUM_CLASSES = 200


def _rows(path: Path, what: str, names: tuple[str, ...]) -> list[tuple[int, list[str]]]:
    """(1-based line, fields) of every non-blank line of a whitespace-separated list without a header."""
    return list_rows(path, read_lines(path, what), names)


def _number(value: str, kind: type, what: str, where: str) -> int | float:
    try:
        return kind(value)
    except ValueError:
        kind_name = "an integer" if kind is int else "a number"
        raise DataError(f"{where}: {what} must be {kind_name}, got '{value}'") from None


def _by_id(path: Path, what: str, names: tuple[str, ...]) -> dict[int, tuple[int, list[str]]]:
    """Image id (the first field, an integer) → (line, the other fields); a repeated id is an error."""
    found: dict[int, tuple[int, list[str]]] = {}
    for n, fields in _rows(path, what, names):
        image_id = int(_number(fields[0], int, names[0], f"'{path}' line {n}"))
        if image_id in found:
            raise DataError(f"'{path}' line {n}: {names[0]} {image_id} already on line {found[image_id][0]}")
        found[image_id] = (n, fields[1:])
    return found


def _same_ids(first: dict, first_path: Path, second: dict, second_path: Path) -> None:
    """``DataError`` naming the line of the first id listed in one file and not in the other."""
    for listed, listed_path, other_path, other in (
        (first, first_path, second_path, second),
        (second, second_path, first_path, first),
    ):
        extra = [i for i in listed if i not in other]
        if extra:
            line = listed[extra[0]][0]
            raise DataError(
                f"'{listed_path}' line {line}: image id {extra[0]} is not in '{other_path}' "
                f"({len(extra)} such ids)"
            )


def _classes(
    images: dict[int, tuple[int, list[str]]],
    images_file: Path,
    labels: dict[int, tuple[int, list[str]]],
    labels_file: Path,
) -> tuple[list[str], list[str]]:
    """The class name (image folder) and split of every image, in the order of ``images``; a class id
    outside 1..200, or a folder holding two classes (or a class in two folders), is an error."""
    seen: dict[object, tuple[object, int]] = {}  # class id → (folder, line) and folder → (class id, line)
    names, splits = [], []
    for image_id, (line, (relative,)) in images.items():
        label_line, (value,) = labels[image_id]
        where = f"'{labels_file}' line {label_line}"
        class_id = int(_number(value, int, "class_id", where))
        if not 1 <= class_id <= NUM_CLASSES:
            raise DataError(f"{where}: class_id must be in 1..{NUM_CLASSES}, got {class_id}")
        name = relative.split("/")[0] if "/" in relative else str(class_id)
        for key, paired in ((class_id, name), (name, class_id)):
            known, first = seen.setdefault(key, (paired, line))
            if known != paired:
                raise DataError(
                    f"'{images_file}' line {line}: image of class {class_id} in folder '{name}', but line "
                    f"{first} pairs {'class' if key == class_id else 'folder'} '{key}' with '{known}'"
                )
        names.append(name)
        splits.append("train" if class_id <= LAST_TRAIN_CLASS else "test")
    return names, splits


def _boxes(folder: Path, images: dict[int, tuple[int, list[str]]], images_file: Path) -> np.ndarray:
    """``bounding_boxes.txt`` (``<image_id> <x> <y> <width> <height>``) as ``x1, y1, x2, y2`` rows in the
    order of ``images``."""
    path = folder / "bounding_boxes.txt"
    boxes = _by_id(path, "CUB-200-2011 bounding boxes", ("image_id", "x", "y", "width", "height"))
    _same_ids(images, images_file, boxes, path)
    rows = []
    for line, fields in boxes.values():
        x, y, w, h = (float(_number(v, float, "a box value", f"'{path}' line {line}")) for v in fields)
        if not (w > 0 and h > 0):
            raise DataError(f"'{path}' line {line}: box width and height must be positive, got {w} × {h}")
        rows.append((x, y, x + w, y + h))
    order = {image_id: i for i, image_id in enumerate(boxes)}
    return np.asarray(rows, dtype=np.float64)[[order[i] for i in images]]


def cub200_table(root: str | None = None, crop_boxes: bool = False) -> ItemTable:
    """CUB-200-2011: ``root`` holds ``CUB_200_2011/`` (or is that folder).

    Reads ``images.txt`` (``<image_id> <path>``, 1-based ids, paths relative to ``images/``) and
    ``image_class_labels.txt`` (``<image_id> <class_id>``); both must list the same ids. Classes 1–100 are
    the training split, 101–200 the test split (5,864 / 5,924 images), evaluated leave-one-out; the
    official ``train_test_split.txt`` (a classification split) is not used. A class is named by its image
    folder (``001.Black_footed_Albatross``); ids are the paths of ``images.txt``. ``crop_boxes`` crops
    every image to its box of ``bounding_boxes.txt`` (``<image_id> <x> <y> <width> <height>``, pixels).

    A missing list file, a malformed row, an id missing from one of the files or a class id outside 1–200
    raises ``DataError`` naming the file and the line; so does a listed image that does not exist.
    """
    base = dataset_root(root, "cub200", f"the folder holding {FOLDER}/ (or {FOLDER} itself)")
    folder = base / FOLDER if (base / FOLDER).is_dir() else base
    images_file, labels_file = folder / "images.txt", folder / "image_class_labels.txt"
    images = _by_id(images_file, "CUB-200-2011 image list", ("image_id", "path"))
    labels = _by_id(labels_file, "CUB-200-2011 class list", ("image_id", "class_id"))
    _same_ids(images, images_file, labels, labels_file)
    names, splits = _classes(images, images_file, labels, labels_file)
    relatives = [fields[0] for _, fields in images.values()]
    table = ItemTable(
        str(images_file),
        [str(folder / "images" / r) for r in relatives],
        names,
        splits,
        relatives,
        lines=[line for line, _ in images.values()],
        boxes=_boxes(folder, images, images_file) if crop_boxes else None,
    )
    return table


cub200 = register_file_dataset(
    DatasetInfo(
        name="cub200",
        title="Caltech-UCSD Birds-200-2011 (CUB)",
        protocol="classes 1–100 train, 101–200 test (zero-shot); leave-one-out",
        citation=(
            "C. Wah, S. Branson, P. Welinder, P. Perona, S. Belongie. The Caltech-UCSD Birds-200-2011 "
            "Dataset. Caltech Technical Report CNS-TR-2011-001, 2011."
        ),
        licence=(
            "no licence file is distributed; the authors ask users to cite the report (research use is the "
            "usual reading)"
        ),
        homepage="https://data.caltech.edu/records/65de6-vp158",
        layout=(
            "root/CUB_200_2011/{images.txt, image_class_labels.txt, bounding_boxes.txt, "
            "images/<NNN.Class_name>/<image>.jpg}"
        ),
        expected={"": {"train": (5864, 100), "test": (5924, 100)}},
        downloads=(
            Download(
                "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1",
                "CUB_200_2011.tgz",
                md5="97eceeb196236b17998738112f37df78",
                size=1150585339,
            ),
        ),
        manual=(
            "Download CUB_200_2011.tgz from https://data.caltech.edu/records/65de6-vp158 and extract it in "
            "root, giving root/CUB_200_2011/images.txt."
        ),
        table=cub200_table,
    )
)

__all__ = ["cub200", "cub200_table"]
