"""`dmlkit eval --calibrate-fmr` and `dmlkit search --threshold` end to end on a tiny synthetic run: the
threshold is calibrated on the validation split (sklearn's ROC point on its pairs), measured on the test
split, written to threshold.json; the search keeps only the neighbours within it (none for some queries),
from a gallery .npy or an index; bad thresholds fail before any model loads."""

from __future__ import annotations

import json
from contextlib import redirect_stdout
from dataclasses import replace
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_curve

from dmlkit import data as data_lib
from dmlkit.cli import index as index_cli
from dmlkit.cli import main
from dmlkit.cli import search as search_cli
from dmlkit.cli.common import load_model
from dmlkit.config import config_from_checkpoint
from dmlkit.inference import compute_embeddings
from dmlkit.metrics.clustering import faiss_available
from dmlkit.metrics.verification import Threshold
from dmlkit.train.data import build_data
from tests_support import TINY_DATA, tiny_argv


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A one-epoch run on the tiny synthetic dataset, with a validation split (val_fraction 0.25)."""
    out = tmp_path_factory.mktemp("threshold")
    assert main(["train", *tiny_argv(out / "runs", name="thr", epochs=1)]) == 0
    return out / "runs" / "thr"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """16 test-split glyphs as PNG files."""
    folder = tmp_path_factory.mktemp("glyphs")
    test = data_lib.build("synthetic", **TINY_DATA).test
    for i in range(16):
        Image.fromarray(np.asarray(test.images[i, 0], dtype=np.uint8)).save(folder / f"g{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def gallery(run_dir: Path, images: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gallery") / "gallery.npy"
    assert main(["embed", "--checkpoint", str(run_dir), "--images", str(images), "--out", str(out),
                 "--no-progress"]) == 0  # fmt: skip
    return out


@pytest.fixture(scope="module")
def calibrated(run_dir: Path) -> dict:
    """The report of `dmlkit eval --calibrate-fmr 0.1 --json`, which writes the run's threshold.json."""
    printed = StringIO()
    with redirect_stdout(printed):
        assert main(["eval", "--checkpoint", str(run_dir), "--calibrate-fmr", "0.1", "--json",
                     "--no-progress"]) == 0  # fmt: skip
    return json.loads(printed.getvalue())


