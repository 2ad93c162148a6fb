"""``dmlkit train --ssl``: the ``unlabelled`` dataset, two views per image, the batches the objective sees,
a run end to end (checkpoints, resume, no retrieval metrics without labels) and the options refused before
any data or model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dmlkit import data as data_lib
from dmlkit import samplers
from dmlkit.cli import main
from dmlkit.config import make_config
from dmlkit.data.views import TwoViews, collate_views
from dmlkit.errors import ConfigError, DataError
from dmlkit.train import checkpoint as ckpt
from dmlkit.train.data import run_data, train_loader
from tests_support import TINY_DATA

NUM_IMAGES = 12


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """12 random PNGs of varied sizes, a third of them one and two folders down, plus files that are no
    images (a text file, a hidden PNG) that the listing must leave out."""
    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
        folder = root / ("a/b" if i % 3 == 0 else "a" if i % 3 == 1 else "")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (18 + i, 22, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:02d}.png")
    (root / "notes.txt").write_text("not an image")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / ".hidden.png")
    return root


def ssl_argv(root: Path, out: Path, name: str, *extra: str, epochs: int = 1) -> list[str]:
    return [
        "train", "--ssl", "--dataset", "unlabelled", "--data-root", str(root), "--image-size", "16",
        "--embedding-size", "8", "--batch-size", "4", "--epochs", str(epochs), "--output-dir", str(out),
        "--name", name, "--deterministic", "--no-progress", *extra,
    ]  # fmt: skip


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines() if line]


# ---------------------------------------------------------------------------------------------- the data


def test_unlabelled_lists_every_image_at_any_depth(photos: Path) -> None:
    splits = data_lib.build("unlabelled", str(photos), image_size=16)
    train = splits.train
    assert splits.test is None and splits.val is None and len(train) == NUM_IMAGES
    assert sorted(train.ids) == train.ids and "a/b/img00.png" in train.ids and "img02.png" in train.ids
    assert not any(".hidden" in item or item.endswith(".txt") for item in train.ids)
    np.testing.assert_array_equal(train.labels, np.arange(NUM_IMAGES))  # each image its own class
    assert train[5][0].shape == (3, 16, 16)
    top = data_lib.build("unlabelled", str(photos), recursive=False, image_size=16).train
    assert sorted(top.ids) == [f"img{i:02d}.png" for i in range(2, NUM_IMAGES, 3)]
    assert not data_lib.CATALOG.get("unlabelled").labelled


def test_unlabelled_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"dataset folder not found: '{tmp_path / 'nowhere'}'"):
        data_lib.build("unlabelled", str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no images")
    with pytest.raises(DataError, match=f"'{tmp_path / 'empty'}' holds no images below it"):
        data_lib.build("unlabelled", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="needs root"):
        data_lib.build("unlabelled")


def test_two_views_are_independent_reproducible_augmentations(photos: Path) -> None:
    train = data_lib.build("unlabelled", str(photos), image_size=16).train
    train.augment_seed = 3
    views = TwoViews(train)
    first, label, index = views[4]
    assert first.shape == (2, 3, 16, 16) and label == index == 4
    torch.testing.assert_close(first[0], train[4][0])  # view 0 is what supervised training would draw
    assert not torch.equal(first[0], first[1])
    torch.testing.assert_close(views[4][0], first)  # a pure function of (seed, epoch, index, view)
    train.set_epoch(1)
    assert not torch.equal(views[4][0], first)
    images, labels, indices = collate_views([views[2], views[7], views[5]])
    assert images.shape == (6, 3, 16, 16)
    assert labels.tolist() == indices.tolist() == [2, 7, 5, 2, 7, 5]
    torch.testing.assert_close(images[1], views[7][0][0])
    torch.testing.assert_close(images[4], views[7][0][1])


def test_training_batches_hold_both_views_labelled_by_index(photos: Path, tmp_path: Path) -> None:
    config = make_config(
        {"ssl": True, "dataset": "unlabelled", "data_root": str(photos), "image_size": 16, "batch_size": 4,
         "loss": "ntxent", "output_dir": str(tmp_path)}
    )  # fmt: skip
    assert config.data.sampler.name == "random" and config.data.val_fraction == 0.0  # the ssl defaults
    data = run_data(config)
    sampler = samplers.build("random", labels=data.train.labels, batch_size=4, seed=0)
    images, labels, indices = next(iter(train_loader(data, sampler, config, torch.device("cpu"))))
    assert images.shape == (8, 3, 16, 16)
    assert torch.equal(labels[:4], labels[4:]) and torch.equal(labels, indices)
    assert len(set(labels[:4].tolist())) == 4
    assert not torch.equal(images[:4], images[4:])


# ---------------------------------------------------------------------------------------------- runs


def test_ssl_run_on_an_unlabelled_folder_trains_checkpoints_and_resumes(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    assert main(ssl_argv(photos, out, "straight", "--loss", "ntxent", epochs=2)) == 0
    straight = out / "straight"
    rows = history(straight)
    assert [row["epoch"] for row in rows] == [1, 2]
    assert all(np.isfinite(row["train_loss"]) and row["train_loss"] > 0 for row in rows)
    assert not any(key.startswith("val/") for row in rows for key in row)
    assert (straight / "last.pt").is_file() and (straight / "best.pt").is_file()
    results = json.loads((straight / "results.json").read_text())
    assert results["test_before"] == {} and results["test_after"] == {}
    assert results["selection"]["method"] == "last_epoch"
    log = (straight / "train.log").read_text()
    assert log.count("has no labels: no validation or test split") == 1

    # one epoch, then resumed to two: the same weights as the straight run (views replay by seed)
    assert main(ssl_argv(photos, out, "resumed", "--loss", "ntxent", epochs=1)) == 0
    assert main(["train", "--resume", str(out / "resumed"), "--epochs", "2"]) == 0
    a = ckpt.load(straight / "last.pt")["model"]
    b = ckpt.load(out / "resumed" / "last.pt")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
    assert [row["epoch"] for row in history(out / "resumed")] == [1, 2]


@pytest.mark.parametrize(
    "loss",
    [
        ["--loss", "vicreg"],
        ["--loss", "self_supervised", "--loss-args", "{loss: contrastive, symmetric: false}"],
        ["--loss", "supcon", "--miner", "multisimilarity"],
        ["--loss", "contrastive", "--xbm-size", "0.5"],
    ],
)
def test_ssl_losses_train_on_a_labelled_dataset_and_are_evaluated(loss: list[str], tmp_path: Path) -> None:
    """--ssl on a labelled dataset: training ignores the labels, validation and test measure retrieval."""
    name = loss[1]
    argv = [
        "train", "--ssl", *loss, "--dataset-args", json.dumps(TINY_DATA), "--val-fraction", "0.25",
        "--embedding-size", "8", "--batch-size", "8", "--epochs", "1", "--output-dir", str(tmp_path),
        "--name", name, "--no-progress", "--metrics", "recall@1,map@r", "--select-metric", "map@r",
    ]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((tmp_path / name / "results.json").read_text())
    assert set(results["test_after"]) == {"recall@1", "map@r"}
    assert results["selection"]["method"] == "validation"
    row = history(tmp_path / name)[0]
    assert np.isfinite(row["train_loss"])
    if name == "contrastive":  # each image's two views: a positive pair each way
        assert row["loss/num_pos_pairs"] == 2 * 8
    if "--xbm-size" in loss:  # the memory's copies of an image are excluded by index: negatives only
        assert row["xbm/active"] == 1.0 and row["xbm/fill"] > 0
        assert row["xbm/loss/num_pos_pairs"] == 0 and row["xbm/loss/num_neg_pairs"] > 0


# ---------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sampler", "m_per_class"], "sampler 'm_per_class' draws P classes × K images"),
        (["--loss", "proxyanchor"], "loss 'proxyanchor' needs embedding_size, num_classes"),
        (["--loss", "multiple", "--loss-args", "{losses: [ntxent, arcface]}"], "loss 'arcface' needs"),
        (["--val-fraction", "0.2"], "dataset 'unlabelled' has no labels to validate with"),
        (["--gpu-decode", "off", "--loss", "self_supervised", "--loss-args", "{loss: softtriple}"],
         "self_supervised cannot wrap loss 'softtriple'"),
        (["--loss", "vicreg", "--xbm-size", "8"], "cannot use a cross-batch memory"),
        (["--loss", "vicreg", "--miner", "batch_hard"], "takes no miner"),
        (["--scheduler", "plateau"], "steps on validation, but val_fraction is 0"),
    ],
)  # fmt: skip
def test_bad_ssl_options_fail_before_any_data_is_read(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the folder does not exist: a failure naming the option proves nothing was read before it
    assert main(ssl_argv(tmp_path / "missing", tmp_path / "runs", "bad", *extra)) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "runs").exists()


def test_two_view_losses_and_unlabelled_data_need_ssl(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="loss 'vicreg' compares two augmented views of each image"):
        make_config({"loss": "vicreg"})
    with pytest.raises(ConfigError, match="loss 'self_supervised' compares two augmented views"):
        make_config({"loss": "multiple", "loss_args": {"losses": ["contrastive", "self_supervised"]}})
    with pytest.raises(ConfigError, match="dataset 'unlabelled' has no labels: train on it self-supervised"):
        make_config({"dataset": "unlabelled", "data_root": str(tmp_path)})


def test_eval_of_an_unlabelled_run_asks_for_a_labelled_dataset(
    photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "runs"
    assert main(ssl_argv(photos, out, "run", "--loss", "ntxent")) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "run" / "best.pt")]) == 2
    assert "no test split: evaluate the checkpoint on a labelled dataset" in capsys.readouterr().err
    argv = ["eval", "--checkpoint", str(out / "run" / "best.pt"), "--dataset", "synthetic"]
    assert main([*argv, "--dataset-args", json.dumps(TINY_DATA), "--json"]) == 0
    assert "map@r" in json.loads(capsys.readouterr().out)["metrics"]
