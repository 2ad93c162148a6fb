"""``inat2018`` on a miniature iNaturalist 2018 tree in the official layout: COCO-style ``train2018.json`` /
``val2018.json``, images ``train_val2018/<supercategory>/<category id>/<hash>.jpg``, and the Smooth-AP split
files (paths only, no label) in ``Inat_dataset_splits/``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dmlkit import data
from dmlkit.cli import main
from dmlkit.data.catalog import CATALOG
from dmlkit.data.datasets.inat2018 import inat2018_table
from dmlkit.errors import ConfigError, DataError

#: category id → (supercategory written in the json, or None: the category has no such field; the path's
#: folder; images)
TRAIN = {2001: ("Plantae", "Plantae", 4), 2002: ("Plantae", "Plantae", 4), 3005: ("Aves", "Aves", 4),
         3006: (None, "Fungi", 4)}  # fmt: skip
TEST = {4410: ("Insecta", "Insecta", 3), 4411: ("Insecta", "Insecta", 3), 5012: ("Aves", "Aves", 2)}


def _name(category: int, folder: str, j: int) -> str:
    digest = hashlib.md5(f"{category}-{j}".encode()).hexdigest()
    return f"train_val2018/{folder}/{category}/{digest}.jpg"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """Train 16 images / 4 species, test 8 / 3; every other image of each class is in val2018.json (the
    Smooth-AP split mixes the official train and val images); one json image is in no split file."""
    base = tmp_path / "inat"
    jsons: dict[str, dict] = {
        name: {"info": {}, "images": [], "annotations": [], "categories": [], "licenses": []}
        for name in ("train2018.json", "val2018.json")
    }
    splits: dict[str, list[str]] = {"train": [], "test": []}
    rng = np.random.default_rng(0)
    image_id = 0
    for split, classes in (("train", TRAIN), ("test", TEST)):
        for category, (supercategory, folder, count) in classes.items():
            for which in jsons.values():
                entry = {"id": category, "name": f"{category:05d}", "kingdom": "x"}
                if supercategory is not None:
                    entry["supercategory"] = supercategory
                which["categories"].append(entry)
            for j in range(count):
                name = _name(category, folder, j)
                which = jsons["val2018.json" if j % 2 else "train2018.json"]
                which["images"].append({"id": image_id, "file_name": name, "width": 12, "height": 10})
                which["annotations"].append({"id": image_id, "image_id": image_id, "category_id": category})
                image_id += 1
                splits[split].append(name)
                (base / name).parent.mkdir(parents=True, exist_ok=True)
                pixels = rng.integers(0, 256, (10, 12, 3), np.uint8)
                Image.fromarray(pixels).save(base / name)
    unlisted = _name(2001, "Plantae", 99)
    jsons["train2018.json"]["images"].append({"id": image_id, "file_name": unlisted})
    jsons["train2018.json"]["annotations"].append({"id": image_id, "image_id": image_id, "category_id": 2001})
    for name, content in jsons.items():
        (base / name).write_text(json.dumps(content))
    (base / "Inat_dataset_splits").mkdir()
    (base / "Inat_dataset_splits" / "Inaturalist_train_set1.txt").write_text(
        "\n".join(splits["train"]) + "\n"
    )
    (base / "Inat_dataset_splits" / "Inaturalist_test_set1.txt").write_text("\n".join(splits["test"]) + "\n")
    return base


def _split_file(root: Path, split: str) -> Path:
    return root / "Inat_dataset_splits" / f"Inaturalist_{split}_set1.txt"


def test_table_reads_labels_from_both_jsons(root: Path) -> None:
    table = inat2018_table(str(root))
    assert table.counts() == {"train": (16, 4), "test": (8, 3)}
    expected = [(str(c), folder) for c, (_, folder, n) in (TRAIN | TEST).items() for _ in range(n)]
    assert list(zip(table.labels.tolist(), table.categories.tolist(), strict=True)) == expected
    assert table.ids[0] == _name(2001, "Plantae", 0)
    assert table.paths[0] == str(root / _name(2001, "Plantae", 0))
    assert table.splits.tolist() == ["train"] * 16 + ["test"] * 8


def test_split_files_may_sit_in_root(root: Path) -> None:
    for split in ("train", "test"):
        _split_file(root, split).rename(root / _split_file(root, split).name)
    (root / "Inat_dataset_splits").rmdir()
    assert inat2018_table(str(root)).counts() == {"train": (16, 4), "test": (8, 3)}


def test_build_gives_splits_and_categories(root: Path) -> None:
    splits = data.build("inat2018", str(root), image_size=16)
    assert (len(splits.train), splits.train.num_classes) == (16, 4)
    assert (len(splits.test), splits.test.num_classes) == (8, 3)
    assert splits.train.class_names == ["2001", "2002", "3005", "3006"]
    assert splits.test.class_names == ["4410", "4411", "5012"]
    annotations = splits.train.annotations
    assert annotations.is_query is None  # leave-one-out
    names = [annotations.category_names[c] for c in annotations.categories]
    assert names == ["Plantae"] * 8 + ["Aves"] * 4 + ["Fungi"] * 4
    test = splits.test.annotations
    assert [test.category_names[c] for c in test.categories] == ["Insecta"] * 6 + ["Aves"] * 2


def test_catalogued() -> None:
    info = CATALOG.get("inat2018")
    assert info.table is inat2018_table
    assert info.expected_counts({}) == {"train": (325_846, 5_690), "test": (136_093, 2_452)}
    md5 = {d.filename: d.md5 for d in info.downloads}
    assert md5["train_val2018.tar.gz"] == "b1c6952ce38f31868cc50ea72d066cc3"
    assert md5["train2018.json.tar.gz"] == "bfa29d89d629cbf04d826a720c0a68b0"
    assert md5["val2018.json.tar.gz"] == "f2ed8bfe3e9901cdefceb4e53cd3775d"


def test_missing_files(root: Path) -> None:
    _split_file(root, "test").unlink()
    with pytest.raises(
        DataError, match=r"split file not found: '.*Inat_dataset_splits/Inaturalist_test_set1"
    ):
        inat2018_table(str(root))
    with pytest.raises(ConfigError, match="inat2018"):
        inat2018_table(None)


def test_missing_json(root: Path) -> None:
    (root / "val2018.json").unlink()
    with pytest.raises(DataError, match=r"annotation file not found: '.*val2018\.json'"):
        inat2018_table(str(root))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("annotations"), r"val2018\.json' has no list 'annotations'"),
        (lambda d: d["images"][1].pop("file_name"), r"val2018\.json': images\[1\] has no field 'file_name'"),
        (lambda d: d["annotations"][0].pop("category_id"), r"annotations\[0\] has no field 'category_id'"),
    ],
)
def test_json_without_its_fields(root: Path, edit, message: str) -> None:
    path = root / "val2018.json"
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))
    with pytest.raises(DataError, match=message):
        inat2018_table(str(root))


def test_unreadable_json(root: Path) -> None:
    (root / "train2018.json").write_text('{"images": [')
    with pytest.raises(DataError, match=r"cannot read iNaturalist annotation file '.*train2018\.json'"):
        inat2018_table(str(root))


def test_path_in_no_json_names_split_file_and_line(root: Path) -> None:
    path = _split_file(root, "test")
    lines = path.read_text().splitlines()
    lines[4] = "train_val2018/Aves/5012/not-annotated.jpg"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        DataError, match=r"Inaturalist_test_set1\.txt' line 5: image .*not-annotated\.jpg' is in neither"
    ):
        inat2018_table(str(root))


def test_missing_image_names_split_file_and_line(root: Path) -> None:
    (root / _name(3005, "Aves", 2)).unlink()
    with pytest.raises(DataError, match=r"Inaturalist_train_set1\.txt' line 11 names a missing image"):
        data.build("inat2018", str(root))


def test_trains_from_the_command_line(root: Path, tmp_path: Path) -> None:
    argv = [
        "train", "--dataset", "inat2018", "--data-root", str(root), "--epochs", "1",
        "--backbone", "small_cnn", "--embedding-size", "8", "--batch-size", "8", "--samples-per-class", "4",
        "--image-size", "16",
        "--val-fraction", "0", "--name", "inat", "--output-dir", str(tmp_path / "runs"), "--no-progress",
        "--device", "cpu", "--metrics", "recall@1,map@r", "--select-metric", "map@r",
    ]  # fmt: skip
    assert main(argv) == 0
    assert (tmp_path / "runs" / "inat" / "best.pt").is_file()
