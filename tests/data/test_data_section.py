"""The ``data`` section's file options (``skip_unreadable``, ``verify_images``, ``max_image_pixels``): flags,
validation, and how they reach the datasets that read files."""

from __future__ import annotations

import pytest

from dmlkit.cli import build_parser
from dmlkit.config import ComponentSpec, TrainConfig, config_from_args, make_config
from dmlkit.data.images import DEFAULT_MAX_IMAGE_PIXELS
from dmlkit.errors import ConfigError


def parse(argv: list[str]) -> TrainConfig:
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_defaults_reach_no_dataset() -> None:
    data = make_config({}).data
    assert (data.skip_unreadable, data.verify_images, data.max_image_pixels) == (
        False, "auto", DEFAULT_MAX_IMAGE_PIXELS,
    )  # fmt: skip
    assert data.file_options() == {} and data.dataset_kwargs() == {}


def test_flags_are_folded_into_file_datasets_only() -> None:
    data = parse(
        ["--dataset", "folder", "--data-root", "x", "--dataset-args", "image_size=32",
         "--verify-images", "full", "--max-image-pixels", "none", "--skip-unreadable"]
    ).data  # fmt: skip
    assert data.max_image_pixels is None and data.verify_images == "full"
    assert data.dataset_kwargs() == {
        "image_size": 32, "skip_unreadable": True, "verify_images": "full", "max_image_pixels": None,
    }  # fmt: skip
    assert parse(["--dataset", "csv", "--max-image-pixels", "1000"]).data.dataset_kwargs() == {
        "max_image_pixels": 1000
    }
    # a section copied onto a dataset that reads no files (``dmlkit eval --dataset synthetic``): not passed
    other = data.model_copy(update={"dataset": ComponentSpec(name="synthetic")})
    assert other.dataset_kwargs() == {}


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--verify-images", "full"], "verify_images: dataset 'synthetic' reads no image files"),
        (["--max-image-pixels", "5"], "max_image_pixels: dataset 'synthetic' reads no image files"),
        (["--skip-unreadable"], "skip_unreadable: dataset 'synthetic' reads no image files"),
        (["--dataset", "folder", "--max-image-pixels", "0"], "max_image_pixels"),
        (["--dataset", "folder", "--max-image-pixels", "many"], "max_image_pixels"),
        (["--dataset", "folder", "--verify-images", "header", "--dataset-args", "verify_images=full"],
         "verify_images is 'header' but dataset_args sets verify_images: 'full'"),
    ],
)  # fmt: skip
def test_bad_file_options_are_config_errors(argv: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse(argv)


def test_bad_verify_mode_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(["--verify-images", "fast"])
    assert "'fast'" in capsys.readouterr().err


def test_same_value_in_both_places_is_accepted() -> None:
    data = parse(
        ["--dataset", "folder", "--verify-images", "full", "--dataset-args", "verify_images=full"]
    ).data
    assert data.dataset_kwargs() == {"verify_images": "full"}
