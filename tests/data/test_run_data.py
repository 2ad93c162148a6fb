"""``dmlkit.train.data`` and the ``data`` section's pipeline options: recipe, preprocessing precedence
(flag > recipe > backbone > dataset), ``num_workers auto``, the cache of a run, the worker warnings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.transforms import v2

from bad_images import truncated_jpeg
from dmlkit import data
from dmlkit.config import make_config
from dmlkit.data import transforms
from dmlkit.errors import ConfigError, UnknownNameError
from dmlkit.models import preprocessing
from dmlkit.train import data as run_data_module
from dmlkit.train.data import build_data, run_data

LITE = preprocessing.Preprocessing(
    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), input_size=240, interpolation="bicubic", crop_pct=0.9
)


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """``photos/c0 .. c7``: 8 classes × 4 small JPEGs."""
    rng = np.random.default_rng(0)
    for c in range(8):
        (tmp_path / "photos" / f"c{c}").mkdir(parents=True)
        for j in range(4):
            pixels = rng.integers(0, 256, (30 + j, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "photos" / f"c{c}" / f"{j}.jpg")
    return tmp_path / "photos"


@pytest.fixture
def lite_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every backbone asks for EfficientNet-Lite's preprocessing (0.5 / 0.5, 240 px, bicubic, 0.9)."""
    monkeypatch.setattr(run_data_module.preprocessing, "of_backbone", lambda name, **weights: LITE)


def _section(photos: Path | None = None, **fields: object):
    given = {"dataset": "folder", "data_root": str(photos)} if photos is not None else {}
    return make_config({**given, **fields}).data


def _resize(pipeline: v2.Compose) -> list[int]:
    return next(step.size for step in pipeline.transforms if isinstance(step, v2.Resize))


def test_without_options_the_spec_is_the_datasets() -> None:
    section = _section(dataset_args={"num_classes": 8, "samples_per_class": 4, "image_size": 16})
    splits = data.build("synthetic", None, num_classes=8, samples_per_class=4, image_size=16)
    assert build_data(section, 0, "small_cnn").spec == splits.spec()
    assert build_data(section, 0).spec["recipe"] == "glyph"


def test_the_backbone_preprocessing_reaches_photo_pipelines(photos: Path, lite_backbone: None) -> None:
    run = build_data(_section(photos), 0, "timm:anything")
    assert run.spec == {
        "image_size": 240, "channels": 3, "recipe": "photo", "mean": [0.5] * 3, "std": [0.5] * 3,
        "interpolation": "bicubic", "crop_pct": 0.9,
    }  # fmt: skip
    assert _resize(run.test.transform) == [266]  # floor(240 / 0.9)
    image, _, _ = run.test[0]
    assert image.shape == (3, 240, 240)
    assert run.train.transform.transforms[2].interpolation == v2.InterpolationMode.BICUBIC


def test_flags_beat_the_backbone(photos: Path, lite_backbone: None) -> None:
    flags = {"mean": [0.4], "std": [0.2], "image_size": 64, "interpolation": "bilinear", "crop_pct": 0.875}
    spec = build_data(_section(photos, **flags), 0, "timm:anything").spec
    assert spec["image_size"] == 64 and spec["mean"] == [0.4] and spec["std"] == [0.2]
    assert spec["interpolation"] == "bilinear" and spec["crop_pct"] == 0.875
    # image_size in the dataset's own arguments counts as the flag
    assert build_data(_section(photos, dataset_args={"image_size": 48}), 0, "timm:x").spec["image_size"] == 48
    with pytest.raises(ValueError, match="image_size is 64 but dataset_args sets image_size: 48"):
        _section(photos, image_size=64, dataset_args={"image_size": 48})


def test_big_fixes_its_size_and_crop_above_the_backbone(photos: Path, lite_backbone: None) -> None:
    run = build_data(_section(photos, augment="big"), 0, "timm:anything")
    assert run.spec["image_size"] == 256 and "crop_pct" not in run.spec and run.spec["mean"] == [0.5] * 3
    assert _resize(run.test.transform) == [256]  # Roth's big: resize 256, centre crop 256
    assert build_data(_section(photos, augment="big", image_size=128), 0, "timm:x").spec["image_size"] == 128


def test_glyphs_keep_their_statistics(lite_backbone: None) -> None:
    glyphs = {"num_classes": 8, "samples_per_class": 4, "image_size": 16}
    section = _section(dataset_args=glyphs)
    spec = build_data(section, 0, "timm:anything").spec
    assert spec["recipe"] == "glyph" and spec["image_size"] == 16 and spec["mean"] != [0.5]
    for key, value in (("interpolation", "bicubic"), ("crop_pct", 0.9)):
        with pytest.raises(ConfigError, match=f"{key}: the 'glyph' recipe"):
            build_data(section.model_copy(update={key: value}), 0)
    # a photo recipe on the glyphs takes the backbone's preprocessing
    photo = build_data(_section(dataset_args=glyphs, augment="base"), 0, "timm:x").spec
    assert photo["mean"] == [0.5] * 3 and photo["image_size"] == 16  # given in the dataset's arguments


