"""``inat2018``: iNaturalist 2018 (Van Horn et al., CVPR 2018) with the retrieval split of Smooth-AP
(Brown et al., ECCV 2020).

``root`` holds the Smooth-AP split files ``Inaturalist_train_set1.txt`` and ``Inaturalist_test_set1.txt``
(directly or in ``Inat_dataset_splits/``, where their zip puts them), the official annotation files
``train2018.json`` and ``val2018.json``, and the images ``train_val2018/<supercategory>/<category id>/*.jpg``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from dmlkit.data.base import dataset_root
from dmlkit.data.catalog import DatasetInfo, Download, register_file_dataset
from dmlkit.data.table import ItemTable
from dmlkit.errors import DataError

SPLIT_FOLDER = "Inat_dataset_splits"
SPLIT_FILES: dict[str, str] = {"train": "Inaturalist_train_set1.txt", "test": "Inaturalist_test_set1.txt"}
JSON_FILES: tuple[str, ...] = ("train2018.json", "val2018.json")


def _split_file(base: Path, name: str) -> Path:
    for candidate in (base / name, base / SPLIT_FOLDER / name):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"iNaturalist split file not found: '{base / SPLIT_FOLDER / name}' (nor '{base / name}'); it comes "
        "from the Smooth-AP split zip"
    )


def _entries(data: dict[str, Any], key: str, fields: tuple[str, ...], path: Path) -> list[dict[str, Any]]:
    """``data[key]``, a list of objects that each have ``fields``; ``DataError`` naming the json, the list
    and the entry (0-based, as in the file) otherwise."""
    entries = data.get(key)
    if not isinstance(entries, list):
        raise DataError(
            f"'{path}' has no list '{key}' (expected COCO-style 'images', 'annotations', 'categories')"
        )
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or any(f not in entry for f in fields):
            missing = [f for f in fields if not isinstance(entry, dict) or f not in entry]
            raise DataError(f"'{path}': {key}[{i}] has no field '{missing[0]}' (needs {', '.join(fields)})")
    return entries


def read_annotations(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """``(file_name → category id, category id → supercategory)`` of one COCO-style iNaturalist json
    (category ids as strings; a category without ``supercategory`` maps to "")."""
    if not path.is_file():
        raise DataError(f"iNaturalist annotation file not found: '{path}'")
    try:
        with path.open(encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read iNaturalist annotation file '{path}': {exc}") from exc
    if not isinstance(data, dict):
        raise DataError(f"'{path}' is not a COCO-style annotation file (a JSON object)")
    images = _entries(data, "images", ("id", "file_name"), path)
    annotations = _entries(data, "annotations", ("image_id", "category_id"), path)
    categories = _entries(data, "categories", ("id",), path)
    category_of = {a["image_id"]: str(a["category_id"]) for a in annotations}
    # an image without annotation stays unlabelled: an error only if a split file lists it
    names = {image["file_name"]: category_of[image["id"]] for image in images if image["id"] in category_of}
    supercategories = {str(c["id"]): str(c.get("supercategory", "")) for c in categories}
    return names, supercategories


def inat2018_table(root: str | None = None) -> ItemTable:
    """The Smooth-AP retrieval split of iNaturalist 2018: the images of ``Inaturalist_train_set1.txt`` are
    the train split (325,846 images, 5,690 species), those of ``Inaturalist_test_set1.txt`` the test split
    (136,093 images, 2,452 other species); leave-one-out.

    The split files list image paths (``train_val2018/<supercategory>/<category id>/<file>.jpg``, relative
    to ``root``) without labels: the label of each is its ``category_id`` in ``train2018.json`` or
    ``val2018.json`` (the split mixes the official train and val images), its category (super-label) the
    supercategory (e.g. ``Plantae``), or the path's second component when the json has none.

    A missing split or json file, a json without ``images`` / ``annotations`` (or an entry without its
    fields), a split-file path in neither json, or a listed image that does not exist raises ``DataError``
    naming the file (and the line).
    """
    base = dataset_root(
        root, "inat2018", "the folder holding the Smooth-AP split files, the jsons and train_val2018/"
    )
    split_files = {split: _split_file(base, name) for split, name in SPLIT_FILES.items()}
    category_of: dict[str, str] = {}
    supercategory_of: dict[str, str] = {}
    for name in JSON_FILES:
        images, supercategories = read_annotations(base / name)
        category_of.update(images)
        supercategory_of.update(supercategories)
    parts = [
        _read_split(path, split, base, category_of, supercategory_of) for split, path in split_files.items()
    ]
    # two split files: the rows keep no line (``where`` names the image); each file's own errors named lines
    return ItemTable.concatenate(parts, str(base))


def _read_split(
    path: Path, split: str, base: Path, category_of: dict[str, str], supercategory_of: dict[str, str]
) -> ItemTable:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read iNaturalist split file '{path}': {exc}") from exc
    rows = [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not rows:
        raise DataError(f"'{path}' lists no images")
    ids = [name for _, name in rows]
    labels = [category_of.get(name) for name in ids]
    if None in labels:
        i = labels.index(None)
        n, name = rows[i]
        raise DataError(
            f"'{path}' line {n}: image '{name}' is in neither {' nor '.join(JSON_FILES)} "
            f"(its label is unknown; {labels.count(None)} such lines)"
        )
    categories = [
        supercategory_of.get(label) or (parts[1] if len(parts := name.split("/")) > 2 else "")
        for name, label in zip(ids, labels, strict=True)
    ]
    table = ItemTable(
        str(path),
        [str(base / name) for name in ids],
        labels,
        np.full(len(ids), split),
        ids,
        lines=[n for n, _ in rows],
        categories=categories,
    )
    return table


_S3 = "https://ml-inat-competition-datasets.s3.amazonaws.com/2018"

inat2018 = register_file_dataset(
    DatasetInfo(
        name="inat2018",
        title="iNaturalist 2018 (Smooth-AP retrieval split)",
        protocol=(
            "Smooth-AP split: Inaturalist_train_set1.txt train (5,690 species), "
            "Inaturalist_test_set1.txt test (2,452 other species); labels from "
            "train2018.json/val2018.json; leave-one-out"
        ),
        citation=(
            "G. Van Horn, O. Mac Aodha, Y. Song, Y. Cui, C. Sun, A. Shepard, H. Adam, P. Perona, "
            'S. Belongie, "The iNaturalist Species Classification and Detection Dataset", CVPR 2018; '
            'split: A. Brown, W. Xie, V. Kalogeiton, A. Zisserman, "Smooth-AP: Smoothing the Path Towards '
            'Large-Scale Image Retrieval", ECCV 2020'
        ),
        licence=(
            "iNaturalist terms: non-commercial research and educational use only, no redistribution of the "
            "images; per-image licences in the json files"
        ),
        homepage="https://github.com/visipedia/inat_comp/tree/master/2018",
        layout=(
            "root: train_val2018/<supercategory>/<category id>/*.jpg, train2018.json, val2018.json, "
            f"{SPLIT_FOLDER}/Inaturalist_train_set1.txt and Inaturalist_test_set1.txt (or both in root)"
        ),
        expected={"": {"train": (325_846, 5_690), "test": (136_093, 2_452)}},
        downloads=(
            Download(
                f"{_S3}/train_val2018.tar.gz",
                "train_val2018.tar.gz",
                md5="b1c6952ce38f31868cc50ea72d066cc3",
                size=127_945_569_561,
            ),
            Download(
                f"{_S3}/train2018.json.tar.gz",
                "train2018.json.tar.gz",
                md5="bfa29d89d629cbf04d826a720c0a68b0",
                size=20_951_917,
            ),
            Download(
                f"{_S3}/val2018.json.tar.gz",
                "val2018.json.tar.gz",
                md5="f2ed8bfe3e9901cdefceb4e53cd3775d",
                size=1_276_686,
            ),
            Download(
                "https://drive.google.com/uc?id=1sXfkBTFDrRU3__-NUs1qBP3sf_0uMB98", "Inat_dataset_splits.zip"
            ),
        ),
        manual=(
            "The images (train_val2018.tar.gz, about 120 GB) and train2018.json / val2018.json come from "
            "the iNaturalist 2018 competition (https://github.com/visipedia/inat_comp/tree/master/2018); the "
            "split files from the Smooth-AP README (https://github.com/Andrew-Brown1/Smooth_AP, section "
            f"Data: a Google Drive zip holding {SPLIT_FOLDER}/). Unpack all into root"
        ),
        table=inat2018_table,
    )
)

__all__ = ["inat2018", "inat2018_table", "read_annotations"]
