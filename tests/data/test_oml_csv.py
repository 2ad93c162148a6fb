"""The ``csv`` dataset in the open-metric-learning format: splits, query/gallery flags, categories, crop
boxes, sequences; item tables; errors naming the file and the line."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dmlkit import data
from dmlkit.data.base import LEAVE_ONE_OUT, QUERY_GALLERY, crop_to_box
from dmlkit.data.table import ItemTable, table_splits
from dmlkit.errors import ConfigError, DataError

#: The header OML writes (its column order: boxes as x_1, x_2, y_1, y_2).
OML_COLUMNS = [
    "label",
    "path",
    "split",
    "is_query",
    "is_gallery",
    "category",
    "x_1",
    "x_2",
    "y_1",
    "y_2",
    "sequence",
]


def _image(path: Path, size: tuple[int, int] = (20, 10), value: int = 0) -> None:
    """An image whose pixel (x, y) holds x in red and y in green (so a crop can be read back)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[..., 0] = np.arange(width)[None, :]
    pixels[..., 1] = np.arange(height)[:, None]
    pixels[..., 2] = value
    Image.fromarray(pixels).save(path)


def _write(path: Path, rows: list[dict[str, object]], columns: list[str] | None = None) -> Path:
    columns = columns or list(rows[0])
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})
    return path


@pytest.fixture
def oml(tmp_path: Path) -> Path:
    """An OML-style file: 3 train classes × 3, 2 validation classes (a query/gallery split), with a
    category per item, one crop box and one sequence."""
    rows: list[dict[str, object]] = []
    for c in range(3):
        for j in range(3):
            rows.append({"label": c, "path": f"img/train/{c}_{j}.png", "split": "train", "category": "tops"})
    flags = [(True, False), (False, True), (True, True), (False, True)]
    for c in (3, 4):
        for j, (query, gallery) in enumerate(flags):
            rows.append(
                {"label": c, "path": f"img/val/{c}_{j}.png", "split": "validation", "is_query": query,
                 "is_gallery": gallery, "category": "shoes" if c == 4 else "tops"}
            )  # fmt: skip
    rows[0] |= {"x_1": 2, "x_2": 12, "y_1": 1, "y_2": 9}
    rows[9]["sequence"] = "s1"
    rows[10]["sequence"] = "s1"
    for row in rows:
        _image(tmp_path / str(row["path"]), value=int(row["label"]))  # type: ignore[call-overload]
    return _write(tmp_path / "oml.csv", rows, OML_COLUMNS)


def test_a_file_written_for_oml_loads_unchanged(oml: Path) -> None:
    splits = data.build("csv", str(oml), image_size=8)
    assert (len(splits.train), len(splits.test), splits.val) == (9, 8, None)
    assert splits.train.class_names == ["0", "1", "2"] and splits.test.class_names == ["3", "4"]
    assert splits.train.annotations.protocol == LEAVE_ONE_OUT
    flags = splits.test.annotations
    assert flags.protocol == QUERY_GALLERY
    assert flags.is_query.tolist() == [True, False, True, False] * 2
    assert flags.is_gallery.tolist() == [False, True, True, True] * 2
    assert flags.category_names == ["shoes", "tops"] and flags.categories.tolist() == [1] * 4 + [0] * 4
    assert splits.train.item_categories.tolist() == [1] * 9
    # the sequence: items 0 and 1 of the test split share one code, the others each have their own
    sequences = flags.sequences.tolist()
    assert sequences[0] == sequences[1] and len(set(sequences)) == 7
    box = splits.train.annotations.boxes
    np.testing.assert_allclose(box[0], [2 / 20, 1 / 10, 12 / 20, 9 / 10])
    assert np.isnan(box[1:]).all()


def test_the_crop_box_is_applied_to_the_pixels(oml: Path) -> None:
    splits = data.build("csv", str(oml), image_size=8)
    train = splits.train
    train.transform = None
    image = train[0][0]  # floats in [0, 1]: red = x / 255, green = y / 255 of the stored image
    assert image.shape == (3, 8, 10)
    assert round(float(image[0, 0, 0]) * 255) == 2 and round(float(image[0, 0, -1]) * 255) == 11
    assert round(float(image[1, 0, 0]) * 255) == 1 and round(float(image[1, -1, 0]) * 255) == 8
    assert train[1][0].shape == (3, 10, 20)


