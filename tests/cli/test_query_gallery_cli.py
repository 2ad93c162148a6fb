"""Query/gallery through training and ``dmlkit eval``: an OML CSV with train, validation and test rows; the
run records each split's protocol, best.pt is selected on the validation split, and ``dmlkit eval`` reports
query/gallery metrics equal to a brute-force computation, per class, per category and as pictures."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dmlkit.cli import main
from tests_support import checkpoint_test_embeddings


def _brute_force_recall_at_1(
    x: np.ndarray, labels: np.ndarray, queries: np.ndarray, gallery: np.ndarray
) -> float:
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    hits = []
    for q in queries:
        candidates = np.array([g for g in gallery if g != q])
        if not (labels[candidates] == labels[q]).any():
            continue
        best = candidates[np.argmax(unit[candidates] @ unit[q])]
        hits.append(labels[best] == labels[q])
    return float(np.mean(hits))


@pytest.fixture(scope="module")
def oml_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("oml")
    rng = np.random.default_rng(0)
    rows: list[dict[str, object]] = []

    def add(label: int, split: str, count: int, **extra: object) -> None:
        for j in range(count):
            path = f"images/{label}_{j}.png"
            pixels = rng.integers(0, 255, size=(16, 16, 3), dtype=np.uint8) // 4 + 40 * (label % 5)
            (root / "images").mkdir(exist_ok=True)
            Image.fromarray(pixels.astype(np.uint8)).save(root / path)
            flags = extra.get("flags", [(True, True)] * count)[j]  # type: ignore[index]
            rows.append(
                {"label": label, "path": path, "split": split,
                 "is_query": flags[0] if split != "train" else "",
                 "is_gallery": flags[1] if split != "train" else "", "category": extra.get("category", "")}
            )  # fmt: skip

    for label in range(6):
        add(label, "train", 4, category="a" if label < 3 else "b")
    for label in (6, 7):
        add(label, "validation", 4)
    for label in (8, 9, 10):
        add(label, "test", 4, flags=[(True, False), (True, False), (False, True), (True, True)],
            category="shoes" if label == 8 else "tops")  # fmt: skip
    table = root / "items.csv"
    with table.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return table


@pytest.fixture(scope="module")
def run_dir(oml_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    argv = ["train", "--dataset", "csv", "--data-root", str(oml_csv), "--image-size", "16", "--epochs", "2",
            "--embedding-size", "8", "--batch-size", "8", "--samples-per-class", "4", "--no-progress",
            "--metrics", "recall@1,map@r", "--output-dir", str(out), "--name", "qg",
            "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    return out / "qg"


def test_the_run_records_each_splits_protocol_and_validates_on_the_datasets_own_split(run_dir: Path) -> None:
    results = json.loads((run_dir / "results.json").read_text())
    assert results["protocol"] == {"val": "leave-one-out", "test": "query/gallery"}
    assert results["selection"]["method"] == "validation"
    log = (run_dir / "train.log").read_text()
    assert "val 8 images / 2 classes" in log and "test 12 images / 3 classes (9 queries, 6 gallery)" in log
    x, y, _ = checkpoint_test_embeddings(run_dir / "best.pt")
    queries = np.array([0, 1, 3, 4, 5, 7, 8, 9, 11])
    gallery = np.array([2, 3, 6, 7, 10, 11])
    expected = _brute_force_recall_at_1(x.numpy(), y.numpy(), queries, gallery)
    assert results["test_after"]["recall@1"] == pytest.approx(expected, abs=1e-6)


def test_eval_reports_query_gallery_metrics_per_class_per_category_and_pictures(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    picture = tmp_path / "examples.png"
    argv = ["eval", "--checkpoint", str(run_dir / "best.pt"), "--json", "--per-class", "--per-category",
            "--examples", str(picture), "--examples-top", "3", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{") :])  # after the log lines the train run's console handler prints
    assert (report["protocol"], report["num_queries"], report["num_gallery"]) == ("query/gallery", 9, 6)
    assert set(report["per_class"]["recall@1"]) == {"8", "9", "10"}
    assert set(report["per_category"]["recall@1"]) == {"shoes", "tops"}
    shoes = report["per_class"]["recall@1"]["8"]
    assert report["per_category"]["recall@1"]["shoes"] == pytest.approx(shoes)
    assert Image.open(picture).size[0] > 0 and report["examples"]["top"] == 3
    x, y, _ = checkpoint_test_embeddings(run_dir / "best.pt")
    queries, gallery = np.array([0, 1, 3, 4, 5, 7, 8, 9, 11]), np.array([2, 3, 6, 7, 10, 11])
    expected = _brute_force_recall_at_1(x.numpy(), y.numpy(), queries, gallery)
    assert report["metrics"]["recall@1"] == pytest.approx(expected, abs=1e-6)


def test_per_category_without_categories_is_an_error(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(run_dir / "best.pt"),
                "--split",
                "val",
                "--per-category",
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    assert "--per-category: the val split of 'csv' has no categories" in capsys.readouterr().err
