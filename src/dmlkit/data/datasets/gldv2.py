"""``gldv2``: the training set of Google Landmarks v2 (Weyand et al., CVPR 2020), full or clean.

``root`` holds ``train.csv`` (``id,url,landmark_id``: one row per image) and/or ``train_clean.csv``
(``landmark_id,images``: one row per landmark, its image ids separated by spaces), and the images
``train/<a>/<b>/<c>/<id>.jpg`` with ``a``, ``b``, ``c`` the first three characters of the id (the layout of
the official ``images_NNN.tar`` files extracted into ``train/``; without a ``train/`` folder they are looked
for in ``root/<a>/<b>/<c>/`` itself).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

import numpy as np

from dmlkit.data.base import dataset_root
from dmlkit.data.catalog import DatasetInfo, Download, register_file_dataset
from dmlkit.data.table import ItemTable
from dmlkit.errors import DataError

#: The two layouts of the metadata files, by header.
PER_LANDMARK = ["landmark_id", "images"]
PER_IMAGE = ["id", "url", "landmark_id"]
#: An image id: letters and digits (GLDv2's are 16 hex digits), at least the three that name its folders.
IMAGE_ID = re.compile(r"[0-9A-Za-z]{3,}")
IMAGES_FOLDER = "train"


def _bad_landmark(path: Path, line: int, value: str) -> DataError:
    return DataError(f"'{path}' line {line}: landmark_id must be an integer, got '{value}'")


def _bad_image(path: Path, line: int, value: str) -> DataError:
    return DataError(f"'{path}' line {line}: image id must be 3 or more letters or digits, got '{value}'")


def _read_per_landmark(reader: Any, path: Path) -> tuple[list[str], list[str], list[int]]:
    """``train_clean.csv``: ``landmark_id,images`` rows, ``images`` space-separated ids."""
    ids: list[str] = []
    labels: list[str] = []
    lines: list[int] = []
    for row in reader:
        n = reader.line_num
        if not row:
            continue
        if len(row) != 2:
            raise DataError(f"'{path}' line {n}: expected 2 fields 'landmark_id,images', got {len(row)}")
        landmark, listed = row[0].strip(), row[1].split()
        if not landmark.isdigit():
            raise _bad_landmark(path, n, row[0])
        if not listed:
            raise DataError(f"'{path}' line {n}: landmark {landmark} lists no images")
        bad = next((image for image in listed if not IMAGE_ID.fullmatch(image)), None)
        if bad is not None:
            raise _bad_image(path, n, bad)
        ids += listed
        labels += [landmark] * len(listed)
        lines += [n] * len(listed)
    return ids, labels, lines


def _read_per_image(reader: Any, path: Path) -> tuple[list[str], list[str], list[int]]:
    """``train.csv``: ``id,url,landmark_id`` rows, one per image (the url is not used)."""
    ids: list[str] = []
    labels: list[str] = []
    lines: list[int] = []
    match = IMAGE_ID.fullmatch
    for row in reader:
        if len(row) != 3:
            if not row:
                continue
            raise DataError(
                f"'{path}' line {reader.line_num}: expected 3 fields 'id,url,landmark_id', got {len(row)}"
            )
        image, _, landmark = row
        if not landmark.isdigit():
            raise _bad_landmark(path, reader.line_num, landmark)
        if not match(image):
            raise _bad_image(path, reader.line_num, image)
        ids.append(image)
        labels.append(landmark)
        lines.append(reader.line_num)
    return ids, labels, lines


def read_metadata(path: Path) -> tuple[list[str], list[str], list[int]]:
    """``(image ids, landmark ids, lines)`` of a GLDv2 metadata CSV in either layout, decided by its
    header (:data:`PER_LANDMARK` or :data:`PER_IMAGE`)."""
    if not path.is_file():
        raise DataError(f"GLDv2 list file not found: '{path}'")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [column.strip() for column in next(reader, [])]
            if header == PER_LANDMARK:
                found = _read_per_landmark(reader, path)
            elif header == PER_IMAGE:
                found = _read_per_image(reader, path)
            else:
                raise DataError(
                    f"'{path}' line 1: expected the header '{','.join(PER_LANDMARK)}' (train_clean.csv) or "
                    f"'{','.join(PER_IMAGE)}' (train.csv), got '{','.join(header)}'"
                )
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read GLDv2 list file '{path}': {exc}") from exc
    if not found[0]:
        raise DataError(f"'{path}' lists no images")
    return found


def gldv2_table(
    root: str | None = None,
    clean: bool = True,
    test_classes: float | list[str] = 0.01,
    split_seed: int | None = 0,
) -> ItemTable:
    """The GLDv2 training images: ``train_clean.csv`` (``clean``, the default: 1,580,470 images of 81,313
    landmarks, the cleaned subset of Yokoo et al. 2020) or ``train.csv`` (4,132,914 images of 203,094
    landmarks); either file may be in either layout (``landmark_id,images`` or ``id,url,landmark_id``),
    decided by its header. Labels are the landmark ids.

    GLDv2 is a training set: its benchmarks (and revisited Oxford / Paris) are evaluated by ``dmlkit eval
    --gldv2`` / ``--revisited``. The test split here is only a convenience validation split: the landmarks
    picked by ``test_classes`` (a fraction, default 1%: random ones with ``split_seed``, the last ones in
    sorted order with ``split_seed`` none; or a list of landmark ids) are held out, zero-shot, leave-one-out.

    A missing CSV, a header that is neither layout, a malformed row (field count, a non-integer landmark id,
    an image id that is not 3+ letters or digits) or a listed image that does not exist raises ``DataError``
    naming the file and the line.
    """
    base = dataset_root(root, "gldv2", "the folder holding train_clean.csv or train.csv and train/")
    path = base / ("train_clean.csv" if clean else "train.csv")
    ids, labels, lines = read_metadata(path)
    folder = f"{IMAGES_FOLDER}/" if (base / IMAGES_FOLDER).is_dir() else ""
    relative = [f"{folder}{i[0]}/{i[1]}/{i[2]}/{i}.jpg" for i in ids]
    prefix = f"{base}/"
    table = ItemTable(
        str(path),
        [prefix + r for r in relative],
        labels,
        np.full(len(ids), "train"),
        relative,
        lines=lines,
    )
    return table.with_class_split(test_classes, split_seed)


_S3 = "https://s3.amazonaws.com/google-landmark"

gldv2 = register_file_dataset(
    DatasetInfo(
        name="gldv2",
        title="Google Landmarks v2 (training set)",
        protocol=(
            "a training set (train_clean.csv with clean, else train.csv); evaluate with "
            "`dmlkit eval --gldv2` or `--revisited`. The test split is a convenience validation split: "
            "test_classes (1%) of the landmarks held out, leave-one-out; expected counts are the whole "
            "file's"
        ),
        citation=(
            'T. Weyand, A. Araujo, B. Cao, J. Sim, "Google Landmarks Dataset v2 - A Large-Scale '
            'Benchmark for Instance-Level Recognition and Retrieval", CVPR 2020; clean subset: '
            'K. Yokoo et al., "Two-stage Discriminative Re-ranking for Large-scale Landmark Retrieval", '
            "CVPRW 2020 (arXiv 2003.11211)"
        ),
        licence=(
            "annotations CC BY 4.0 (Google); train images CC BY or more permissive, each image's licence in "
            "train_attribution.csv; no warranty on image licences"
        ),
        homepage="https://github.com/cvdfoundation/google-landmark",
        layout=(
            "root: train_clean.csv (landmark_id,images) and/or train.csv (id,url,landmark_id); images "
            "train/<a>/<b>/<c>/<id>.jpg (or <a>/<b>/<c>/<id>.jpg in root)"
        ),
        expected={"True": {"all": (1_580_470, 81_313)}, "False": {"all": (4_132_914, 203_094)}},
        variant_option="clean",
        downloads=(
            Download(f"{_S3}/metadata/train_clean.csv", "train_clean.csv", extract=False),
            Download(f"{_S3}/metadata/train.csv", "train.csv", extract=False),
            *(Download(f"{_S3}/train/images_{i:03d}.tar", f"images_{i:03d}.tar") for i in range(500)),
        ),
        manual=(
            "The 500 image archives (about 1 GB each, https://s3.amazonaws.com/google-landmark/train/"
            "images_000.tar ... images_499.tar; their md5s in md5sum/train/md5.images_NNN.txt) unpack to "
            "<a>/<b>/<c>/<id>.jpg: extract them into root/train/ (or root); the metadata CSVs go in root. "
            "See https://github.com/cvdfoundation/google-landmark (download-dataset.sh)"
        ),
        table=gldv2_table,
    )
)

__all__ = ["gldv2", "gldv2_table", "read_metadata"]