def test_crop_to_box_rounds_outwards_and_keeps_a_pixel() -> None:
    image = torch.arange(2 * 10 * 20).reshape(2, 10, 20)
    assert crop_to_box(image, np.array([0.11, 0.15, 0.5, 0.55])).shape == (2, 5, 8)  # x 2..10, y 1..6
    assert crop_to_box(image, np.array([np.nan] * 4)) is image
    assert crop_to_box(image, np.array([0.999, 0.999, 0.999, 0.999])).shape == (2, 1, 1)


def test_boxes_outside_the_image_are_clipped_with_one_warning(tmp_path: Path) -> None:
    rows = []
    for c in range(4):
        for j in range(2):
            rows.append({"path": f"{c}_{j}.png", "label": c, "x_1": -5, "y_1": 0, "x_2": 30 + j, "y_2": 5})
            _image(tmp_path / f"{c}_{j}.png")
    table = _write(tmp_path / "boxes.csv", rows)
    with pytest.warns(UserWarning, match=r"8 of 8 crop boxes reach outside their image and were clipped"):
        splits = data.build("csv", str(table), image_size=8)
    np.testing.assert_allclose(splits.train.annotations.boxes[0], [0, 0, 1, 0.5])


def test_validation_rows_are_the_validation_split_when_test_rows_exist(oml: Path, tmp_path: Path) -> None:
    with oml.open() as handle:
        rows = list(csv.DictReader(handle))
    for row in rows[9:17]:
        row["split"] = "test"
    for row in rows[3:9]:  # two train classes become validation (leave-one-out: both flags true)
        row |= {"split": "validation", "is_query": "1", "is_gallery": "yes"}
    rows.append({**rows[0], "label": "5", "path": "img/train/0_1.png"})  # a second training class
    splits = data.build("csv", str(_write(tmp_path / "three.csv", rows)), image_size=8, overlap_check="none")
    assert splits.val is not None and splits.val.class_names == ["1", "2"]
    assert splits.val.annotations.protocol == LEAVE_ONE_OUT and len(splits.val) == 6
    assert splits.test.class_names == ["3", "4"] and splits.test.annotations.protocol == QUERY_GALLERY
    assert splits.train.class_names == ["0", "5"]


def test_without_a_split_column_the_classes_are_split_zero_shot(tmp_path: Path) -> None:
    rows = []
    for c in "abcd":
        for j in range(2):
            rows.append({"path": f"{c}{j}.png", "label": c})
            _image(tmp_path / f"{c}{j}.png")
    table = _write(tmp_path / "plain.csv", rows)
    splits = data.build("csv", str(table), image_size=8)
    assert splits.train.class_names == ["a", "b"] and splits.test.class_names == ["c", "d"]
    with pytest.raises(ConfigError, match=r"test_classes.*split column"):
        data.build(
            "csv", str(_write(tmp_path / "s.csv", [{**r, "split": "train"} for r in rows])), test_classes=0.5
        )


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"is_query": "maybe"}, r"oml\.csv' line 11: is_query must be True or False.*'maybe'"),
        ({"split": "holdout"}, r"oml\.csv' line 11: split 'holdout' is not one of train, validation, test"),
        ({"x_1": "3"}, r"oml\.csv' line 11: a crop box needs x_1, y_1, x_2 and y_2; y_1, x_2, y_2 empty"),
        ({"x_1": "a", "x_2": "4", "y_1": "1", "y_2": "2"}, r"line 11: x_1 must be a number, got 'a'"),
        ({"x_1": "5", "x_2": "4", "y_1": "1", "y_2": "2"}, r"line 11: crop box .* is empty"),
        ({"path": ""}, r"oml\.csv' line 11: empty 'path' or 'label'"),
    ],
)
def test_a_malformed_row_names_the_file_and_the_line(oml: Path, change: dict[str, str], match: str) -> None:
    with oml.open() as handle:
        rows = list(csv.DictReader(handle))
    rows[9] |= change  # line 11: the header is line 1
    _write(oml, rows, OML_COLUMNS)
    with pytest.raises(DataError, match=match):
        data.build("csv", str(oml))