def test_the_recipe_and_its_arguments_are_recorded(photos: Path) -> None:
    section = _section(photos, augment="randaugment", augment_args={"num_ops": 2}, image_size=32)
    run = build_data(section, 0)
    assert run.spec["recipe"] == "randaugment" and run.spec["recipe_args"] == {"num_ops": 2}
    steps = transforms.build("train", **run.spec).transforms
    assert any(isinstance(step, v2.RandAugment) and step.num_ops == 2 for step in steps)
    with pytest.raises(UnknownNameError, match="randaugment"):
        _section(photos, augment="randaugmnt")
    with pytest.raises(ConfigError, match="magnitude"):
        _section(photos, augment="randaugment", augment_args={"magnitude": 99})
    with pytest.raises(ValueError, match="1 or 3 values"):
        _section(photos, mean=[0.1, 0.2])
    with pytest.raises(ValueError, match="interpolation must be one of"):
        _section(photos, interpolation="lanczos")


@pytest.mark.parametrize(("cores", "expected"), [(1, 0), (2, 1), (16, 15), (128, 32)])
def test_num_workers_auto(monkeypatch: pytest.MonkeyPatch, cores: int, expected: int) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
    section = _section(num_workers="auto")
    assert section.num_workers == "auto" and section.workers == expected
    assert _section(num_workers=3).workers == 3
    with pytest.raises(ValueError, match="num_workers"):
        _section(num_workers=-1)
    with pytest.raises(ValueError, match="num_workers"):
        _section(num_workers="many")


def test_yaml_switches_read_as_gpu_decode_values() -> None:
    assert _section(gpu_decode=False).gpu_decode == "off"
    assert _section(gpu_decode="off").gpu_decode == "off"


def test_a_run_caches_every_part(photos: Path, tmp_path: Path) -> None:
    config = make_config({
        "dataset": "folder", "data_root": str(photos), "cache_size": 24, "cache_dir": str(tmp_path / "c"),
        "image_size": 16, "batch_size": 8, "samples_per_class": 2,
    })  # fmt: skip
    run = run_data(config)
    for part in run.parts():
        assert part.cache is not None and part.cache.size == 24
        assert min(part.load(0).shape[-2:]) == 24
    assert len(list((tmp_path / "c").glob("*.u8"))) == 3  # train, val and test
    with pytest.raises(ConfigError, match="cache_size: dataset 'synthetic' holds its images in memory"):
        run_data(make_config({"cache_size": 24}))


def test_corrupt_files_are_named_from_inside_workers(photos: Path, tmp_path: Path) -> None:
    """A file failing in a DataLoader worker (past a header-only check) is replaced with
    ``--skip-unreadable``, and the warning naming it reaches the terminal from the worker process (a test
    class: the run embeds every test image, with 2 workers, before training)."""
    bad = truncated_jpeg(photos / "c5" / "cut.jpg")
    argv = [
        sys.executable, "-m", "dmlkit", "train", "--output-dir", str(tmp_path / "runs"), "--name", "w",
        "--epochs", "1", "--dataset", "folder", "--data-root", str(photos), "--image-size", "16",
        "--verify-images", "header", "--skip-unreadable", "--num-workers", "2", "--batch-size", "8",
        "--samples-per-class", "2", "--no-progress", "--embedding-size", "8", "--metrics", "recall@1",
        "--select-metric", "recall@1", "--val-fraction", "0",
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=environment)
    assert done.returncode == 0, done.stderr
    assert f"cannot read image '{bad}': image file is truncated" in done.stderr
    assert "replaced by another image of class 'c5'" in done.stderr


def test_a_run_trains_with_a_recipe_a_cache_and_auto_workers(
    photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the training loop: the recipe and the resolved preprocessing are recorded in the checkpoint,
    and ``dmlkit eval``'s pipeline (``transforms.build("eval", **data_spec)``) is the run's."""
    from dmlkit.train import checkpoint
    from dmlkit.train.loop import Trainer

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})  # auto: 1 worker
    config = make_config({
        "output_dir": str(tmp_path / "runs"), "name": "recipe", "epochs": 1, "progress": False,
        "dataset": "folder", "data_root": str(photos), "augment": "randaugment",
        "augment_args": {"num_ops": 2}, "image_size": 24, "crop_pct": 0.8, "cache_size": 32,
        "num_workers": "auto", "val_fraction": 0, "batch_size": 8, "samples_per_class": 2,
        "embedding_size": 8, "metrics": ["recall@1"], "select_metric": "recall@1",
    })  # fmt: skip
    result = Trainer(config).run()
    spec = checkpoint.load(result.run_dir / "best.pt")["data_spec"]
    recipe = {"recipe": "randaugment", "recipe_args": {"num_ops": 2}}
    assert spec == {"image_size": 24, "channels": 3, **recipe, "crop_pct": 0.8}
    assert _resize(transforms.build("eval", **spec)) == [30]


def test_the_loop_trains_on_gpu_pipeline_batches(
    photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop takes the GPU pipeline's batches through ``train_loader`` (run here on the CPU, as if the
    device allowed it) and trains on them."""
    from dmlkit.data.gpu_pipeline import GpuLoader
    from dmlkit.train.loop import Trainer

    monkeypatch.setattr(run_data_module, "uses_gpu_pipeline", lambda section, data, device: True)
    config = make_config({
        "output_dir": str(tmp_path / "runs"), "name": "gpu", "epochs": 1, "progress": False,
        "dataset": "folder", "data_root": str(photos), "augment": "base", "image_size": 24, "num_workers": 1,
        "val_fraction": 0, "batch_size": 8, "samples_per_class": 2, "embedding_size": 8,
        "metrics": ["recall@1"], "select_metric": "recall@1",
    })  # fmt: skip
    trainer = Trainer(config)
    result = trainer.run()
    assert isinstance(trainer.loader, GpuLoader) and "recall@1" in result.after
