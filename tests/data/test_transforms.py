from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dmlkit.data import transforms
from dmlkit.errors import ConfigError, UnknownNameError


def _photo(width: int = 60, height: int = 40) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_photo_pipelines_give_normalised_square_tensors() -> None:
    for kind in ("train", "eval"):
        out = transforms.build(kind, 32)(_photo())
        assert type(out) is torch.Tensor and out.dtype == torch.float32 and out.shape == (3, 32, 32)
    eval_tf = transforms.build("eval", 32)
    torch.testing.assert_close(eval_tf(_photo()), eval_tf(_photo()))
    names = [type(t).__name__ for t in eval_tf.transforms]
    assert names[1:3] == ["Resize", "CenterCrop"] and eval_tf.transforms[1].size == [int(32 * 1.14)]
    names = [type(t).__name__ for t in transforms.build("train", 32).transforms]
    assert names[1:3] == ["RandomResizedCrop", "RandomHorizontalFlip"]


def test_normalisation_statistics() -> None:
    gray = Image.fromarray(np.full((10, 10), 128, dtype=np.uint8))
    out = transforms.build("eval", 8, channels=1)(gray)
    mean, std = np.mean(transforms.IMAGENET_MEAN), np.mean(transforms.IMAGENET_STD)
    torch.testing.assert_close(out, torch.full((1, 8, 8), float((128 / 255 - mean) / std)))
    glyph = torch.full((1, 28, 28), 51, dtype=torch.uint8)
    out = transforms.build("eval", 32, 1, recipe="glyph", mean=[0.1], std=[0.2], native_size=28)(glyph)
    torch.testing.assert_close(out, torch.full((1, 32, 32), (0.2 - 0.1) / 0.2))


def test_glyph_train_augments_without_resizing() -> None:
    glyph = torch.zeros((1, 16, 16), dtype=torch.uint8)
    glyph[:, 4:12, 7:9] = 255
    train_tf = transforms.build("train", 16, 1, recipe="glyph")
    torch.manual_seed(0)
    outs = [train_tf(glyph) for _ in range(4)]
    assert all(o.shape == (1, 16, 16) for o in outs)
    assert not all(torch.equal(outs[0], o) for o in outs[1:])


def test_bad_arguments() -> None:
    with pytest.raises(UnknownNameError, match="eval"):
        transforms.build("evaluate", 32)
    with pytest.raises(UnknownNameError, match="glyph"):
        transforms.build("train", 32, recipe="glyf")
    with pytest.raises(ConfigError, match="mean"):
        transforms.build("eval", 32, channels=3, mean=[0.1, 0.2])