def test_a_query_without_a_gallery_names_its_line(oml: Path, tmp_path: Path) -> None:
    with oml.open() as handle:
        rows = list(csv.DictReader(handle))
    for row in rows[13:17]:  # class 4: nobody in the gallery
        row["is_gallery"] = "False"
    _write(oml, rows, OML_COLUMNS)
    with pytest.raises(
        DataError, match=r"oml\.csv' line 15: query 'img/val/4_0\.png' of class '4' has no gallery"
    ):
        data.build("csv", str(oml))
    for row in rows[9:13]:
        row["is_gallery"] = "0"
    _write(oml, rows, OML_COLUMNS)
    with pytest.raises(DataError, match=r"line 11: the test split has 4 queries and no gallery item"):
        data.build("csv", str(oml))


def test_a_missing_image_names_the_line(oml: Path) -> None:
    (oml.parent / "img" / "val" / "3_2.png").unlink()
    table = data.catalog.CATALOG.get("csv").table
    assert table is not None
    with pytest.raises(DataError, match=r"oml\.csv' line 13 names a missing image '.*3_2\.png' \(1 of 17"):
        table(str(oml)).require_files()


def test_half_of_a_column_pair_is_an_error(tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    with pytest.raises(DataError, match="only one of the columns is_query and is_gallery"):
        data.build("csv", str(_write(tmp_path / "q.csv", [{"path": "a.png", "label": 1, "is_query": 1}])))
    with pytest.raises(DataError, match=r"crop box column\(s\) \['x_1'\] but not"):
        data.build("csv", str(_write(tmp_path / "b.csv", [{"path": "a.png", "label": 1, "x_1": 1}])))


def test_item_table_checks_its_columns_and_selects_rows(tmp_path: Path) -> None:
    paths = ["a", "b", "c"]
    table = ItemTable("list.txt", paths, ["x", "x", "y"], ["train", "test", "test"], paths, lines=[2, 3, 4])
    assert table.counts() == {"train": (1, 1), "test": (2, 2)}
    part = table.select(np.array([2, 0]))
    assert part.paths.tolist() == ["c", "a"] and part.lines.tolist() == [4, 2]
    assert table.where(1) == "'list.txt' line 3"
    with pytest.raises(DataError, match=r"'list\.txt': 2 labels for 3 items"):
        ItemTable("list.txt", ["a", "b", "c"], ["x", "y"], ["train"] * 3, ["a", "b", "c"])
    with pytest.raises(DataError, match="is_query and is_gallery go together"):
        ItemTable("list.txt", ["a"], ["x"], ["test"], ["a"], is_query=[True])
    with pytest.raises(DataError, match=r"'list\.txt' line 4: split 'dev' is not one of"):
        ItemTable(
            "list.txt", ["a", "b", "c"], ["x"] * 3, ["train", "test", "dev"], ["a", "b", "c"], lines=[2, 3, 4]
        )


def test_table_splits_keeps_annotations_through_subsets(oml: Path) -> None:
    table = data.catalog.CATALOG.get("csv").table
    assert table is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        splits = table_splits(table(str(oml)), "csv", 8, data.table.FileOptions())
    part = splits.test.subset([5, 0])
    assert part.annotations.is_query.tolist() == [False, True]
    assert part.annotations.categories.tolist() == [0, 1]
    assert part.annotations.sequences[1] == splits.test.annotations.sequences[0]


def test_folder_class_depth_two_names_classes_parent_slash_child(tmp_path: Path) -> None:
    for alphabet in ("A", "B"):
        for character in ("c1", "c2"):
            for j in range(2):
                _image(tmp_path / "tree" / alphabet / character / f"{j}.png")
    splits = data.build("folder", str(tmp_path / "tree"), class_depth=2, image_size=8)
    assert splits.train.class_names == ["A/c1", "A/c2"] and splits.test.class_names == ["B/c1", "B/c2"]
    with pytest.raises(ConfigError, match="class_depth must be at least 1"):
        data.build("folder", str(tmp_path / "tree"), class_depth=0)
