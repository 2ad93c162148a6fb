from __future__ import annotations

import copy
import csv
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bad_images import truncated_jpeg
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
    with pytest.raises(DataError, match=r"images\.csv' line 5 names a missing image '.*hat-1\.jpg' \(1 of 8"):
        data.build("csv", str(table), exclude_labels=["Skip"])
    (table / "images" / "hat-1.jpg").write_bytes(b"not an image either")
    with pytest.raises(DataError, match=r"2 of 8 image\(s\) in .* cannot be used: .*(hat-1|coat-0)\.jpg"):
        data.build("csv", str(table), exclude_labels=["Skip"])
    (table / "images" / "hat-1.jpg").unlink()
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


def test_file_options_are_checked_before_reading(tree: Path) -> None:
    for bad, match in (
        ({"verify_images": "fast"}, "verify_images"),
        ({"overlap_check": "hash"}, "overlap_check"),
        ({"max_image_pixels": 0}, "max_image_pixels"),
        ({"channels": 2}, "channels"),
    ):
        with pytest.raises(ConfigError, match=match):
            data.build("folder", str(tree), **bad)


def test_truncated_jpeg_is_caught_at_build_time(tree: Path) -> None:
    truncated_jpeg(tree / "bravo" / "cut.jpg")
    expected = r"1 of 14 image\(s\) .* cannot be used: .*bravo/cut\.jpg': image file is truncated"
    with pytest.raises(DataError, match=expected):
        data.build("folder", str(tree))  # auto: a few small images, fully decoded
    assert "bravo/cut.jpg" in data.build("folder", str(tree), verify_images="header").train.ids
    with pytest.warns(UserWarning, match=r"skipped 1 .*cut\.jpg"):
        splits = data.build("folder", str(tree), skip_unreadable=True)
    assert "bravo/cut.jpg" not in splits.train.ids


def test_pixel_limit_of_file_datasets(tree: Path, table: Path) -> None:
    with pytest.raises(DataError, match=r"alpha/0\.png': 280 pixels \(20×14\), more than the limit of 100"):
        data.build("folder", str(tree), max_image_pixels=100)
    splits = data.build("csv", str(table), exclude_labels=["Skip"], max_image_pixels=None)
    assert splits.train.max_pixels is None and splits.test.max_pixels is None
    limited = data.build("folder", str(tree), max_image_pixels=280, verify_images="header")
    assert limited.train.max_pixels == 280 and limited.train.subset([0]).max_pixels == 280


def _broken_after_build(tree: Path, **kwargs: object) -> data.DatasetSplits:
    """The folder splits, then ``bravo/1.png`` truncated (passes no check: it broke after them)."""
    splits = data.build("folder", str(tree), skip_unreadable=True, **kwargs)
    path = tree / "bravo" / "1.png"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return splits


def test_skip_unreadable_replaces_a_file_failing_at_load_time(tree: Path) -> None:
    strict = data.build("folder", str(tree)).train
    train = _broken_after_build(tree).train
    index = train.ids.index("bravo/1.png")
    same_class = [i for i in np.flatnonzero(train.labels == train.labels[index]) if i != index]
    assert train.substituted == 0
    with pytest.warns(
        UserWarning, match=r"bravo/1\.png.*truncated.*replaced by another image of class 'bravo'"
    ):
        image, label, returned = train[index]
    assert (label, returned) == (int(train.labels[index]), index) and train.substituted == 1
    assert any(torch.equal(image, train[i][0]) for i in same_class)
    with pytest.warns(UserWarning):
        again = train[index][0]
    torch.testing.assert_close(again, image)  # a pure function of (seed, epoch, index)
    assert train.substituted == 2
    with pytest.raises(DataError, match=r"bravo/1\.png"):
        strict[index]


