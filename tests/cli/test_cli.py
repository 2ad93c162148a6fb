"""Every subcommand end to end on a tiny run: train, eval, embed, search, list; errors name the culprit."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dmlkit.cli import main
from dmlkit.data import build as build_dataset
from tests_support import assert_match_pml_euclidean, checkpoint_test_embeddings, tiny_argv


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli")
    assert main(["train", *tiny_argv(out / "runs", name="cli")]) == 0
    return out / "runs" / "cli"


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Test-split glyphs written as PNG files, two classes of 4 images each."""
    folder = tmp_path_factory.mktemp("images")
    splits = build_dataset("synthetic", num_classes=16, samples_per_class=8, image_size=16)
    test = splits.test
    for i in range(8):
        pixels = test.images[i, 0].numpy() if hasattr(test.images, "numpy") else test.images[i, 0]
        Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(folder / f"glyph_{i}.png")
    return folder


def test_train_writes_the_run_directory(trained_run: Path, capsys) -> None:
    names = {p.name for p in trained_run.iterdir()}
    assert {"config.yaml", "history.jsonl", "last.pt", "best.pt", "train.log", "results.json"} <= names
    rows = [json.loads(line) for line in (trained_run / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert {"train_loss", "lr", "images_per_s", "val/recall@1", "val/map@r"} <= set(rows[0])
    results = json.loads((trained_run / "results.json").read_text())
    assert set(results["test_before"]) == set(results["test_after"]) == {"recall@1", "map@r"}
    log = (trained_run / "train.log").read_text()
    assert "before" in log and "after" in log


def test_resolved_config_reruns(trained_run: Path, tmp_path: Path) -> None:
    code = main(["train", "--config", str(trained_run / "config.yaml"), "--output-dir", str(tmp_path),
                 "--name", "again", "--epochs", "1"])  # fmt: skip
    assert code == 0 and (tmp_path / "again" / "best.pt").exists()


def test_eval_json_matches_training_report(trained_run: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(trained_run / "best.pt"), "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    expected = json.loads((trained_run / "results.json").read_text())["test_after"]
    assert report["metrics"] == pytest.approx(expected, abs=1e-6)
    assert report["split"] == "test" and report["num_queries"] == 64


def test_eval_table_and_val_split(trained_run: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(trained_run), "--split", "val", "--metrics", "recall@2,mrr",
                 "--no-progress"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "val: 16 queries" in out and "recall@2" in out and "mrr" in out


def test_eval_distance_backend_and_lone_queries_match_pml(trained_run: Path, capsys) -> None:
    """`dmlkit eval --distance euclidean --backend faiss-flat` against PML's AccuracyCalculator on the
    same embeddings (made here independently of the command)."""
    pytest.importorskip("faiss")
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(trained_run), "--metrics", "Recall@1,map@r,r_precision",
                 "--distance", "euclidean", "--backend", "faiss-flat", "--json",
                 "--no-progress"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert (report["distance"], report["backend"]) == ("euclidean", "faiss-flat")

    x, y, _ = checkpoint_test_embeddings(trained_run / "best.pt")
    assert_match_pml_euclidean(report["metrics"], x, y)
    assert report["num_queries_without_relevant"] == int((torch.bincount(y) == 1).sum())


def test_eval_per_class_and_examples(trained_run: Path, tmp_path: Path, capsys) -> None:
    """--per-class values average back to the overall value; --examples draws the failure queries with
    their nearest neighbours."""
    from dmlkit.metrics.visualize import IRRELEVANT_COLOUR

    capsys.readouterr()
    picture = tmp_path / "pictures" / "failures.png"
    assert main(["eval", "--checkpoint", str(trained_run), "--metrics", "recall@1,map@r", "--per-class",
                 "--examples", str(picture), "--num-examples", "3", "--examples-top", "4", "--json",
                 "--no-progress"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    per_class = report["per_class"]["recall@1"]
    assert len(per_class) == 8  # the tiny test split: 8 classes × 8 images, all with relevant items
    assert sum(per_class.values()) / len(per_class) == pytest.approx(report["metrics"]["recall@1"])
    examples = report["examples"]
    assert examples["path"] == str(picture) and examples["top"] == 4 and len(examples["queries"]) == 3
    with Image.open(picture) as image:
        assert image.size == (6 + 96 * 5, (96 + 14) * 3)
        first_result_frame = image.convert("RGB").getpixel((6 + 96 + 1, 1))
    # The tiny model gets about a third of the top-1s wrong: the failures mode draws those first.
    assert report["metrics"]["recall@1"] < 0.9
    assert first_result_frame == IRRELEVANT_COLOUR

    assert main(["eval", "--checkpoint", str(trained_run), "--per-class", "--no-progress"]) == 0
    assert "per class (8 classes), worst:" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(tmp_path / "absent.pt"), "--examples", "out.gif"]) == 2
    assert ".png or .jpg" in capsys.readouterr().err


def test_eval_examples_search_once(trained_run: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """--examples draws from the evaluation's own results: one search serves the metrics and the picture,
    kept as deep as the deeper of the two needs."""
    from dmlkit.search.torch_backend import TorchSearch

    depths: list[int] = []
    original = TorchSearch.search

    def counting(self, inputs, request):
        depths.append(request.k)
        return original(self, inputs, request)

    monkeypatch.setattr(TorchSearch, "search", counting)
    capsys.readouterr()
    grid = str(tmp_path / "grid.png")
    assert main(["eval", "--checkpoint", str(trained_run), "--metrics", "recall@1,recall@2", "--examples",
                 grid, "--examples-top", "6", "--json", "--no-progress"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert depths == [6] and report["examples"]["top"] == 6
    assert main(["eval", "--checkpoint", str(trained_run), "--metrics", "recall@8", "--examples", grid,
                 "--examples-top", "3", "--no-progress"]) == 0  # fmt: skip
    assert depths == [6, 8]


def test_unknown_metric_names_fail_before_loading(trained_run: Path, tmp_path: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "absent.pt"), "--metrics", "recall@1,recal@5"]) == 2
    err = capsys.readouterr().err
    assert "unknown metric 'recal@5'" in err and "did you mean 'recall@5'" in err and "map@r" in err
    assert main(["eval", "--checkpoint", str(trained_run), "--metrics", "map_pml@0"]) == 2
    assert "positive integer" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "absent.pt"), "--metrics", "recall@1,mrr",
                 "--backend", "faiss-flat"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "'mrr' ranks the whole gallery" in err and "absent.pt" not in err
    argv = tiny_argv(tmp_path / "runs", name="typo", epochs=1)
    argv[argv.index("recall@1,map@r")] = "recall@1,map@r,map_lmi"
    assert main(["train", *argv]) == 2
    assert "did you mean 'map_lim'" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "typo").exists()


def test_embed_folder_and_search(trained_run: Path, image_folder: Path, tmp_path: Path, capsys) -> None:
    gallery = tmp_path / "gallery.npy"
    assert main(["embed", "--checkpoint", str(trained_run / "best.pt"), "--images", str(image_folder),
                 "--out", str(gallery), "--no-progress"]) == 0  # fmt: skip
    embeddings = np.load(gallery)
    ids = json.loads((tmp_path / "gallery.ids.json").read_text())["ids"]
    assert embeddings.shape == (8, 16) and embeddings.dtype == np.float32
    assert ids == sorted(f"glyph_{i}.png" for i in range(8))
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)

    capsys.readouterr()
    query = image_folder / "glyph_3.png"
    assert main(["search", "--checkpoint", str(trained_run / "best.pt"), "--gallery", str(gallery),
                 "--query", str(query), "-k", "3", "--json"]) == 0  # fmt: skip
    found = json.loads(capsys.readouterr().out)
    neighbours = found["results"][0]["neighbours"]
    assert len(neighbours) == 3 and neighbours[0]["id"] == "glyph_3.png"
    assert neighbours[0]["score"] == pytest.approx(1.0, abs=1e-5)
    scores = [n["score"] for n in neighbours]
    assert scores == sorted(scores, reverse=True)
    # an independent check of the ranking: cosine similarities of the stored embeddings
    own = embeddings[ids.index("glyph_3.png")]
    expected = [ids[i] for i in np.argsort(-(embeddings @ own), kind="stable")[:3]]
    assert [n["id"] for n in neighbours] == expected

    assert main(["search", "--checkpoint", str(trained_run / "best.pt"), "--gallery", str(gallery),
                 "--query", str(image_folder), "-k", "2"]) == 0  # fmt: skip
    table = capsys.readouterr().out
    assert table.count("query:") == 8 and "rank" in table


def test_embed_from_csv(trained_run: Path, image_folder: Path, tmp_path: Path) -> None:
    listing = image_folder / "list.csv"
    with listing.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label"])
        writer.writerows([["glyph_1.png", "a"], ["glyph_0", "b"]])  # extension found on disk
    out = tmp_path / "csv.npy"
    assert main(["embed", "--checkpoint", str(trained_run / "best.pt"), "--images", str(listing),
                 "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    assert np.load(out).shape == (2, 16)
    assert json.loads((tmp_path / "csv.ids.json").read_text())["ids"] == ["glyph_1.png", "glyph_0"]


def test_list_names(capsys) -> None:
    for kind, expected in (
        ("losses", "multisimilarity"),
        ("samplers", "m_per_class"),
        ("metrics", "map@r"),
        ("datasets", "synthetic"),
        ("miners", "batch_hard"),
        ("backbones", "small_cnn"),
    ):
        assert main(["list", kind, "--json"]) == 0
        assert expected in json.loads(capsys.readouterr().out)


def test_errors_name_the_culprit(trained_run: Path, tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nope.pt"
    assert main(["eval", "--checkpoint", str(missing)]) == 1
    assert str(missing) in capsys.readouterr().err

    not_ckpt = tmp_path / "junk.pt"
    not_ckpt.write_bytes(b"not a checkpoint")
    assert main(["eval", "--checkpoint", str(not_ckpt)]) == 1
    assert "junk.pt" in capsys.readouterr().err

    missing_root = tmp_path / "no-such-folder"
    assert main(["train", "--dataset", "folder", "--data-root", str(missing_root), "--output-dir",
                 str(tmp_path / "runs"), "--no-progress"]) == 1  # fmt: skip
    assert str(missing_root) in capsys.readouterr().err

    bad_gallery = tmp_path / "bad.npy"
    np.save(bad_gallery, np.zeros((3, 5), dtype=np.float32))
    (tmp_path / "bad.ids.json").write_text(json.dumps({"ids": ["a", "b", "c"]}))
    query = tmp_path / "query.png"
    Image.new("L", (16, 16)).save(query)
    assert main(["search", "--checkpoint", str(trained_run / "best.pt"), "--gallery", str(bad_gallery),
                 "--query", str(query)]) == 1  # fmt: skip
    assert "shape" in capsys.readouterr().err

    assert main(["train", "--resume", str(tmp_path / "nothing-here")]) == 2
    assert "last.pt" in capsys.readouterr().err


def test_sigterm_saves_and_resume_finishes(tmp_path: Path) -> None:
    """A real SIGTERM to a CLI training process: exit 0 with a resumable checkpoint, then --resume ends it."""
    run_dir = tmp_path / "runs" / "term"
    argv = [sys.executable, "-m", "dmlkit", "train", *tiny_argv(tmp_path / "runs", name="term", epochs=400)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    history = run_dir / "history.jsonl"
    deadline = time.monotonic() + 120
    while not (history.exists() and history.read_text().count("\n") >= 2):
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "training did not start in time"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert "resume with" in output
    from dmlkit.train import checkpoint as ckpt

    state = ckpt.load(run_dir / "last.pt")
    done_epochs = state["epoch"]
    assert 2 <= done_epochs < 400

    # finish quickly: resume with fewer total epochs than planned (flags override the saved config)
    assert main(["train", "--resume", str(run_dir), "--epochs", str(done_epochs + 1)]) == 0
    rows = [json.loads(line) for line in history.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, done_epochs + 2))
    assert (run_dir / "results.json").exists()
