"""``dmlkit.data.augment``: the named recipes against the torchvision pipelines they stand for."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from dmlkit.data import ArrayImageDataset, augment, transforms
from dmlkit.errors import ConfigError, DataError, UnknownNameError

MEAN, STD = transforms.IMAGENET_MEAN, transforms.IMAGENET_STD


def _photo(height: int = 90, width: int = 120, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (3, height, width), dtype=np.uint8))


def _reference(steps: list[object]) -> v2.Compose:
    """A torchvision pipeline written out by hand: the recipe's steps between uint8 input and Normalize."""
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD), v2.ToPureTensor()]
    return v2.Compose([v2.ToImage(), *steps, *tail])


def _same_under_seed(ours: v2.Compose, reference: v2.Compose, image: torch.Tensor, seeds: range) -> None:
    for seed in seeds:
        torch.manual_seed(seed)
        got = ours(image)
        torch.manual_seed(seed)
        torch.testing.assert_close(got, reference(image), rtol=0, atol=1e-5)


def test_every_recipe_is_registered_and_listed() -> None:
    assert augment.available() == ["adv", "base", "big", "glyph", "photo", "randaugment", "red", "test"]
    with pytest.raises(UnknownNameError, match="randaugment"):
        augment.build("randaugmnet")
    with pytest.raises(UnknownNameError, match="num_ops"):
        augment.build("randaugment", num_op=2)


BILINEAR = v2.InterpolationMode.BILINEAR


@pytest.mark.parametrize(
    ("name", "args", "steps"),
    [
        ("base", {}, [v2.RandomResizedCrop(64, antialias=True), v2.RandomHorizontalFlip(0.5)]),
        (
            "photo",
            {"scale": [0.2, 1.0]},
            [v2.RandomResizedCrop(64, scale=(0.2, 1.0), antialias=True), v2.RandomHorizontalFlip(0.5)],
        ),
        ("red", {}, [v2.Resize(73, antialias=True), v2.RandomCrop(64), v2.RandomHorizontalFlip(0.5)]),
        (
            "adv",
            {},
            [
                v2.RandomResizedCrop(64, antialias=True),
                v2.RandomGrayscale(0.2),
                v2.ColorJitter(0.2, 0.2, 0.2, 0.2),
                v2.RandomHorizontalFlip(0.5),
            ],
        ),
        (
            "randaugment",
            {},
            [
                v2.RandomResizedCrop(64, antialias=True),
                v2.RandomHorizontalFlip(0.5),
                v2.RandAugment(num_ops=3),
            ],
        ),
        ("test", {}, [v2.Resize(73, antialias=True), v2.CenterCrop(64)]),
    ],
)
def test_train_recipes_are_the_published_pipelines(name: str, args: dict, steps: list[object]) -> None:
    """Roth et al.'s base / red / adv, Berton et al.'s RandAugment(3 ops), the test recipe: the same draws
    and pixels as the torchvision pipeline written out (red and test resize to 64 / 0.875 = 73)."""
    ours = transforms.build("train", 64, recipe=name, recipe_args=args)
    _same_under_seed(ours, _reference(steps), _photo(), range(6))


def test_big_is_base_at_256_evaluated_at_256() -> None:
    big = augment.build("big")
    assert big.default_size == 256 and big.default_crop_pct == 1.0
    evaluation = transforms.build("eval", 256, recipe="big")
    reference = _reference([v2.Resize(256, antialias=True), v2.CenterCrop(256)])
    image = _photo(300, 400)
    torch.testing.assert_close(evaluation(image), reference(image), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("recipe", "crop_pct", "resize"),
    [
        ("base", None, 256),
        ("photo", None, 255),
        ("base", 0.95, 235),
        ("photo", 224 / 232, 232),
        ("big", None, 224),
    ],
)
def test_evaluation_resize_follows_crop_pct(recipe: str, crop_pct: float | None, resize: int) -> None:
    """Shorter side to floor(size / crop_pct) (timm's rule: 256 for 224 at 0.875, torchvision's 232 at
    224/232), or photo's historical int(1.14 · size) = 255."""
    pipeline = transforms.build("eval", 224, recipe=recipe, crop_pct=crop_pct)
    resizes = [step for step in pipeline.transforms if isinstance(step, v2.Resize)]
    assert resizes[0].size == [resize]
    assert pipeline(_photo(300, 400)).shape == (3, 224, 224)


