"""``vehicleid`` on a miniature VehicleID_V1.0 tree written in the official layout: ``image/<7-digit id>.jpg``
and ``train_test_split/*.txt`` rows ``<image id> <vehicle id>`` (no header, one space)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dmlkit import data
from dmlkit.cli import main
from dmlkit.data.catalog import CATALOG
from dmlkit.data.datasets.vehicleid import vehicleid_table
from dmlkit.errors import ConfigError, DataError

#: vehicle id → number of images; vehicle ids keep their zero padding as labels
TRAIN = {"0002": 4, "0005": 4, "0011": 4, "0013": 4}
SMALL = {"0020": 3, "0031": 3, "0042": 1}  # 0042: one image, gallery only in the re-id protocol
MEDIUM = {**SMALL, "0057": 2}
LARGE = {**MEDIUM, "0064": 2}


def _rows(vehicles: dict[str, int], start: int) -> list[tuple[str, str]]:
    rows = []
    for vehicle, count in vehicles.items():
        for _ in range(count):
            rows.append((f"{start:07d}", vehicle))
            start += 1
    return rows


def _write(path: Path, rows: list[tuple[str, str]]) -> None:
    path.write_text("".join(f"{image} {vehicle}\n" for image, vehicle in rows))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """``tmp/VehicleID_V1.0``: train 16 images of 4 vehicles; small 7 / 3, medium 9 / 4, large 11 / 5."""
    top = tmp_path / "VehicleID_V1.0"
    (top / "image").mkdir(parents=True)
    (top / "train_test_split").mkdir()
    train = _rows(TRAIN, 1)
    tests = _rows(LARGE, 100)  # the test lists share their first rows, as the released ones nest
    _write(top / "train_test_split" / "train_list.txt", train)
    _write(top / "train_test_split" / "test_list_800.txt", tests[:7])
    _write(top / "train_test_split" / "test_list_1600.txt", tests[:9])
    _write(top / "train_test_split" / "test_list_2400.txt", tests[:11])
    rng = np.random.default_rng(0)
    for image, vehicle in train + tests:
        pixels = np.full((10, 12, 3), int(vehicle) * 3, np.uint8) + rng.integers(0, 30, (10, 12, 3), np.uint8)
        Image.fromarray(pixels).save(top / "image" / f"{image}.jpg")
    return top


def _lists(root: Path) -> Path:
    return root / "train_test_split"


@pytest.mark.parametrize(("size", "vehicles"), [("small", SMALL), ("medium", MEDIUM), ("large", LARGE)])
def test_sizes_read_their_test_list(root: Path, size: str, vehicles: dict[str, int]) -> None:
    table = vehicleid_table(str(root), size=size)
    assert table.counts() == {"train": (16, 4), "test": (sum(vehicles.values()), len(vehicles))}
    test = table.split_rows("test")
    assert table.ids[test][0] == "image/0000100.jpg"
    assert table.paths[test][0] == str(root / "image" / "0000100.jpg")
    assert sorted(set(table.labels[test].tolist())) == sorted(vehicles)
    assert table.is_query is None and table.is_gallery is None  # metric protocol: leave-one-out


def test_labels_are_the_vehicle_ids_as_written(root: Path) -> None:
    table = vehicleid_table(str(root))
    train = table.split_rows("train")
    assert table.labels[train].tolist() == [v for v, n in TRAIN.items() for _ in range(n)]
    assert table.ids[train].tolist() == [f"image/{i:07d}.jpg" for i in range(1, 17)]


def test_root_may_be_the_parent_folder(root: Path) -> None:
    assert vehicleid_table(str(root.parent)).counts() == vehicleid_table(str(root)).counts()


def test_reid_protocol_draws_one_gallery_image_per_vehicle(root: Path) -> None:
    table = vehicleid_table(str(root), size="small", protocol="reid", gallery_seed=3)
    assert table.is_query is not None and table.is_gallery is not None
    train, test = table.split_rows("train"), table.split_rows("test")
    assert not table.is_query[train].any() and not table.is_gallery[train].any()
    assert (table.is_query[test] != table.is_gallery[test]).all()  # each test image is one or the other
    labels, gallery = table.labels[test], table.is_gallery[test]
    for vehicle, count in SMALL.items():
        mine = labels == vehicle
        assert gallery[mine].sum() == 1
        assert (~gallery[mine]).sum() == count - 1  # 0042 (one image): gallery, no query
    again = vehicleid_table(str(root), size="small", protocol="reid", gallery_seed=3)
    assert np.array_equal(again.is_gallery, table.is_gallery)
    draws = {tuple(vehicleid_table(str(root), protocol="reid", gallery_seed=s).is_gallery) for s in range(8)}
    assert len(draws) > 1  # the seed picks the gallery image


def test_build_gives_splits_and_flags(root: Path) -> None:
    splits = data.build("vehicleid", str(root), image_size=16)
    assert (len(splits.train), splits.train.num_classes) == (16, 4)
    assert (len(splits.test), splits.test.num_classes) == (7, 3)
    assert sorted(splits.test.class_names) == sorted(SMALL)
    assert splits.test.annotations.is_query is None  # leave-one-out
    reid = data.build("vehicleid", str(root), size="medium", protocol="reid", image_size=16).test
    assert len(reid) == 9
    assert reid.annotations.is_query is not None and reid.annotations.is_gallery is not None
    assert int(reid.annotations.is_gallery.sum()) == len(MEDIUM)
    assert int(reid.annotations.is_query.sum()) == 9 - len(MEDIUM)


def test_catalogued_with_the_released_counts() -> None:
    info = CATALOG.get("vehicleid")
    assert info.table is vehicleid_table and not info.downloads and "pkuml.org" in info.manual
    assert info.expected_counts({}) == {"train": (113_346, 13_164), "test": (6_493, 800)}
    assert info.expected_counts({"size": "large"})["test"] == (19_777, 2_400)
    assert info.expected_counts({"size": "medium"})["test"] == (13_377, 1_600)


def test_missing_list_file(root: Path) -> None:
    (_lists(root) / "test_list_1600.txt").unlink()
    with pytest.raises(DataError, match=r"list file not found: '.*test_list_1600\.txt'"):
        vehicleid_table(str(root), size="medium")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("0000003 0002 7", r"train_list\.txt' line 3: 2 fields expected .*got 3"),
        ("0000003", r"train_list\.txt' line 3: 2 fields expected .*got 1"),
        ("img3 0002", r"train_list\.txt' line 3: image id must be an integer, got 'img3'"),
        ("0000003 car2", r"train_list\.txt' line 3: vehicle id must be an integer, got 'car2'"),
    ],
)
def test_malformed_rows_name_file_and_line(root: Path, row: str, message: str) -> None:
    path = _lists(root) / "train_list.txt"
    lines = path.read_text().splitlines()
    lines[2] = row
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        vehicleid_table(str(root))


def test_missing_image_names_list_and_line(root: Path) -> None:
    (root / "image" / "0000101.jpg").unlink()
    with pytest.raises(DataError, match=r"test_list_800\.txt' line 2 names a missing image '.*0000101\.jpg'"):
        data.build("vehicleid", str(root), image_size=16)
    # the listing itself reads no image: `datasets check` lists every missing one
    table = vehicleid_table(str(root))
    assert table.where(int(table.missing_files()[0])).endswith("test_list_800.txt' line 2")


def test_bad_options(root: Path) -> None:
    with pytest.raises(ConfigError, match="size must be one of small, medium, large, got 'huge'"):
        vehicleid_table(str(root), size="huge")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="protocol must be one of metric, reid, got 'cmc'"):
        vehicleid_table(str(root), protocol="cmc")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="vehicleid"):
        vehicleid_table(None)


@pytest.mark.parametrize("protocol", ["metric", "reid"])
def test_trains_from_the_command_line(root: Path, tmp_path: Path, protocol: str) -> None:
    argv = [
        "train", "--dataset", "vehicleid", "--data-root", str(root), "--dataset-args", f"protocol={protocol}",
        "--epochs", "1", "--backbone", "small_cnn", "--embedding-size", "8", "--batch-size", "8",
        "--samples-per-class", "4", "--image-size", "16", "--val-fraction", "0", "--name", protocol,
        "--output-dir", str(tmp_path / "runs"), "--no-progress", "--device", "cpu",
        "--metrics", "recall@1,map@r", "--select-metric", "map@r",
    ]  # fmt: skip
    assert main(argv) == 0
    assert (tmp_path / "runs" / protocol / "best.pt").is_file()
