"""``inshop`` on a miniature DeepFashion In-shop tree written here in the official layout: the count line,
the header, rows separated by irregular runs of spaces and tabs, ``img/<gender>/<category>/<item>/...``;
and its query/gallery metrics against a brute-force computation."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dmlkit import data
from dmlkit.cli import main
from dmlkit.data.catalog import CATALOG
from dmlkit.data.datasets.inshop import inshop_table
from dmlkit.errors import DataError
from dmlkit.inference import evaluate_model
from tests_support import edit_line

HEADER = "image_name item_id evaluation_status"
BOX_HEADER = "image_name clothes_type pose_type x_1 y_1 x_2 y_2"
VIEWS = ("1_front", "2_side", "3_back", "4_full", "7_additional")
WIDTH, HEIGHT = 12, 10
#: item → statuses of its images: 4 training items, 5 test items with 2 queries and 3 gallery images
#: each, and one test item with gallery images only (a distractor)
ITEMS: dict[str, tuple[str, ...]] = {
    **{f"id_{i:08d}": ("train",) * 4 for i in (1, 2, 3, 4)},
    **{f"id_{i:08d}": ("query", "gallery", "query", "gallery", "gallery") for i in (5, 6, 7, 8, 9)},
    "id_00000010": ("gallery", "gallery"),
}
CATEGORY = {"id_00000001": "WOMEN/Dresses", "id_00000002": "WOMEN/Dresses", "id_00000003": "MEN/Denim"}


def _rows() -> list[tuple[str, str, str]]:
    """(image_name, item_id, evaluation_status) in file order."""
    rows = []
    for item, statuses in ITEMS.items():
        category = CATEGORY.get(item, "WOMEN/Blouses_Shirts")
        for j, status in enumerate(statuses):
            rows.append((f"img/{category}/{item}/{j // 2 + 1:02d}_{VIEWS[j]}.jpg", item, status))
    return rows


def _write(root: Path, images_dir: str = "") -> Path:
    rng = np.random.default_rng(0)
    rows = _rows()
    lines = [str(len(rows)), HEADER]
    boxes = [str(len(rows)), BOX_HEADER]
    base = {item: rng.integers(0, 256, (HEIGHT, WIDTH, 3)) for item in ITEMS}
    for n, (name, item, status) in enumerate(rows):
        path = root / images_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        # images of one item look alike (its base pattern plus noise): retrieval is neither perfect nor random
        pixels = 0.5 * base[item] + 0.5 * rng.integers(0, 256, (HEIGHT, WIDTH, 3))
        Image.fromarray(pixels.astype(np.uint8)).save(path)
        # the official padding: the name padded with spaces, then runs of spaces or tabs, trailing blanks
        lines.append(f"{name}{' ' * (1 + n % 7)}{item}{['  ', chr(9), ' ' + chr(9) + ' '][n % 3]}{status}  ")
        boxes.append(f"{name}   {1 + n % 3}  1   {1 + n % 2} {2 + n % 3} {7 + n % 4} 9")
    (root / "Eval").mkdir(parents=True, exist_ok=True)
    (root / "Eval" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    (root / "Anno").mkdir(parents=True, exist_ok=True)
    (root / "Anno" / "list_bbox_inshop.txt").write_text("\n".join(boxes) + "\n")
    return root


@pytest.fixture
def inshop(tmp_path: Path) -> Path:
    return _write(tmp_path / "inshop")


def test_table_reads_the_partition(inshop: Path) -> None:
    table = inshop_table(str(inshop))
    rows = _rows()
    assert len(table) == 43 and table.source == str(inshop / "Eval" / "list_eval_partition.txt")
    assert table.counts() == {"train": (16, 4), "test": (27, 6)}
    assert table.ids.tolist() == [name for name, _, _ in rows]
    assert table.labels.tolist() == [item for _, item, _ in rows]
    assert table.paths[0] == str(inshop / "img" / "WOMEN" / "Dresses" / "id_00000001" / "01_1_front.jpg")
    assert table.lines.tolist() == list(range(3, 46))
    statuses = np.array([status for _, _, status in rows])
    np.testing.assert_array_equal(table.splits, np.where(statuses == "train", "train", "test"))
    test = table.splits == "test"
    assert (table.is_query[test].sum(), table.is_gallery[test].sum()) == (10, 17)
    np.testing.assert_array_equal(table.is_query[test], statuses[test] == "query")
    np.testing.assert_array_equal(table.is_gallery[test], statuses[test] == "gallery")


def test_images_in_an_img_folder(tmp_path: Path) -> None:
    root = _write(tmp_path / "mmfashion", images_dir="Img")  # mmfashion's layout: Img/img/...
    table = inshop_table(str(root))
    assert table.paths[0] == str(
        root / "Img" / "img" / "WOMEN" / "Dresses" / "id_00000001" / "01_1_front.jpg"
    )


def test_build_gives_query_gallery_test_split(inshop: Path) -> None:
    splits = data.build("inshop", str(inshop), image_size=16)
    assert splits.train.class_names == ["id_00000001", "id_00000002", "id_00000003", "id_00000004"]
    assert splits.test.class_names == [f"id_{i:08d}" for i in range(5, 11)]
    assert (len(splits.train), len(splits.test)) == (16, 27)
    assert splits.train.annotations.is_query is None  # training items: leave-one-out
    flags = splits.test.annotations
    assert flags.protocol == "query/gallery"
    expected = [status for _, _, status in _rows() if status != "train"]
    np.testing.assert_array_equal(flags.is_query, [s == "query" for s in expected])
    np.testing.assert_array_equal(flags.is_gallery, [s == "gallery" for s in expected])
    assert splits.test[0][0].shape == (3, 16, 16)


def test_crop_boxes(inshop: Path) -> None:
    table = inshop_table(str(inshop), crop_boxes=True)
    np.testing.assert_array_equal(table.boxes[0], [1.0, 2.0, 7.0, 9.0])
    np.testing.assert_array_equal(table.boxes[5], [2.0, 4.0, 8.0, 9.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every box is inside its 12 × 10 image
        splits = data.build("inshop", str(inshop), image_size=16, crop_boxes=True)
    np.testing.assert_allclose(splits.train.annotations.boxes[0], [1 / 12, 2 / 10, 7 / 12, 9 / 10], rtol=1e-6)


def test_catalog_entry() -> None:
    info = CATALOG.get("inshop")
    assert info.expected[""] == {"train": (25882, 3997), "test": (26830, 3985)}
    assert info.table is inshop_table and "Liu" in info.citation
    assert not info.downloads and "password" in info.manual


def _brute_force(embeddings: np.ndarray, items: list[str], statuses: list[str]) -> tuple[float, float]:
    """recall@1 and MAP@R (Musgrave et al. 2020) of the query rows against the gallery rows, by cosine
    similarity, written out here."""
    x = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    queries = [i for i, s in enumerate(statuses) if s == "query"]
    gallery = [i for i, s in enumerate(statuses) if s == "gallery"]
    recall, average_precision = [], []
    for q in queries:
        order = sorted(gallery, key=lambda g: -float(x[q] @ x[g]))
        relevant = [items[g] == items[q] for g in order if g != q]
        r = sum(relevant)
        recall.append(float(relevant[0]))
        hits, precisions = 0, []
        for rank, is_relevant in enumerate(relevant[:r], start=1):
            if is_relevant:
                hits += 1
                precisions.append(hits / rank)
        average_precision.append(sum(precisions) / r)
    return float(np.mean(recall)), float(np.mean(average_precision))


def test_query_gallery_metrics_equal_brute_force(inshop: Path) -> None:
    test = data.build("inshop", str(inshop), image_size=16).test
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 8)).eval()
    results = evaluate_model(model, test, ["recall@1", "map@r"])
    with torch.no_grad():
        embeddings = model(torch.stack([test[i][0] for i in range(len(test))])).numpy()
    status_of = {name: (item, status) for name, item, status in _rows()}
    items = [status_of[i][0] for i in test.ids]
    statuses = [status_of[i][1] for i in test.ids]
    recall, map_r = _brute_force(embeddings, items, statuses)
    assert 0.0 < recall < 1.0 and 0.0 < map_r < 1.0  # the fixture is neither trivial nor hopeless
    assert results.metrics["recall@1"] == pytest.approx(recall, abs=1e-6)
    assert results.metrics["map@r"] == pytest.approx(map_r, abs=1e-6)
    assert sorted(results.query_ids.tolist()) == [i for i, s in enumerate(statuses) if s == "query"]


def test_count_line_must_match(inshop: Path) -> None:
    partition = inshop / "Eval" / "list_eval_partition.txt"
    lines = partition.read_text().splitlines()
    partition.write_text("\n".join(["52712", *lines[1:]]) + "\n")
    with pytest.raises(
        DataError, match=r"list_eval_partition\.txt' line 1 announces 52712 images, but the file lists 43"
    ):
        inshop_table(str(inshop))


PARTITION = "list_eval_partition.txt"


@pytest.mark.parametrize(
    ("line", "text", "message"),
    [
        (1, "many", "line 1: expected the number of images, got 'many'"),
        (2, "image_name item_id status", f"line 2: expected the header '{HEADER}', got 'image_name item_id"),
        (7, "img/WOMEN/Dresses/id_00000002/01_1_front.jpg id_00000002", "line 7: 3 fields expected"),
        (9, "img/WOMEN/Dresses/id_00000002/02_3_back.jpg   id_00000002  val",
         "line 9: evaluation_status must be one of train, query, gallery, got 'val'"),
    ],
)  # fmt: skip
def test_bad_rows_name_file_and_line(inshop: Path, line: int, text: str, message: str) -> None:
    edit_line(inshop / "Eval" / PARTITION, line, text)
    with pytest.raises(DataError, match=rf"{re.escape(PARTITION)}' {message}"):
        inshop_table(str(inshop))


def test_missing_files(inshop: Path) -> None:
    (inshop / "Anno" / "list_bbox_inshop.txt").unlink()
    with pytest.raises(DataError, match=r"In-shop bounding boxes not found: '.*list_bbox_inshop\.txt'"):
        inshop_table(str(inshop), crop_boxes=True)
    # the 8th row of the list, on line 10
    (inshop / "img" / "WOMEN" / "Dresses" / "id_00000002" / "02_4_full.jpg").unlink()
    with pytest.raises(
        DataError, match=r"list_eval_partition\.txt' line 10 names a missing image '.*02_4_full\.jpg'"
    ):
        data.build("inshop", str(inshop))
    (inshop / "Eval" / PARTITION).unlink()
    with pytest.raises(
        DataError, match=r"In-shop evaluation partition not found: '.*Eval/list_eval_partition\.txt'"
    ):
        inshop_table(str(inshop))


def test_box_list_errors(inshop: Path) -> None:
    boxes = inshop / "Anno" / "list_bbox_inshop.txt"
    edit_line(boxes, 4, "img/WOMEN/Dresses/id_00000001/01_2_side.jpg 1 1 a 2 7 9")
    with pytest.raises(DataError, match=r"list_bbox_inshop\.txt' line 4: x_1 y_1 x_2 y_2 must be numbers"):
        inshop_table(str(inshop), crop_boxes=True)
    edit_line(boxes, 4, "img/WOMEN/Dresses/id_00000001/01_2_side.jpg 1 1 5 2 5 9")
    with pytest.raises(
        DataError,
        match=r"list_bbox_inshop\.txt' line 4: box x_1, y_1, x_2, y_2 = \[5\.0, 2\.0, 5\.0, 9\.0\] is empty",
    ):
        inshop_table(str(inshop), crop_boxes=True)
    lines = boxes.read_text().splitlines()
    boxes.write_text("\n".join([str(len(lines) - 3), *lines[1:3], *lines[4:]]) + "\n")
    with pytest.raises(
        DataError,
        match=r"list_eval_partition\.txt' line 4: image 'img/WOMEN/Dresses/id_00000001/01_2_side\.jpg' has",
    ):
        inshop_table(str(inshop), crop_boxes=True)


def test_train_from_the_command_line(inshop: Path, tmp_path: Path, capsys) -> None:
    fast = ["--epochs", "1", "--backbone", "small_cnn", "--embedding-size", "8", "--batch-size", "8",
            "--samples-per-class", "4", "--image-size", "16", "--no-progress",
            "--device", "cpu", "--metrics", "recall@1,map@r"]  # fmt: skip
    out = tmp_path / "runs"
    # val-fraction 0.5: two training items become the validation split, evaluated leave-one-out
    assert main(["train", "--dataset", "inshop", "--data-root", str(inshop), "--output-dir", str(out),
                 "--name", "inshop", "--val-fraction", "0.5", *fast]) == 0  # fmt: skip
    assert (out / "inshop" / "best.pt").is_file()
    assert "protocol val leave-one-out, test query/gallery" in capsys.readouterr().out