def test_interpolation_reaches_every_resize() -> None:
    for kind in ("train", "eval"):
        pipeline = transforms.build(kind, 32, recipe="red", interpolation="bicubic")
        modes = [step.interpolation for step in pipeline.transforms if hasattr(step, "interpolation")]
        assert modes and set(modes) == {v2.InterpolationMode.BICUBIC}
    with pytest.raises(ConfigError, match="interpolation"):
        transforms.build("eval", 32, interpolation="lanczos5")


def test_recipe_arguments_are_checked() -> None:
    for name, args, match in [
        ("base", {"scale": [0.5, 0.1]}, "scale"),
        ("base", {"scale": [0.5, 1.5]}, "scale"),
        ("base", {"flip": 2.0}, "flip"),
        ("adv", {"jitter": 0.9}, "jitter"),
        ("randaugment", {"magnitude": 40}, "magnitude"),
        ("glyph", {"translate": [0.1, 1.5]}, "translate"),
    ]:
        with pytest.raises(ConfigError, match=match):
            augment.build(name, **args)
    with pytest.raises(ConfigError, match="crop_scale"):
        transforms.build("train", 32, crop_scale=(0.2, 1.0), recipe_args={"scale": [0.3, 1.0]})


def test_randaugment_is_deterministic_per_item_and_epoch() -> None:
    """Through the dataset's per-item seeding: same (seed, epoch, index) → same image, whatever the order;
    another epoch → another augmentation."""
    images = torch.stack([_photo(40, 50, seed) for seed in range(4)])
    dataset = ArrayImageDataset(images, [0, 0, 1, 1], ["a", "b"], ["0", "1", "2", "3"])
    dataset.transform = transforms.build("train", 32, recipe="randaugment")
    dataset.augment_seed = 5
    first = [dataset[i][0] for i in range(4)]
    torch.manual_seed(123)  # the global state does not matter
    assert all(torch.equal(dataset[i][0], first[i]) for i in reversed(range(4)))
    dataset.set_epoch(1)
    assert not any(torch.equal(dataset[i][0], first[i]) for i in range(4))


def test_randaugment_and_adv_work_on_gray_images() -> None:
    gray = _photo(40, 50)[:1]
    for name in ("randaugment", "adv"):
        for seed in range(5):
            torch.manual_seed(seed)
            assert transforms.build("train", 24, 1, recipe=name)(gray).shape == (1, 24, 24)


def test_only_resized_crop_recipes_have_a_crop_plan() -> None:
    plans = {name: augment.build(name).crop_plan() for name in augment.available()}
    assert {name for name, plan in plans.items() if plan is not None} == {"base", "big", "photo"}
    assert plans["base"] == augment.CropPlan((0.08, 1.0), (3 / 4, 4 / 3), 0.5)


def test_normalise_is_todtype_and_normalize_fused() -> None:
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    reference = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    fused = transforms.Normalise(mean, std)
    for image in (_photo(), _photo().float() / 255.0):  # uint8, and float in [0, 1]
        out = fused(image)
        assert type(out) is torch.Tensor and out.dtype == torch.float32
        torch.testing.assert_close(out, reference(image).as_subclass(torch.Tensor), rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="std must be positive"):
        transforms.Normalise([0.5], [0.0])
    with pytest.raises(DataError, match="1 channel"):
        transforms.Normalise(mean, std)(_photo()[:1])
