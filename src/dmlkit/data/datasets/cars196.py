"""``cars196``: Stanford Cars in the deep-metric-learning protocol (classes 1–98 train, 99–196 test,
leave-one-out), read from the official ``cars_annos.mat`` and ``car_ims/``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dmlkit.data.base import dataset_root
from dmlkit.data.catalog import DatasetInfo, Download, register_file_dataset
from dmlkit.data.table import ItemTable
from dmlkit.errors import DataError

ANNOTATIONS = "cars_annos.mat"
#: The last class of the training split (classes 1..98 train, 99..196 test).
LAST_TRAIN_CLASS = 98
NUM_CLASSES = 196
BOX_FIELDS: tuple[str, ...] = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")


def _load(path: Path) -> dict[str, Any]:
    """The variables of a MATLAB file (scipy, imported here: only this dataset needs it)."""
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        return loadmat(str(path))
    except (OSError, ValueError, TypeError, NotImplementedError, MatReadError) as exc:
        raise DataError(f"cannot read '{path}' as a MATLAB file: {exc}") from exc


def _scalar(value: Any) -> Any:
    """The single value inside a MATLAB cell / struct field (``None`` when it is empty)."""
    flat = np.asarray(value).ravel()
    if flat.size == 0:
        return None
    item = flat[0]
    if isinstance(item, np.ndarray):
        return _scalar(item)
    return item.item() if isinstance(item, np.generic) else item  # a plain value, for messages


def _integer(value: Any, field: str, where: str) -> int:
    item = _scalar(value)
    try:
        number = float(item)
    except (TypeError, ValueError):
        raise DataError(f"{where}: {field} must be an integer, got {item!r}") from None
    if not number.is_integer():
        raise DataError(f"{where}: {field} must be an integer, got {item!r}")
    return int(number)


def _class_names(variables: dict[str, Any]) -> list[str] | None:
    """The 196 names of ``class_names`` (``None`` when absent, incomplete or not unique)."""
    if "class_names" not in variables:
        return None
    names = [str(_scalar(v)).strip() for v in np.asarray(variables["class_names"], dtype=object).ravel()]
    if len(names) < NUM_CLASSES or len(set(names)) != len(names) or "" in names:
        return None
    return names


def _box(entry: Any, where: str) -> list[float]:
    x1, y1, x2, y2 = (_integer(entry[f], f, where) for f in BOX_FIELDS)
    if not (x2 >= x1 and y2 >= y1):
        raise DataError(f"{where}: box bbox_x1, bbox_y1, bbox_x2, bbox_y2 = {x1}, {y1}, {x2}, {y2} is empty")
    return [x1 - 1.0, y1 - 1.0, float(x2), float(y2)]


def cars196_table(root: str | None = None, crop_boxes: bool = False) -> ItemTable:
    """Stanford Cars: ``root`` holds ``cars_annos.mat`` and ``car_ims/`` (``root`` may also be the .mat).

    Reads the struct array ``annotations`` of ``cars_annos.mat`` (fields ``relative_im_path``, relative to
    the folder of the .mat, and ``class``, 1-based) and the names of ``class_names`` (a class without one
    is named by its number). Classes 1–98 are the training split, 99–196 the test split (8,054 / 8,131
    images), evaluated leave-one-out; the ``test`` field (the classification split) is ignored. Ids are the
    ``relative_im_path`` values. ``crop_boxes`` crops every image to its ``bbox_x1 .. bbox_y2``: 1-based
    pixel coordinates, both ends included, read as the box ``x1 − 1, y1 − 1, x2, y2`` in 0-based pixel edges
    (the whole pixel range ``x1 .. x2``).

    A missing .mat, one without ``annotations`` or one of the fields, or a malformed entry raises
    ``DataError`` naming the file and the field or entry (``entry N``: the N-th annotation, 1-based); so
    does an entry naming an image that does not exist. Reading the .mat needs scipy.
    """
    base = dataset_root(root, "cars196", f"the folder holding {ANNOTATIONS} and car_ims/")
    mat = base if base.suffix.lower() == ".mat" else base / ANNOTATIONS
    if not mat.is_file():
        raise DataError(f"Cars196 annotations not found: '{mat}'")
    variables = _load(mat)
    if "annotations" not in variables:
        found = ", ".join(sorted(k for k in variables if not k.startswith("__"))) or "none"
        raise DataError(f"'{mat}' has no variable 'annotations' (variables: {found})")
    annotations = np.asarray(variables["annotations"]).ravel()
    fields = annotations.dtype.names or ()
    for field in ("relative_im_path", "class", *(BOX_FIELDS if crop_boxes else ())):
        if field not in fields:
            raise DataError(f"'{mat}': the annotations have no field '{field}' (fields: {', '.join(fields)})")
    if not len(annotations):
        raise DataError(f"'{mat}' lists no images")
    names = _class_names(variables)
    relatives, labels, splits, boxes = [], [], [], []
    for n, entry in enumerate(annotations, start=1):
        where = f"'{mat}' entry {n}"
        relative = _scalar(entry["relative_im_path"])
        if not isinstance(relative, str) or not relative.strip():
            raise DataError(f"{where}: relative_im_path must be a file path, got {relative!r}")
        class_id = _integer(entry["class"], "class", where)
        if not 1 <= class_id <= NUM_CLASSES:
            raise DataError(f"{where}: class must be in 1..{NUM_CLASSES}, got {class_id}")
        relatives.append(relative.strip())
        labels.append(names[class_id - 1] if names else str(class_id))
        splits.append("train" if class_id <= LAST_TRAIN_CLASS else "test")
        if crop_boxes:
            boxes.append(_box(entry, where))
    table = ItemTable(
        str(mat),
        [str(mat.parent / r) for r in relatives],
        labels,
        splits,
        relatives,
        lines=np.arange(1, len(relatives) + 1),
        unit="entry",
        boxes=boxes if crop_boxes else None,
    )
    return table


_FILES = "http://ai.stanford.edu/~jkrause/car196"

cars196 = register_file_dataset(
    DatasetInfo(
        name="cars196",
        title="Stanford Cars (Cars196)",
        protocol="classes 1–98 train, 99–196 test (zero-shot); leave-one-out",
        citation=(
            "J. Krause, M. Stark, J. Deng, L. Fei-Fei. 3D Object Representations for Fine-Grained "
            "Categorization. 4th IEEE Workshop on 3D Representation and Recognition (3dRR-13), ICCV 2013."
        ),
        licence=(
            "no licence file; distributed for non-commercial research and education under the ImageNet "
            "terms of access (https://image-net.org/download-faq)"
        ),
        homepage="https://ai.stanford.edu/~jkrause/cars/car_dataset.html",
        layout="root/{cars_annos.mat, car_ims/000001.jpg .. car_ims/016185.jpg}",
        expected={"": {"train": (8054, 98), "test": (8131, 98)}},
        downloads=(
            Download(f"{_FILES}/car_ims.tgz", "car_ims.tgz", md5="d5c8f0aa497503f355e17dc7886c3f14"),
            Download(
                f"{_FILES}/cars_annos.mat",
                ANNOTATIONS,
                md5="b407c6086d669747186bd1d764ff9dbc",
                extract=False,
            ),
        ),
        manual=(
            "The official host (ai.stanford.edu/~jkrause) has been offline since 2023. Find a copy of "
            "car_ims.tgz (md5 d5c8f0aa497503f355e17dc7886c3f14) and cars_annos.mat (md5 "
            "b407c6086d669747186bd1d764ff9dbc): Kaggle and Hugging Face host copies of Stanford Cars, "
            "some in other layouts (e.g. the class folders with anno_train.csv of Kaggle's "
            "jutrera/stanford-car-dataset-by-classes-folder, which pytorch-metric-learning reads), which are "
            "not these files. Place root/cars_annos.mat and extract car_ims.tgz in root "
            "(root/car_ims/000001.jpg ...)."
        ),
        table=cars196_table,
    )
)

__all__ = ["cars196", "cars196_table"]
