from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dmlkit import data
from dmlkit.errors import ConfigError, DataError, UnknownNameError

CLOTHING = Path(__file__).resolve().parents[3] / "shared" / "data" / "clothing"


def _image(path: Path, value: int, size: tuple[int, int] = (20, 14)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """root/<class>/<images>: four classes, one with a nested sub-folder, plus files to be ignored."""
    root = tmp_path / "tree"
    for c, name in enumerate(["delta", "alpha", "charlie", "bravo"]):
        for j in range(3):
            _image(root / name / f"{j}.png", 40 * c + j)
    _image(root / "alpha" / "more" / "3.jpg", 9)
    (root / "alpha" / "notes.txt").write_text("not an image")
    _image(root / ".hidden" / "x.png", 0)
    return root


def test_folder_layout_and_split(tree: Path) -> None:
    splits = data.build("folder", str(tree), image_size=16)
    assert splits.train.class_names == ["alpha", "bravo"] and splits.test.class_names == ["charlie", "delta"]
    assert (len(splits.train), len(splits.test), splits.channels, splits.name) == (7, 6, 3, "folder")
    assert splits.train.ids[:4] == ["alpha/0.png", "alpha/1.png", "alpha/2.png", "alpha/more/3.jpg"]
    np.testing.assert_array_equal(splits.train.labels, [0, 0, 0, 0, 1, 1, 1])
    image, label, index = splits.test[4]
    assert image.shape == (3, 16, 16) and (label, index) == (1, 4)
    # eval pipeline on a constant image: ((value / 255) - mean) / std per channel
    expected = 1 / 255  # delta/1.png, written with value 40 × 0 + 1
    means, stds = data.transforms.IMAGENET_MEAN, data.transforms.IMAGENET_STD
    torch.testing.assert_close(
        image[:, 8, 8], torch.tensor([(expected - m) / s for m, s in zip(means, stds, strict=True)])
    )


def test_folder_options(tree: Path) -> None:
    splits = data.build("folder", str(tree), test_classes=["alpha", "delta"], channels=1, image_size=8)
    assert splits.train.class_names == ["bravo", "charlie"] and splits.test.class_names == ["alpha", "delta"]
    assert splits.test[0][0].shape == (1, 8, 8)
    flat = data.build("folder", str(tree), recursive=False)
    assert "alpha/more/3.jpg" not in flat.train.ids and len(flat.train) == 6
    seeded = data.build("folder", str(tree), split_seed=0)
    assert sorted(seeded.train.class_names + seeded.test.class_names) == [
        "alpha",
        "bravo",
        "charlie",
        "delta",
    ]
    with pytest.raises(ConfigError, match="echo"):
        data.build("folder", str(tree), test_classes=["echo"])
    with pytest.raises(UnknownNameError, match="test_classes"):
        data.build("folder", str(tree), test_clases=0.5)


def test_folder_errors_name_the_path(tmp_path: Path, tree: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="nowhere"):
        data.build("folder", str(missing))
    with pytest.raises(ConfigError, match="root"):
        data.build("folder")
    (tree / "echo").mkdir()
    (tree / "echo" / "readme.md").write_text("x")
    with pytest.raises(DataError, match=r"echo.*no images"):
        data.build("folder", str(tree))


def test_fewer_than_two_classes_in_a_split(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        _image(tmp_path / "r" / name / "0.png", 1)
    with pytest.raises(DataError, match=r"train split.*1 class"):
        data.build("folder", str(tmp_path / "r"), test_classes=0.5)


def test_unreadable_images_raise_or_are_skipped(tree: Path) -> None:
    broken = tree / "bravo" / "broken.jpg"
    broken.write_bytes(b"definitely not a jpeg")
    with pytest.raises(DataError, match=r"broken\.jpg"):
        data.build("folder", str(tree))
    with pytest.warns(UserWarning, match="skipped 1 "):
        splits = data.build("folder", str(tree), skip_unreadable=True)
    assert "bravo/broken.jpg" not in splits.train.ids and len(splits.train) == 7


def test_a_class_left_without_readable_images_is_an_error(tree: Path) -> None:
    for path in (tree / "bravo").iterdir():
        path.write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(DataError, match="bravo"):
        data.build("folder", str(tree), skip_unreadable=True)


def test_image_that_breaks_after_build_names_its_file(tree: Path) -> None:
    splits = data.build("folder", str(tree))
    (tree / "alpha" / "0.png").write_bytes(b"gone bad")
    with pytest.raises(DataError, match=r"alpha/0\.png"):
        splits.train[0]


def _write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def table(tmp_path: Path) -> Path:
    """images.csv with ids without extension, images in images/, labels including ones to exclude."""
    root = tmp_path / "shop"
    rows = []
    for c, label in enumerate(["Shirt", "Hat", "Dress", "Skip", "Coat"]):
        for j in range(2):
            item = f"{label.lower()}-{j}"
            _image(root / "images" / f"{item}.jpg", 30 * c + j)
            rows.append({"image": item, "sender": "7", "label": label})
    _write_csv(root / "images.csv", rows)
    return root


def test_csv_dataset(table: Path) -> None:
    splits = data.build("csv", str(table), exclude_labels=["Skip"], image_size=12)
    assert splits.train.class_names == ["Coat", "Dress"] and splits.test.class_names == ["Hat", "Shirt"]
    assert splits.train.ids == ["dress-0", "dress-1", "coat-0", "coat-1"]
    np.testing.assert_array_equal(splits.train.labels, [1, 1, 0, 0])
    assert splits.train.paths[0].endswith("images/dress-0.jpg")
    assert splits.test[0][0].shape == (3, 12, 12)
    same = data.build("csv", str(table / "images.csv"), images_dir="images", exclude_labels=("Skip",))
    assert same.train.ids == splits.train.ids


def test_csv_columns_and_paths(tmp_path: Path, table: Path) -> None:
    rows = [
        {"file": f"images/{s}-{j}.jpg", "kind": s} for s in ("shirt", "hat", "dress", "coat") for j in (0, 1)
    ]
    _write_csv(table / "other.csv", rows)
    splits = data.build("csv", str(table / "other.csv"), image_column="file", label_column="kind")
    assert splits.train.class_names == ["coat", "dress"]
    with pytest.raises(DataError, match="'label'"):
        data.build("csv", str(table / "other.csv"), image_column="file")
    with pytest.raises(DataError, match=r"nothing\.csv"):
        data.build("csv", str(tmp_path / "nothing.csv"))


def test_csv_missing_and_unreadable_images(table: Path) -> None:
    (table / "images" / "hat-1.jpg").unlink()
    (table / "images" / "coat-0.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DataError, match=r"2 missing or unreadable.*(hat-1|coat-0)\.jpg"):
        data.build("csv", str(table), exclude_labels=["Skip"])
    with pytest.warns(UserWarning, match="skipped 2 "):
        splits = data.build("csv", str(table), exclude_labels=["Skip"], skip_unreadable=True)
    assert "hat-1" not in splits.test.ids and "coat-0" not in splits.train.ids


@pytest.mark.skipif(not (CLOTHING / "images.csv").is_file(), reason="shared clothing data not present")
def test_real_clothing_csv() -> None:
    splits = data.build("csv", str(CLOTHING), exclude_labels=["Not sure", "Skip"], image_size=64)
    assert splits.train.num_classes + splits.test.num_classes == 18
    assert not set(splits.train.class_names) & set(splits.test.class_names)
    image, label, _ = splits.train[0]
    assert image.shape == (3, 64, 64) and 0 <= label < splits.train.num_classes


def test_one_listing_one_decoder(tree: Path) -> None:
    """``data.images``: the datasets' listing skips hidden entries; the CLI's keeps them, takes GIF/TIFF."""
    from dmlkit.data import images

    _image(tree / "alpha" / ".cache" / "4.png", 1)
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tree / "alpha" / "5.gif")
    listed = images.image_files(tree / "alpha", skip_hidden=True)
    assert [p.relative_to(tree).as_posix() for p in listed] == [
        "alpha/0.png", "alpha/1.png", "alpha/2.png", "alpha/more/3.jpg"
    ]  # fmt: skip
    everything = images.image_files(tree / "alpha", extensions=images.EMBED_EXTENSIONS, skip_hidden=False)
    assert {p.name for p in everything} == {"0.png", "1.png", "2.png", "3.jpg", "4.png", "5.gif"}
    assert set(images.EMBED_EXTENSIONS) - images.IMAGE_EXTENSIONS == {".gif", ".tif", ".tiff"}
    assert images.load_image(tree / "alpha" / "0.png", channels=1).mode == "L"
    assert images.load_image(tree / "alpha" / "5.gif").mode == "RGB"
    (tree / "broken.png").write_text("not an image")
    with pytest.raises(DataError, match=r"cannot read image '.*broken\.png'"):
        images.load_image(tree / "broken.png")
