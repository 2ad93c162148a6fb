"""``cars196`` on a miniature Stanford Cars tree written here in the official layout: ``car_ims/NNNNNN.jpg``
and a real ``cars_annos.mat`` (scipy) whose ``annotations`` struct array has the official fields, 1-based
classes and 1-based inclusive boxes, and whose ``test`` flag (the classification split) is ignored."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dmlkit import data
from dmlkit.cli import main
from dmlkit.data.catalog import CATALOG
from dmlkit.data.datasets.cars196 import cars196_table
from dmlkit.errors import DataError
from tests_support import FAST_TRAIN

scipy_io = pytest.importorskip("scipy.io")

FIELDS = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")
TRAIN_CLASSES, TEST_CLASSES = (1, 2, 3, 98), (99, 100, 101, 196, 150)
PER_CLASS = 4
WIDTH, HEIGHT = 12, 10
NAMES = [f"Make{i} Model{i} Sedan 2012" for i in range(1, 197)]


def _entries() -> list[dict[str, object]]:
    entries = []
    for class_id in (*TRAIN_CLASSES, *TEST_CLASSES):
        for j in range(PER_CLASS):
            n = len(entries) + 1
            entries.append({"relative_im_path": f"car_ims/{n:06d}.jpg", "bbox_x1": 2, "bbox_y1": 1,
                            "bbox_x2": 9, "bbox_y2": 8, "class": class_id, "test": j % 2})  # fmt: skip
    return entries


def _write_mat(path: Path, entries: list[dict[str, object]], fields=FIELDS, variable="annotations",
               names: list[str] | None = NAMES) -> None:  # fmt: skip
    """``entries`` as a 1 × n MATLAB struct array, each field a cell as in the official file (strings as
    char arrays, numbers as 1 × 1 uint8 / uint16 matrices)."""
    array = np.zeros((1, len(entries)), dtype=[(f, "O") for f in fields])
    for i, entry in enumerate(entries):
        values = []
        for f in fields:
            value = entry[f]
            values.append(
                value if isinstance(value, str) else np.array([[value]], dtype=np.asarray(value).dtype)
            )
        array[0, i] = tuple(values)
    variables = {variable: array}
    if names is not None:
        cells = np.empty((1, len(names)), dtype=object)
        cells[0, :] = names
        variables["class_names"] = cells
    scipy_io.savemat(str(path), variables)


@pytest.fixture
def cars(tmp_path: Path) -> Path:
    root = tmp_path / "cars"
    (root / "car_ims").mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries = _entries()
    for entry in entries:
        pixels = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / str(entry["relative_im_path"]))
    _write_mat(root / "cars_annos.mat", entries)
    return root


def test_table_reads_the_mat_file(cars: Path) -> None:
    table = cars196_table(str(cars))
    assert len(table) == 36 and table.source == str(cars / "cars_annos.mat")
    # classes 1..98 train, 99..196 test, whatever the test flag says
    assert table.counts() == {"train": (16, 4), "test": (20, 5)}
    assert table.ids[0] == "car_ims/000001.jpg" and table.paths[0] == str(cars / "car_ims" / "000001.jpg")
    assert (table.labels[0], table.splits[0]) == ("Make1 Model1 Sedan 2012", "train")
    assert (table.labels[12], table.splits[12]) == ("Make98 Model98 Sedan 2012", "train")
    assert (table.labels[16], table.splits[16]) == ("Make99 Model99 Sedan 2012", "test")
    assert (table.ids[35], table.labels[35]) == ("car_ims/000036.jpg", "Make150 Model150 Sedan 2012")
    assert table.lines[35] == 36 and table.boxes is None


def test_labels_fall_back_to_class_numbers(cars: Path) -> None:
    _write_mat(cars / "cars_annos.mat", _entries(), names=None)
    table = cars196_table(str(cars))
    assert sorted(set(table.labels[table.splits == "train"].tolist())) == ["1", "2", "3", "98"]
    assert sorted(set(table.labels[table.splits == "test"].tolist())) == ["100", "101", "150", "196", "99"]


def test_root_may_be_the_mat_file(cars: Path) -> None:
    table = cars196_table(str(cars / "cars_annos.mat"))
    assert table.paths[0] == str(cars / "car_ims" / "000001.jpg")


def test_build_and_crop_boxes(cars: Path) -> None:
    splits = data.build("cars196", str(cars), image_size=16)
    assert splits.train.class_names == sorted(NAMES[c - 1] for c in TRAIN_CLASSES)
    assert splits.test.class_names == sorted(NAMES[c - 1] for c in TEST_CLASSES)
    assert (len(splits.train), len(splits.test)) == (16, 20)
    assert splits.test.annotations.is_query is None and splits.train.annotations.boxes is None
    assert splits.test[0][0].shape == (3, 16, 16)
    # bbox 2, 1, 9, 8 (1-based, inclusive) → pixel edges 1, 0, 9, 8
    np.testing.assert_array_equal(cars196_table(str(cars), crop_boxes=True).boxes[0], [1.0, 0.0, 9.0, 8.0])
    boxed = data.build("cars196", str(cars), image_size=16, crop_boxes=True)
    np.testing.assert_allclose(
        boxed.train.annotations.boxes[3], [1 / WIDTH, 0.0, 9 / WIDTH, 8 / HEIGHT], rtol=1e-6
    )


def test_catalog_entry() -> None:
    info = CATALOG.get("cars196")
    assert info.expected[""] == {"train": (8054, 98), "test": (8131, 98)}
    assert info.table is cars196_table and "Krause" in info.citation
    assert [d.filename for d in info.downloads] == ["car_ims.tgz", "cars_annos.mat"]
    assert "Kaggle" in info.manual


def test_missing_or_unreadable_mat(cars: Path) -> None:
    (cars / "cars_annos.mat").write_text("not a MATLAB file\n")
    with pytest.raises(DataError, match=r"cannot read '.*cars_annos\.mat' as a MATLAB file"):
        cars196_table(str(cars))
    (cars / "cars_annos.mat").unlink()
    with pytest.raises(DataError, match=r"annotations not found: '.*cars_annos\.mat'"):
        cars196_table(str(cars))


def test_mat_without_the_expected_fields(cars: Path) -> None:
    mat = cars / "cars_annos.mat"
    _write_mat(mat, _entries(), variable="annos")
    with pytest.raises(DataError, match=r"cars_annos\.mat' has no variable 'annotations' \(variables: annos"):
        cars196_table(str(cars))
    _write_mat(mat, _entries(), fields=tuple(f for f in FIELDS if f != "class"))
    with pytest.raises(DataError, match=r"cars_annos\.mat': the annotations have no field 'class'"):
        cars196_table(str(cars))
    _write_mat(mat, _entries(), fields=tuple(f for f in FIELDS if f != "bbox_y2"))
    assert len(cars196_table(str(cars))) == 36  # boxes are read only for crop_boxes
    with pytest.raises(DataError, match=r"cars_annos\.mat': the annotations have no field 'bbox_y2'"):
        cars196_table(str(cars), crop_boxes=True)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("class", 197, "class must be in 1..196, got 197"),
        ("class", 2.5, "class must be an integer, got 2.5"),
        ("class", "two", "class must be an integer, got 'two'"),
        ("relative_im_path", 7, "relative_im_path must be a file path, got 7"),
        ("bbox_x2", 1, "box bbox_x1, bbox_y1, bbox_x2, bbox_y2 = 2, 1, 1, 8 is empty"),
    ],
)
def test_bad_entry_names_file_and_entry(cars: Path, field: str, value: object, message: str) -> None:
    entries = _entries()
    entries[6][field] = value
    _write_mat(cars / "cars_annos.mat", entries)
    with pytest.raises(DataError, match=re.escape(f"cars_annos.mat' entry 7: {message}")):
        cars196_table(str(cars), crop_boxes=True)


def test_missing_image_names_the_entry(cars: Path) -> None:
    (cars / "car_ims" / "000009.jpg").unlink()
    with pytest.raises(
        DataError, match=r"cars_annos\.mat' entry 9 names a missing image '.*000009\.jpg' \(1 of 36"
    ):
        data.build("cars196", str(cars))


def test_train_from_the_command_line(cars: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    assert main(["train", "--dataset", "cars196", "--data-root", str(cars), "--output-dir", str(out),
                 "--name", "cars", "--dataset-args", '{"crop_boxes": true}', *FAST_TRAIN]) == 0  # fmt: skip
    assert (out / "cars" / "best.pt").is_file()
