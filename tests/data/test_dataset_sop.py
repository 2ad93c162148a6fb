"""``sop`` on a miniature Stanford_Online_Products tree written here in the official layout: the header
``image_id class_id super_class_id path``, single-space rows, 1-based ids, ``<super>_final/<id>_<n>.JPG``."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dmlkit import data
from dmlkit.cli import main
from dmlkit.data.catalog import CATALOG
from dmlkit.data.datasets.sop import sop_table
from dmlkit.errors import DataError
from tests_support import FAST_TRAIN, edit_line

HEADER = "image_id class_id super_class_id path"
SUPERS = {1: "bicycle_final", 2: "chair_final", 3: "mug_final"}
PER_CLASS = 4
#: class_id → super_class_id: train classes 1..6, test classes 7..12 (two per super-class in each)
CLASSES = {"train": {1: 1, 2: 1, 3: 2, 4: 2, 5: 3, 6: 3}, "test": {7: 1, 8: 1, 9: 2, 10: 2, 11: 3, 12: 3}}


def _write(root: Path) -> Path:
    folder = root / "Stanford_Online_Products"
    rng = np.random.default_rng(0)
    image_id = 0
    for split, classes in CLASSES.items():
        rows = [HEADER]
        for class_id, super_id in classes.items():
            product = 111085122870 + class_id
            for j in range(PER_CLASS):
                image_id += 1
                relative = f"{SUPERS[super_id]}/{product}_{j}.JPG"
                path = folder / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(path, format="JPEG")
                rows.append(f"{image_id} {class_id} {super_id} {relative}")
        (folder / f"Ebay_{split}.txt").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture
def sop(tmp_path: Path) -> Path:
    _write(tmp_path / "sop")
    return tmp_path / "sop"


def test_table_reads_both_lists(sop: Path) -> None:
    table = sop_table(str(sop))
    folder = sop / "Stanford_Online_Products"
    assert len(table) == 48 and table.counts() == {"train": (24, 6), "test": (24, 6)}
    assert table.ids[0] == "bicycle_final/111085122871_0.JPG"
    assert table.paths[0] == str(folder / "bicycle_final" / "111085122871_0.JPG")
    assert (table.labels[0], table.splits[0], table.categories[0]) == ("1", "train", "bicycle_final")
    assert (table.labels[24], table.splits[24], table.categories[24]) == ("7", "test", "bicycle_final")
    assert (table.ids[47], table.labels[47], table.categories[47]) == (
        "mug_final/111085122882_3.JPG",
        "12",
        "mug_final",
    )
    assert table.is_query is None and table.boxes is None
    assert table.where(24) == f"'{folder / 'Ebay_test.txt'}' line 2"  # each row keeps its list and line


def test_root_may_be_the_sop_folder(sop: Path) -> None:
    assert len(sop_table(str(sop / "Stanford_Online_Products"))) == 48


def test_build_with_super_classes(sop: Path) -> None:
    splits = data.build("sop", str(sop), image_size=16)
    assert splits.train.class_names == ["1", "2", "3", "4", "5", "6"]
    assert splits.test.class_names == ["10", "11", "12", "7", "8", "9"]  # sorted as names
    assert (len(splits.train), len(splits.test)) == (24, 24)
    annotations = splits.test.annotations
    assert annotations.is_query is None  # leave-one-out
    assert annotations.category_names == ["bicycle_final", "chair_final", "mug_final"]
    np.testing.assert_array_equal(annotations.categories, np.repeat([0, 0, 1, 1, 2, 2], PER_CLASS))
    assert splits.test[0][0].shape == (3, 16, 16)


def test_catalog_entry() -> None:
    info = CATALOG.get("sop")
    assert info.expected[""] == {"train": (59551, 11318), "test": (60502, 11316)}
    assert info.table is sop_table and "Song" in info.citation
    assert info.downloads[0].md5 == "7f73d41a2f44250d4779881525aea32e"


def test_missing_list(sop: Path) -> None:
    (sop / "Stanford_Online_Products" / "Ebay_test.txt").unlink()
    with pytest.raises(DataError, match=r"Stanford Online Products list not found: '.*Ebay_test\.txt'"):
        sop_table(str(sop))


TRAIN, TEST = "Ebay_train.txt", "Ebay_test.txt"


@pytest.mark.parametrize(
    ("name", "line", "text", "blamed", "message"),
    [
        (TRAIN, 1, "image_id class_id path", (TRAIN, 1),
         f"expected the header '{HEADER}', got 'image_id class_id path'"),
        (TEST, 1, None, (TEST, 1), "expected the header"),
        (TRAIN, 3, "2 1 1", (TRAIN, 3), "4 fields expected"),
        (TEST, 5, "28 x 1 bicycle_final/1_0.JPG", (TEST, 5), "class_id must be an integer, got 'x'"),
        (TEST, 2, "25 3 2 chair_final/1_0.JPG", (TEST, 2), "class_id 3 is also in the train split"),
        (TEST, 2, "25 7 2 bicycle_final/1_0.JPG", (TEST, 2),
         f"super_class_id 2 with folder 'bicycle_final', but '.*{TRAIN}' line 10 pairs super_class_id '2'"),
    ],
)  # fmt: skip
def test_bad_rows_name_file_and_line(
    sop: Path, name: str, line: int, text: str | None, blamed: tuple[str, int], message: str
) -> None:
    edit_line(sop / "Stanford_Online_Products" / name, line, text)
    with pytest.raises(DataError, match=rf"{re.escape(blamed[0])}' line {blamed[1]}: {message}"):
        sop_table(str(sop))


def test_missing_image_names_the_line(sop: Path) -> None:
    (
        sop / "Stanford_Online_Products" / "chair_final" / "111085122880_1.JPG"
    ).unlink()  # class 10, test line 15
    with pytest.raises(
        DataError, match=r"Ebay_test\.txt' line 15 names a missing image '.*111085122880_1\.JPG'"
    ):
        data.build("sop", str(sop))


def test_train_from_the_command_line_with_the_hierarchical_sampler(sop: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    sampler = ["--sampler", "hierarchical", "--sampler-args", '{"super_classes_per_batch": 2}']
    assert main(["train", "--dataset", "sop", "--data-root", str(sop), "--output-dir", str(out),
                 "--name", "sop", *sampler, *FAST_TRAIN]) == 0  # fmt: skip
    assert (out / "sop" / "best.pt").is_file()