def test_substitute_follows_seed_and_epoch(tree: Path) -> None:
    for j in range(3, 12):
        _image(tree / "bravo" / f"{j}.png", 100 + j)
    train = _broken_after_build(tree).train
    train.transform = None
    index = train.ids.index("bravo/1.png")
    chosen = set()
    with pytest.warns(UserWarning):
        for epoch in range(6):
            train.set_epoch(epoch)
            chosen.add(float(train[index][0].mean()))
            assert float(train[index][0].mean()) in chosen  # same epoch, same substitute
    assert len(chosen) > 1  # another epoch may draw another image of the class


def test_a_class_without_any_loadable_image_is_an_error(tree: Path) -> None:
    splits = data.build("folder", str(tree), skip_unreadable=True)
    for path in (tree / "bravo").iterdir():
        path.write_bytes(b"gone")
    index = splits.train.ids.index("bravo/0.png")
    with pytest.raises(DataError, match=r"bravo/0\.png.*no other image of class 'bravo' loads"):
        splits.train[index]


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_substitution_count_seen_across_dataloader_workers(tree: Path, context: str) -> None:
    train = _broken_after_build(tree).train
    train.transform = None
    (tree / "alpha" / "2.png").write_bytes(b"gone too")
    workers = 2 if context == "fork" else 1  # spawning a worker costs seconds: one is enough to cross over
    loader = torch.utils.data.DataLoader(
        train, batch_size=3, num_workers=workers, multiprocessing_context=context, persistent_workers=True
    )
    labels = torch.cat([batch[1] for batch in loader])
    assert train.substituted == 2  # one per broken item, counted in the workers, read here
    np.testing.assert_array_equal(labels.numpy(), train.labels)
    for _ in loader:
        pass
    assert train.substituted == 4
    copied = copy.deepcopy(train)  # plain copies carry the count, not the shared memory
    assert copied.substituted == 4 and pickle.loads(pickle.dumps(train)).substituted == 4


def test_train_test_overlap_is_warned(tree: Path, table: Path) -> None:
    twin = tree / "delta" / "twin.png"
    twin.symlink_to(tree / "alpha" / "0.png")
    with pytest.warns(
        UserWarning, match=r"1 image\(s\) of the train split .* also in its test split \(same path\)"
    ):
        data.build("folder", str(tree))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data.build("folder", str(tree), overlap_check="none")
    twin.unlink()
    shutil.copy(tree / "alpha" / "0.png", twin)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data.build("folder", str(tree))  # a copy is another path
    with pytest.warns(UserWarning, match=r"same content\): '.*alpha/0\.png' = '.*delta/twin\.png'"):
        data.build("folder", str(tree), overlap_check="content")

    rows = list(csv.DictReader((table / "images.csv").open()))
    rows.append(
        {"image": "coat-0", "sender": "7", "label": "Shirt"}
    )  # one file under a train and a test label
    _write_csv(table / "images.csv", rows)
    with pytest.warns(UserWarning, match=r"1 image\(s\) .* \(same path\): '.*images/coat-0\.jpg'"):
        data.build("csv", str(table), exclude_labels=["Skip"])


def test_errors_from_dataloader_workers_keep_their_kind_and_one_line(tree: Path) -> None:
    """A file too large or failing in a worker process arrives here as the same error class, one line."""
    paths = [str(tree / "alpha" / "0.png"), str(tree / "alpha" / "1.png")]
    limited = data.FileImageDataset(paths, [0, 1], ["a", "b"], ["0", "1"], max_pixels=100)
    (tree / "alpha" / "1.png").write_text("gone")
    broken = data.FileImageDataset(paths[1:], [0], ["a"], ["1"])
    for dataset, kind, match in (
        (limited, data.ImageTooLargeError, r"alpha/0\.png' is too large: 280 pixels \(20×14\)"),
        (broken, DataError, r"alpha/1\.png': not an image file"),
    ):
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1)
        with pytest.raises(kind, match=match) as caught:
            next(iter(loader))
        assert type(caught.value) is kind and "\n" not in str(caught.value)
