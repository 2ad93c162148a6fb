"""``cub200`` on a miniature CUB_200_2011 tree written here in the official layout: 1-based ids,
single-space separated lists without header, class folders ``NNN.Name``, boxes as x, y, width, height."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dmlkit import data
from dmlkit.cli import main
from dmlkit.data.catalog import CATALOG
from dmlkit.data.datasets.cub200 import cub200_table
from dmlkit.errors import DataError
from tests_support import FAST_TRAIN, edit_line

TRAIN_CLASSES = {1: "001.Black_footed_Albatross", 2: "002.Laysan_Albatross", 3: "003.Sooty_Albatross",
                 4: "004.Groove_billed_Ani"}  # fmt: skip
TEST_CLASSES = {101: "101.White_Pelican", 102: "102.Western_Wood_Pewee", 103: "103.Sayornis",
                104: "104.American_Pipit", 105: "105.Whip_poor_Will"}  # fmt: skip
PER_CLASS = 4
WIDTH, HEIGHT = 12, 10


def _write(root: Path) -> Path:
    """root/CUB_200_2011 with 4 train classes and 5 test classes of 4 JPEGs each (36 images, ids 1..36)."""
    folder = root / "CUB_200_2011"
    rng = np.random.default_rng(0)
    images, labels, boxes = [], [], []
    image_id = 0
    for class_id, name in {**TRAIN_CLASSES, **TEST_CLASSES}.items():
        for j in range(PER_CLASS):
            image_id += 1
            relative = f"{name}/{name.split('.')[1]}_{j:04d}_{image_id}.jpg"
            path = folder / "images" / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(path)
            images.append(f"{image_id} {relative}")
            labels.append(f"{image_id} {class_id}")
            # x y width height; image 5's box reaches past the right edge (clipped with a warning)
            boxes.append(f"{image_id} 2.0 1.0 {'20.0' if image_id == 5 else '6.0'} 5.0")
    (folder / "images.txt").write_text("\n".join(images) + "\n")
    # the official file lists ids in order; reversed here, so the loader must join the files by id
    (folder / "image_class_labels.txt").write_text("\n".join(reversed(labels)) + "\n")
    (folder / "bounding_boxes.txt").write_text("\n".join(boxes) + "\n")
    return folder


@pytest.fixture
def cub(tmp_path: Path) -> Path:
    _write(tmp_path / "cub")
    return tmp_path / "cub"


def test_table_reads_the_official_lists(cub: Path) -> None:
    table = cub200_table(str(cub))
    assert len(table) == 36
    assert table.counts() == {"train": (16, 4), "test": (20, 5)}
    assert table.source == str(cub / "CUB_200_2011" / "images.txt")
    assert table.ids[0] == "001.Black_footed_Albatross/Black_footed_Albatross_0000_1.jpg"
    assert table.paths[0] == str(cub / "CUB_200_2011" / "images" / table.ids[0])
    assert table.labels[0] == "001.Black_footed_Albatross" and table.splits[0] == "train"
    # image 17 is the first of class 101 (4 train classes × 4 images before it), on line 17
    assert (table.labels[16], table.splits[16], table.lines[16]) == ("101.White_Pelican", "test", 17)
    assert sorted(set(table.labels[table.splits == "train"].tolist())) == sorted(TRAIN_CLASSES.values())
    assert sorted(set(table.labels[table.splits == "test"].tolist())) == sorted(TEST_CLASSES.values())
    assert table.boxes is None and table.is_query is None


def test_root_may_be_the_cub_folder_itself(cub: Path) -> None:
    table = cub200_table(str(cub / "CUB_200_2011"))
    assert len(table) == 36 and table.ids[0].startswith("001.Black_footed_Albatross/")


def test_build_gives_class_disjoint_splits(cub: Path) -> None:
    splits = data.build("cub200", str(cub), image_size=16)
    assert splits.name == "cub200"
    assert splits.train.class_names == sorted(TRAIN_CLASSES.values())
    assert splits.test.class_names == sorted(TEST_CLASSES.values())
    assert (len(splits.train), len(splits.test)) == (16, 20)
    assert splits.test.annotations.is_query is None  # leave-one-out
    image, label, index = splits.test[4]
    assert image.shape == (3, 16, 16) and (label, index) == (1, 4)
    assert splits.test.ids[4] == "102.Western_Wood_Pewee/Western_Wood_Pewee_0000_21.jpg"


def test_crop_boxes_from_bounding_boxes(cub: Path) -> None:
    table = cub200_table(str(cub), crop_boxes=True)
    # x, y, width, height = 2, 1, 6, 5 → x1, y1, x2, y2 = 2, 1, 8, 6
    np.testing.assert_array_equal(table.boxes[0], [2.0, 1.0, 8.0, 6.0])
    np.testing.assert_array_equal(table.boxes[4], [2.0, 1.0, 22.0, 6.0])
    with pytest.warns(UserWarning, match=r"1 of 36 crop boxes reach outside"):
        splits = data.build("cub200", str(cub), image_size=16, crop_boxes=True)
    boxes = splits.train.annotations.boxes
    np.testing.assert_allclose(boxes[0], [2 / WIDTH, 1 / HEIGHT, 8 / WIDTH, 6 / HEIGHT], rtol=1e-6)
    np.testing.assert_allclose(boxes[4], [2 / WIDTH, 1 / HEIGHT, 1.0, 6 / HEIGHT], rtol=1e-6)
    assert splits.train[0][0].shape == (3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert data.build("cub200", str(cub), image_size=16).train.annotations.boxes is None


def test_catalog_entry() -> None:
    info = CATALOG.get("cub200")
    assert info.expected[""] == {"train": (5864, 100), "test": (5924, 100)}
    assert info.table is cub200_table and "Wah" in info.citation
    assert info.downloads[0].filename == "CUB_200_2011.tgz"
    assert info.downloads[0].md5 == "97eceeb196236b17998738112f37df78"


def test_missing_list_files(cub: Path) -> None:
    folder = cub / "CUB_200_2011"
    (folder / "image_class_labels.txt").unlink()
    with pytest.raises(DataError, match=r"class list not found: '.*image_class_labels\.txt'"):
        cub200_table(str(cub))
    (folder / "images.txt").unlink()
    with pytest.raises(DataError, match=r"image list not found: '.*images\.txt'"):
        cub200_table(str(cub))
    _write(cub)
    (folder / "bounding_boxes.txt").unlink()
    with pytest.raises(DataError, match=r"bounding boxes not found: '.*bounding_boxes\.txt'"):
        cub200_table(str(cub), crop_boxes=True)
    assert len(cub200_table(str(cub))) == 36  # boxes are read only for crop_boxes


ALBATROSS = "001.Black_footed_Albatross"
IMAGES, LABELS = "images.txt", "image_class_labels.txt"


@pytest.mark.parametrize(
    ("name", "line", "text", "blamed", "message"),
    [
        (IMAGES, 3, f"3 {ALBATROSS}/a.jpg extra", (IMAGES, 3), "2 fields expected"),
        (IMAGES, 2, f"two {ALBATROSS}/b.jpg", (IMAGES, 2), "image_id must be an integer, got 'two'"),
        (IMAGES, 4, f"1 {ALBATROSS}/c.jpg", (IMAGES, 4), "image_id 1 already on line 1"),
        (IMAGES, 36, None, (LABELS, 1), "image id 36 is not in '.*images.txt'"),
        (LABELS, 1, None, (IMAGES, 36), "image id 36 is not in '.*image_class_labels.txt'"),
        (LABELS, 36, "1 201", (LABELS, 36), r"class_id must be in 1\.\.200, got 201"),
        (LABELS, 36, "1 x", (LABELS, 36), "class_id must be an integer, got 'x'"),
        (
            LABELS,
            36,
            "1 2",
            (IMAGES, 2),
            f"image of class 1 in folder '{ALBATROSS}', but line 1 pairs folder",
        ),
    ],
)
def test_bad_rows_name_file_and_line(
    cub: Path, name: str, line: int, text: str | None, blamed: tuple[str, int], message: str
) -> None:
    edit_line(cub / "CUB_200_2011" / name, line, text)
    with pytest.raises(DataError, match=rf"{re.escape(blamed[0])}' line {blamed[1]}: {message}"):
        cub200_table(str(cub))


def test_bad_box_rows(cub: Path) -> None:
    boxes = cub / "CUB_200_2011" / "bounding_boxes.txt"
    edit_line(boxes, 2, "2 1.0 1.0 wide 3.0")
    with pytest.raises(
        DataError, match=r"bounding_boxes\.txt' line 2: a box value must be a number, got 'wide'"
    ):
        cub200_table(str(cub), crop_boxes=True)
    edit_line(boxes, 2, "2 1.0 1.0 0.0 3.0")
    with pytest.raises(
        DataError, match=r"bounding_boxes\.txt' line 2: box width and height must be positive"
    ):
        cub200_table(str(cub), crop_boxes=True)
    edit_line(boxes, 2, None)
    with pytest.raises(DataError, match=r"images\.txt' line 2: image id 2 is not in '.*bounding_boxes"):
        cub200_table(str(cub), crop_boxes=True)


def test_missing_image_names_the_line(cub: Path) -> None:
    table = cub200_table(str(cub))
    Path(table.paths[6]).unlink()
    with pytest.raises(
        DataError, match=re.escape(f"images.txt' line 7 names a missing image '{table.paths[6]}'")
    ):
        data.build("cub200", str(cub))


def test_train_from_the_command_line(cub: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    assert main(["train", "--dataset", "cub200", "--data-root", str(cub), "--output-dir", str(out),
                 "--name", "cub", *FAST_TRAIN]) == 0  # fmt: skip
    assert (out / "cub" / "best.pt").is_file()