def split_embeddings(checkpoint_file: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A split's embeddings and labels, made here with the library rather than by the command."""
    model, checkpoint = load_model(checkpoint_file, torch.device("cpu"))
    config = config_from_checkpoint(checkpoint["config"], str(checkpoint_file))
    splits = build_data(config.data, config.run.seed, spec=checkpoint["data_spec"])
    part = splits.split(split)
    part.transform = data_lib.transforms.build("eval", **checkpoint["data_spec"])
    x, y = compute_embeddings(model, part)
    return x.double().numpy(), y.numpy()


def cosine_pairs(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarity and same-label flag of every unordered pair i < j."""
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    upper = np.triu_indices(len(x), 1)
    return (unit @ unit.T)[upper], (y[:, None] == y[None, :])[upper]


def run_json(argv: list[str], capsys) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_calibrates_on_the_validation_split(run_dir: Path, calibrated: dict, capsys) -> None:
    found = calibrated["threshold"]
    assert found["split"] == "val" and found["path"] == str(run_dir / "threshold.json")
    threshold = Threshold.from_json(run_dir / "threshold.json")
    assert threshold.to_dict() == {k: v for k, v in found.items() if k not in ("path", "split", "evaluated")}
    assert threshold.distance == "cosine" and "synthetic / val (leave-one-out)" in threshold.source
    # sklearn's ROC curve on every pair of the validation split: its last point with FPR ≤ 0.1
    similarity, positive = cosine_pairs(*split_embeddings(run_dir / "best.pt", "val"))
    fpr, tpr, cut = roc_curve(positive, similarity, drop_intermediate=False)
    point = int(np.flatnonzero(fpr <= 0.1)[-1])
    assert threshold.value == pytest.approx(cut[point], abs=1e-6)
    assert (threshold.fmr, threshold.fnmr) == (pytest.approx(fpr[point]), pytest.approx(1 - tpr[point]))
    assert (threshold.num_positive, threshold.num_negative) == (positive.sum(), (~positive).sum())
    # the evaluated (test) split's rates at that threshold, counted by hand
    similarity, positive = cosine_pairs(*split_embeddings(run_dir / "best.pt", "test"))
    accepted = similarity >= threshold.value
    on_test = found["evaluated"]
    assert on_test["split"] == "test"
    assert on_test["fmr"] == pytest.approx(accepted[~positive].mean())
    assert on_test["fnmr"] == pytest.approx(1 - accepted[positive].mean())
    # the table says the same
    assert main(["eval", "--checkpoint", str(run_dir), "--calibrate-fmr", "0.1", "--no-progress",
                 "--threshold-out", str(run_dir / "copy.json")]) == 0  # fmt: skip
    table = capsys.readouterr().out
    assert f"threshold for FMR <= 0.1, calibrated on val ({threshold.num_positive} same-label" in table
    assert threshold.rule in table and f"written to {run_dir / 'copy.json'}" in table
    assert Threshold.from_json(run_dir / "copy.json") == threshold


def test_calibrating_on_the_test_split_warns(run_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "t.json"
    assert main(["eval", "--checkpoint", str(run_dir), "--calibrate-fmr", "0.05", "--calibrate-split", "test",
                 "--threshold-out", str(out), "--json", "--no-progress"]) == 0  # fmt: skip
    printed = capsys.readouterr()
    assert "warning: calibrating the threshold on the test split" in printed.err
    report = json.loads(printed.out)
    assert report["threshold"]["split"] == "test" and "evaluated" not in report["threshold"]
    similarity, positive = cosine_pairs(*split_embeddings(run_dir / "best.pt", "test"))
    threshold = Threshold.from_json(out)
    assert threshold.fmr == pytest.approx(np.mean(similarity[~positive] >= threshold.value))
    assert threshold.fmr <= 0.05 and report["threshold"]["fmr"] == threshold.fmr


@pytest.mark.parametrize("rate", ["2", "-0.1", "nan", "often"])
def test_eval_calibration_rate_is_checked_while_parsing(tmp_path: Path, capsys, rate: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--checkpoint", str(tmp_path / "absent.pt"), "--calibrate-fmr", rate])
    assert exit_info.value.code == 2
    assert f"--calibrate-fmr: must be a false match rate in [0, 1], got '{rate}'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--threshold-out", "t.json"], "--threshold-out only apply with --calibrate-fmr"),
        (["--calibrate-split", "val"], "--calibrate-split only apply with --calibrate-fmr"),
        (["--calibrate-fmr", "0.1", "--revisited", "x"], "cannot be combined with --revisited"),
    ],
)
def test_eval_calibration_options_fail_before_loading(tmp_path: Path, capsys, extra, message) -> None:
    assert main(["eval", "--checkpoint", str(tmp_path / "absent.pt"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "absent.pt" not in err


def test_eval_threshold_out_must_be_a_file(run_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["eval", "--checkpoint", str(tmp_path / "absent.pt"), "--calibrate-fmr", "0.1",
                 "--threshold-out", str(tmp_path)]) == 2  # fmt: skip
    assert "is a folder" in capsys.readouterr().err


def test_search_keeps_the_neighbours_within_the_threshold(
    run_dir: Path, images: Path, gallery: Path, calibrated: dict, capsys
) -> None:
    x = np.load(gallery).astype(np.float64)
    ids = json.loads(gallery.with_name("gallery.ids.json").read_text())["ids"]
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    own = unit[ids.index("g03.png")] @ unit.T  # g03 is in the gallery: its own row is the query
    order = np.argsort(-own, kind="stable")
    # a value halfway between the 3rd and 4th best: exactly three matches, whatever the rounding
    value = float((own[order[2]] + own[order[3]]) / 2)
    argv = ["search", "--checkpoint", str(run_dir), "--gallery", str(gallery), "--query",
            str(images / "g03.png"), "-k", "6", "--threshold", str(value), "--json"]  # fmt: skip
    found = run_json(argv, capsys)
    assert found["threshold"] == {"value": value, "distance": "cosine", "rule": f"cosine >= {value:.6g}"}
    assert [n["id"] for n in found["results"][0]["neighbours"]] == [ids[i] for i in order[:3]]

    # the calibrated file: every kept score is within it, and nothing within it among the top k is dropped
    threshold = Threshold.from_json(run_dir / "threshold.json")
    found = run_json(["search", "--checkpoint", str(run_dir), "--gallery", str(gallery), "--query",
                      str(images), "-k", "5", "--threshold", str(run_dir / "threshold.json"), "--json"],
                     capsys)  # fmt: skip
    assert found["threshold"] == threshold.to_dict()
    for entry in found["results"]:
        similarity = unit[ids.index(entry["query"])] @ unit.T
        expected = [
            ids[i] for i in np.argsort(-similarity, kind="stable")[:5] if similarity[i] >= threshold.value
        ]
        assert [n["id"] for n in entry["neighbours"]] == expected
        assert all(n["score"] >= threshold.value for n in entry["neighbours"])


def test_a_query_without_a_match_is_reported(run_dir: Path, gallery: Path, tmp_path: Path, capsys) -> None:
    blank = tmp_path / "blank.png"
    Image.new("L", (16, 16)).save(blank)
    argv = ["search", "--checkpoint", str(run_dir), "--gallery", str(gallery), "--query", str(blank),
            "-k", "4", "--threshold", "0.99999"]  # fmt: skip
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "threshold: a match is cosine >= 0.99999" in table
    assert "query: blank.png  (cosine)\n  no match: none of the top 4 has cosine >= 0.99999" in table
    found = run_json([*argv, "--json"], capsys)
    assert found["results"] == [{"query": "blank.png", "neighbours": []}]


def test_bad_thresholds_fail_before_the_model_loads(
    run_dir: Path, images: Path, gallery: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the threshold was checked")

    monkeypatch.setattr(search_cli, "load_model", no_model)
    euclidean = Threshold(value=1.0, distance="euclidean", target_fmr=0.1, fmr=0.1, fnmr=0.2, num_positive=5,
                          num_negative=10, source="elsewhere")  # fmt: skip
    euclidean_file = euclidean.to_json(tmp_path / "euclidean.json")
    (tmp_path / "broken.json").write_text('{"format": "dmlkit-threshold", "version": 1, "value": 1}')
    base = ["search", "--checkpoint", str(run_dir), "--gallery", str(gallery), "--query", str(images)]
    for extra, code, message in (
        (["--threshold", "nan"], 2, "--threshold must be a finite number, got 'nan'"),
        (["--threshold", "inf"], 2, "--threshold must be a finite number"),
        (["--threshold", "-0.5", "--distance", "euclidean"], 2, "-0.5 is a negative euclidean distance"),
        (["--threshold", str(tmp_path / "none.json")], 2, "is neither a number nor an existing file"),
        (["--threshold", str(tmp_path / "broken.json")], 1, "broken.json lacks the key(s) distance"),
        (["--threshold", str(euclidean_file), "--distance", "cosine"], 2,
         "the threshold from elsewhere is a euclidean value, but --distance ranks by cosine"),
    ):  # fmt: skip
        assert main([*base, *extra]) == code, extra
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_a_threshold_takes_its_distance_and_checkpoint(
    run_dir: Path, images: Path, gallery: Path, tmp_path: Path, capsys
) -> None:
    """Without --distance a calibrated file searches by its own distance; a file calibrated on another
    checkpoint's embeddings is refused naming both fingerprints."""
    euclidean = Threshold(value=0.5, distance="euclidean", target_fmr=0.1, fmr=0.1, fnmr=0.2, num_positive=5,
                          num_negative=10)  # fmt: skip
    found = run_json(["search", "--checkpoint", str(run_dir), "--gallery", str(gallery), "--query",
                      str(images / "g01.png"), "-k", "3", "--threshold",
                      str(euclidean.to_json(tmp_path / "e.json")), "--json"], capsys)  # fmt: skip
    assert found["distance"] == "euclidean"
    assert all(n["score"] <= 0.5 for n in found["results"][0]["neighbours"])
    foreign = replace(euclidean, fingerprint="0" * 64)
    assert main(["search", "--checkpoint", str(run_dir), "--gallery", str(gallery), "--query", str(images),
                 "--threshold", str(foreign.to_json(tmp_path / "f.json"))]) == 2  # fmt: skip
    assert "fingerprint 0000000000000000" in capsys.readouterr().err


@pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")
def test_search_an_index_with_a_threshold(
    run_dir: Path, images: Path, calibrated: dict, tmp_path: Path, monkeypatch, capsys
) -> None:
    index = tmp_path / "index"
    assert main(["index", "build", "--checkpoint", str(run_dir), "--images", str(images), "--out", str(index),
                 "--no-progress"]) == 0  # fmt: skip
    capsys.readouterr()
    threshold_file = run_dir / "threshold.json"
    threshold = Threshold.from_json(threshold_file)
    query = ["search", "--index", str(index), "--query", str(images), "-k", "5"]
    everything = run_json([*query, "--json"], capsys)
    kept = run_json([*query, "--threshold", str(threshold_file), "--json"], capsys)
    assert kept["threshold"] == threshold.to_dict()
    for full, within in zip(everything["results"], kept["results"], strict=True):
        assert within["neighbours"] == [n for n in full["neighbours"] if n["score"] >= threshold.value]

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the threshold was checked")

    monkeypatch.setattr(index_cli, "load_model", no_model)
    euclidean = replace(threshold, distance="euclidean", source="e")
    assert main([*query, "--threshold", str(euclidean.to_json(tmp_path / "e.json"))]) == 2
    assert f"is a euclidean value, but index {index} ranks by cosine" in capsys.readouterr().err
    foreign = replace(threshold, fingerprint="f" * 64)
    assert main([*query, "--threshold", str(foreign.to_json(tmp_path / "f.json"))]) == 2
    assert "fingerprint ffffffffffffffff" in capsys.readouterr().err
