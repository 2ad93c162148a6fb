from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dmlkit.data import transforms
from dmlkit.errors import ConfigError, DataError, UnknownNameError


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
    assert names[:4] == ["MatchChannels", "ToImage", "Resize", "CenterCrop"]
    assert eval_tf.transforms[2].size == [int(32 * 1.14)]
    names = [type(t).__name__ for t in transforms.build("train", 32).transforms]
    assert names[2:4] == ["RandomResizedCrop", "RandomHorizontalFlip"]


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


def _spec(recipe: str, channels: int) -> dict[str, object]:
    """A checkpoint's ``data_spec``: a 16 px glyph model (native size 16) or a 24 px photo model."""
    if recipe == "glyph":
        return {"image_size": 16, "channels": channels, "recipe": "glyph", "mean": [0.2], "std": [0.3],
                "native_size": 16}  # fmt: skip
    return {"image_size": 24, "channels": channels, "recipe": "photo"}


@pytest.mark.parametrize("kind", ["train", "eval"])
@pytest.mark.parametrize(("recipe", "channels"), [("glyph", 1), ("glyph", 3), ("photo", 1), ("photo", 3)])
def test_every_pipeline_yields_the_recorded_size_and_channels(kind: str, recipe: str, channels: int) -> None:
    """Whatever comes in (PIL of any mode or size, uint8 tensors of 1/2/3/4 channels), what comes out is
    ``channels × image_size × image_size``: a checkpoint's pipeline applies to any dataset."""
    spec = _spec(recipe, channels)
    size = int(spec["image_size"])  # type: ignore[call-overload]
    pipeline = transforms.build(kind, **spec)  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    inputs = [
        Image.fromarray(rng.integers(0, 256, (105, 105), dtype=np.uint8)),  # Omniglot original, L
        _photo(60, 40),
        _photo(17, 90).convert("RGBA"),
        Image.fromarray(np.full((30, 20), 40000, dtype=np.uint16)),  # I;16
        torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8),
        torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8),
        torch.randint(0, 256, (4, 9, 9), dtype=torch.uint8),
        torch.randint(0, 256, (2, 16, 16), dtype=torch.uint8),
        torch.randint(0, 256, (20, 20), dtype=torch.uint8),
    ]
    outputs = [pipeline(image) for image in inputs]
    assert all(type(o) is torch.Tensor and o.dtype == torch.float32 for o in outputs)
    assert {tuple(o.shape) for o in outputs} == {(channels, size, size)}
    assert torch.stack(outputs).isfinite().all()  # a DataLoader batch of mixed sources collates


def test_glyphs_are_resized_only_when_their_size_differs() -> None:
    glyph = torch.randint(0, 256, (1, 16, 16), dtype=torch.uint8)
    out = transforms.build("eval", **_spec("glyph", 1))(glyph)  # type: ignore[arg-type]
    torch.testing.assert_close(out, (glyph.float() / 255 - 0.2) / 0.3)  # untouched but normalised
    big = transforms.build("eval", **{**_spec("glyph", 1), "native_size": 16})  # type: ignore[arg-type]
    upscaled = torch.zeros((1, 105, 105), dtype=torch.uint8)
    upscaled[:, :, 52:] = 255
    left, right = big(upscaled)[0, 8, 2], big(upscaled)[0, 8, 13]
    assert float(left) == pytest.approx(-0.2 / 0.3) and float(right) == pytest.approx(0.8 / 0.3)


def test_channel_conversion_matches_the_decoder() -> None:
    """RGB → gray of a tensor gives Pillow's ``convert("L")`` (the decoder's), gray → RGB repeats."""
    photo = _photo(12, 10)
    to_gray = transforms.MatchChannels(1)
    from_tensor = to_gray(torch.from_numpy(np.asarray(photo).copy()).permute(2, 0, 1))
    from_pil = np.asarray(to_gray(photo))
    assert from_tensor.dtype == torch.uint8 and from_tensor.shape == (1, 10, 12)
    assert np.abs(from_tensor[0].numpy().astype(int) - from_pil.astype(int)).max() <= 1
    gray = torch.randint(0, 256, (1, 5, 5), dtype=torch.uint8)
    assert torch.equal(transforms.MatchChannels(3)(gray), gray.expand(3, -1, -1))
    transparent = torch.zeros((4, 2, 2), dtype=torch.uint8)  # RGBA, alpha 0: white, like the decoder
    assert torch.equal(
        transforms.MatchChannels(3)(transparent), torch.full((3, 2, 2), 255, dtype=torch.uint8)
    )
    with pytest.raises(DataError, match="5-channel"):
        transforms.MatchChannels(3)(torch.zeros((5, 2, 2), dtype=torch.uint8))
    with pytest.raises(ConfigError, match="channels"):
        transforms.build("eval", 8, channels=2)
