"""``gldv2`` on a miniature Google Landmarks v2 training set in the official layout: ``train.csv``
(``id,url,landmark_id``, one row per image), ``train_clean.csv`` (``landmark_id,images``, ids separated by
spaces) and the images ``train/<a>/<b>/<c>/<id>.jpg``."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dmlkit import data
from dmlkit.cli import main
from dmlkit.data.catalog import CATALOG
from dmlkit.data.datasets.gldv2 import gldv2_table
from dmlkit.errors import ConfigError, DataError

#: landmark id → images in train.csv; the clean subset keeps the first CLEAN[landmark] of them
FULL = {"9": 4, "27": 5, "138": 4, "1045": 4, "20000": 4, "3": 3}
CLEAN = {"9": 4, "27": 4, "138": 4, "1045": 4, "20000": 4}


def image_id(landmark: str, j: int) -> str:
    return hashlib.md5(f"{landmark}/{j}".encode()).hexdigest()[:16]


def relative(image: str) -> str:
    return f"train/{image[0]}/{image[1]}/{image[2]}/{image}.jpg"


def write_tree(base: Path) -> Path:
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = ["id,url,landmark_id"]
    for landmark, count in FULL.items():
        for j in range(count):
            image = image_id(landmark, j)
            url = f"https://upload.wikimedia.org/{image}.jpg"
            # a url with a comma is quoted, as csv writes it
            rows.append(f'{image},"{url}?a=1,2",{landmark}' if j == 1 else f"{image},{url},{landmark}")
            path = base / relative(image)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (10, 12, 3), np.uint8)).save(path)
    (base / "train.csv").write_text("\n".join(rows) + "\n")
    clean = ["landmark_id,images"]
    clean += [f"{lm},{' '.join(image_id(lm, j) for j in range(n))}" for lm, n in CLEAN.items()]
    (base / "train_clean.csv").write_text("\n".join(clean) + "\n")
    return base


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return write_tree(tmp_path / "gldv2")


def _all_rows(table) -> list[tuple[str, str]]:
    return sorted(zip(table.ids.tolist(), table.labels.tolist(), strict=True))


def test_clean_list_one_row_per_landmark(root: Path) -> None:
    table = gldv2_table(str(root), test_classes=["27"])
    expected = [(relative(image_id(lm, j)), lm) for lm, n in CLEAN.items() for j in range(n)]
    assert list(zip(table.ids.tolist(), table.labels.tolist(), strict=True)) == expected
    assert table.paths[0] == str(root / relative(image_id("9", 0)))
    assert table.lines.tolist() == [2] * 4 + [3] * 4 + [4] * 4 + [5] * 4 + [6] * 4
    assert table.counts() == {"train": (16, 4), "test": (4, 1)}
    assert set(table.labels[table.split_rows("test")].tolist()) == {"27"}


def test_full_list_one_row_per_image(root: Path) -> None:
    table = gldv2_table(str(root), clean=False, test_classes=["3", "9"])
    expected = [(relative(image_id(lm, j)), lm) for lm, n in FULL.items() for j in range(n)]
    assert list(zip(table.ids.tolist(), table.labels.tolist(), strict=True)) == expected
    assert table.lines.tolist() == list(range(2, 2 + sum(FULL.values())))
    assert table.counts() == {"train": (17, 4), "test": (7, 2)}


def test_default_holds_out_one_percent_of_landmarks_at_least_one(root: Path) -> None:
    table = gldv2_table(str(root))
    test = set(table.labels[table.split_rows("test")].tolist())
    assert len(test) == 1 and test <= set(CLEAN)
    assert _all_rows(table) == sorted(
        (relative(image_id(lm, j)), lm) for lm, n in CLEAN.items() for j in range(n)
    )
    assert np.array_equal(gldv2_table(str(root)).splits, table.splits)  # split_seed 0: repeatable
    # split_seed none: the last landmarks in sorted (string) order
    last = gldv2_table(str(root), test_classes=0.4, split_seed=None)
    assert set(last.labels[last.split_rows("test")].tolist()) == {"9", "27"}  # sorted: 1045 138 20000 27 9


def test_either_layout_in_either_file(root: Path) -> None:
    (root / "train_clean.csv").write_text((root / "train.csv").read_text())
    assert gldv2_table(str(root), test_classes=["3"]).counts() == {"train": (21, 5), "test": (3, 1)}


def test_images_directly_in_root(tmp_path: Path) -> None:
    base = write_tree(tmp_path / "flat")
    for folder in list((base / "train").iterdir()):
        folder.rename(base / folder.name)
    (base / "train").rmdir()
    table = gldv2_table(str(base), test_classes=["27"])
    image = image_id("9", 0)
    assert table.ids[0] == f"{image[0]}/{image[1]}/{image[2]}/{image}.jpg"
    assert table.paths[0] == str(base / table.ids[0])


def test_build_gives_a_held_out_validation_split(root: Path) -> None:
    splits = data.build("gldv2", str(root), test_classes=["27", "1045"], image_size=16)
    assert (len(splits.train), splits.train.num_classes) == (12, 3)
    assert splits.train.class_names == ["138", "20000", "9"]
    assert (len(splits.test), splits.test.num_classes) == (8, 2)
    assert splits.test.ids[0] == relative(image_id("27", 0))
    assert splits.test.annotations.is_query is None


def test_catalogued() -> None:
    info = CATALOG.get("gldv2")
    assert info.table is gldv2_table
    assert info.expected_counts({}) == {"all": (1_580_470, 81_313)}
    assert info.expected_counts({"clean": False}) == {"all": (4_132_914, 203_094)}
    urls = [d.url for d in info.downloads]
    assert "https://s3.amazonaws.com/google-landmark/metadata/train_clean.csv" in urls
    assert urls[-1] == "https://s3.amazonaws.com/google-landmark/train/images_499.tar"


def test_missing_file(root: Path) -> None:
    (root / "train_clean.csv").unlink()
    with pytest.raises(DataError, match=r"list file not found: '.*train_clean\.csv'"):
        gldv2_table(str(root))
    with pytest.raises(ConfigError, match="gldv2"):
        gldv2_table(None)


def test_header_that_is_neither_layout(root: Path) -> None:
    path = root / "train.csv"
    path.write_text("image,landmark\n" + path.read_text().split("\n", 1)[1])
    with pytest.raises(
        DataError,
        match=r"train\.csv' line 1: expected the header 'landmark_id,images' .* or 'id,url,landmark_id' "
        r".*, got 'image,landmark'",
    ):
        gldv2_table(str(root), clean=False)


@pytest.mark.parametrize(
    ("clean", "line", "message"),
    [
        (True, "27", r"train_clean\.csv' line 4: expected 2 fields 'landmark_id,images', got 1"),
        (True, "x27,abcdef0123456789", r"clean\.csv' line 4: landmark_id must be an integer, got 'x27'"),
        (True, "27,abcdef0123456789 ab", r"train_clean\.csv' line 4: image id must be .*, got 'ab'"),
        (True, "27,", r"train_clean\.csv' line 4: landmark 27 lists no images"),
        (False, "abcdef0123456789,http://x/y.jpg", r"train\.csv' line 4: expected 3 fields .*, got 2"),
        (False, "abcdef0123456789,http://x/y.jpg,", r"train\.csv' line 4: landmark_id must be .*, got ''"),
        (False, "../../etc,http://x/y.jpg,27", r"train\.csv' line 4: image id must .*, got '\.\./\.\./etc'"),
    ],
)
def test_malformed_rows_name_file_and_line(root: Path, clean: bool, line: str, message: str) -> None:
    path = root / ("train_clean.csv" if clean else "train.csv")
    lines = path.read_text().splitlines()
    lines[3] = line
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        gldv2_table(str(root), clean=clean)


def test_missing_image_names_file_and_line(root: Path) -> None:
    (root / relative(image_id("138", 2))).unlink()  # train.csv: header, 9 ×4, 27 ×5, 138 (3rd): line 13
    with pytest.raises(DataError, match=r"train_clean\.csv' line 4 names a missing image '.*\.jpg'"):
        data.build("gldv2", str(root))
    with pytest.raises(DataError, match=r"train\.csv' line 13 names a missing image"):
        data.build("gldv2", str(root), clean=False)


def test_trains_from_the_command_line(root: Path, tmp_path: Path) -> None:
    argv = [
        "train", "--dataset", "gldv2", "--data-root", str(root), "--dataset-args", "test_classes=0.4",
        "--epochs", "1", "--backbone", "small_cnn", "--embedding-size", "8", "--batch-size", "8",
        "--samples-per-class", "4", "--image-size", "16", "--val-fraction", "0", "--name", "gld",
        "--output-dir", str(tmp_path / "runs"), "--no-progress", "--device", "cpu",
        "--metrics", "recall@1,map@r", "--select-metric", "map@r",
    ]  # fmt: skip
    assert main(argv) == 0
    assert (tmp_path / "runs" / "gld" / "best.pt").is_file()
