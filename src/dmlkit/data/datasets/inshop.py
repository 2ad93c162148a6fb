"""``inshop``: DeepFashion In-shop Clothes Retrieval (the official ``list_eval_partition.txt``: train items,
then query images searched against gallery images of other items; the query/gallery protocol)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dmlkit.data.base import dataset_root
from dmlkit.data.catalog import DatasetInfo, register_file_dataset
from dmlkit.data.table import ItemTable, list_rows, read_lines
from dmlkit.errors import DataError

PARTITION = Path("Eval") / "list_eval_partition.txt"
BOXES = Path("Anno") / "list_bbox_inshop.txt"
PARTITION_HEADER: tuple[str, ...] = ("image_name", "item_id", "evaluation_status")
BOX_HEADER: tuple[str, ...] = ("image_name", "clothes_type", "pose_type", "x_1", "y_1", "x_2", "y_2")
STATUSES: tuple[str, ...] = ("train", "query", "gallery")


def _read(path: Path, what: str, header: tuple[str, ...]) -> list[tuple[int, list[str]]]:
    """(1-based line, fields) of the rows of a DeepFashion list: line 1 the number of rows, line 2 the
    header, then rows whose fields are separated by runs of spaces or tabs."""
    lines = read_lines(path, what)
    count = lines[0].strip() if lines else ""
    if not count.isdigit():
        raise DataError(f"'{path}' line 1: expected the number of images, got '{count}'")
    rows = list_rows(path, lines, header, header_line=2)
    if int(count) != len(rows):
        raise DataError(f"'{path}' line 1 announces {int(count)} images, but the file lists {len(rows)}")
    return rows


def _boxes(root: Path, names: list[str], lines: list[int], partition: Path) -> np.ndarray:
    """The boxes of ``Anno/list_bbox_inshop.txt`` (``x_1 y_1 x_2 y_2``, pixels) of the images ``names``."""
    path = root / BOXES
    found: dict[str, tuple[float, ...]] = {}
    for n, fields in _read(path, "In-shop bounding boxes", BOX_HEADER):
        try:
            box = tuple(float(v) for v in fields[3:])
        except ValueError:
            raise DataError(f"'{path}' line {n}: x_1 y_1 x_2 y_2 must be numbers, got {fields[3:]}") from None
        if not (box[2] > box[0] and box[3] > box[1]):
            raise DataError(f"'{path}' line {n}: box x_1, y_1, x_2, y_2 = {list(box)} is empty")
        found[fields[0]] = box
    missing = [i for i, name in enumerate(names) if name not in found]
    if missing:
        i = missing[0]
        raise DataError(
            f"'{partition}' line {lines[i]}: image '{names[i]}' has no box in '{path}' ({len(missing)} such "
            "images)"
        )
    return np.asarray([found[name] for name in names], dtype=np.float64)


def inshop_table(root: str | None = None, crop_boxes: bool = False) -> ItemTable:
    """DeepFashion In-shop Clothes Retrieval: ``root`` holds ``Eval/list_eval_partition.txt`` and the images
    it names (``img/WOMEN/Dresses/id_00000002/02_1_front.jpg``, from ``img.zip``) in ``root`` itself or
    in ``root/Img``.

    The list's line 1 is the number of images and line 2 the header ``image_name item_id
    evaluation_status``; its rows are separated by runs of spaces. Labels are the item ids. The ``train``
    rows are the training split (25,882 images of 3,997 items); the ``query`` (14,218) and ``gallery``
    (12,612) rows form the test split (3,985 other items), evaluated query/gallery: each query image is
    searched against the gallery images. ``crop_boxes`` crops every image to its box in
    ``Anno/list_bbox_inshop.txt`` (``x_1 y_1 x_2 y_2`` in pixels of the 256 × 256 ``img.zip`` images).

    A missing list, a count line that does not match the rows, a header that is not the one above, a
    malformed row or an unknown status raises ``DataError`` naming the file and the line; so does a listed
    image that does not exist.
    """
    base = dataset_root(root, "inshop", "the folder holding Eval/list_eval_partition.txt and img/")
    partition = base / PARTITION
    rows = _read(partition, "In-shop evaluation partition", PARTITION_HEADER)
    for n, (_, _, status) in rows:
        if status not in STATUSES:
            known = ", ".join(STATUSES)
            raise DataError(
                f"'{partition}' line {n}: evaluation_status must be one of {known}, got '{status}'"
            )
    names = [fields[0] for _, fields in rows]
    images = base / "Img" if not (base / names[0]).is_file() and (base / "Img" / names[0]).is_file() else base
    statuses = np.asarray([fields[2] for _, fields in rows])
    lines = [n for n, _ in rows]
    table = ItemTable(
        str(partition),
        [str(images / name) for name in names],
        [fields[1] for _, fields in rows],
        np.where(statuses == "train", "train", "test"),
        names,
        lines=lines,
        # training rows are both query and gallery: leave-one-out, as for any training split
        is_query=statuses != "gallery",
        is_gallery=statuses != "query",
        boxes=_boxes(base, names, lines, partition) if crop_boxes else None,
    )
    return table


inshop = register_file_dataset(
    DatasetInfo(
        name="inshop",
        title="DeepFashion In-shop Clothes Retrieval",
        protocol=(
            "train 25,882 images; test: 14,218 query vs 12,612 gallery images of other items (zero-shot); "
            "query/gallery"
        ),
        citation=(
            "Z. Liu, P. Luo, S. Qiu, X. Wang, X. Tang. DeepFashion: Powering Robust Clothes Recognition and "
            "Retrieval with Rich Annotations. CVPR 2016."
        ),
        licence=(
            "the images are not owned by the authors; use is restricted to non-commercial research and "
            "education (DeepFashion agreement)"
        ),
        homepage="https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html",
        layout="root/{Eval/list_eval_partition.txt, img/<gender>/<category>/<item id>/<image>.jpg, "
        "Anno/list_bbox_inshop.txt (crop_boxes only)}",
        expected={"": {"train": (25882, 3997), "test": (26830, 3985)}},
        manual=(
            "The files are on Google Drive (linked from the homepage) and img.zip is password protected: "
            "fill in the DeepFashion agreement / write to the authors for the password. Download "
            "Eval/list_eval_partition.txt and Img/img.zip (the 256 × 256 images, not img_highres.zip), "
            "extract img.zip in root (root/img/...) or in root/Img, and, for crop_boxes, "
            "Anno/list_bbox_inshop.txt."
        ),
        table=inshop_table,
    )
)

__all__ = ["inshop", "inshop_table"]
