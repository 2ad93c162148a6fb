"""``load_image_tensor``: libjpeg-turbo for JPEGs, Pillow for the rest, the same images and errors as
``load_image`` (Pillow, the reference)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from bad_images import png_header, truncated_jpeg
from dmlkit.data import images
from dmlkit.errors import ConfigError, DataError


def _reference(path: Path, channels: int = 3) -> torch.Tensor:
    return images.pil_to_tensor(images.load_image(path, channels))


def _jpeg(path: Path, shape: tuple[int, ...], orientation: int | None = None, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
    if orientation is None:
        image.save(path, quality=90)
    else:
        exif = image.getexif()
        exif[0x0112] = orientation
        image.save(path, quality=90, exif=exif)
    return path


@pytest.mark.parametrize("orientation", [None, 1, 2, 3, 4, 5, 6, 7, 8])
def test_jpegs_decode_like_pillow_with_exif_orientation(tmp_path: Path, orientation: int | None) -> None:
    path = _jpeg(tmp_path / "photo.jpg", (30, 50, 3), orientation)
    got = images.load_image_tensor(path)
    expected = (3, 30, 50) if (orientation or 1) < 5 else (3, 50, 30)  # 5–8 swap the sides
    assert got.dtype == torch.uint8 and got.shape == expected
    assert torch.equal(got, _reference(path))


def test_gray_jpegs_and_channels(tmp_path: Path) -> None:
    gray = _jpeg(tmp_path / "gray.jpg", (20, 24))
    colour = _jpeg(tmp_path / "colour.jpg", (20, 24, 3))
    for path in (gray, colour):
        for channels in (1, 3):
            got = images.load_image_tensor(path, channels)
            assert got.shape == (channels, 20, 24)
            assert torch.equal(got, _reference(path, channels)), (path.name, channels)


def test_other_files_go_through_pillow(tmp_path: Path) -> None:
    Image.fromarray(np.full((6, 5), 40000, dtype=np.uint16)).save(tmp_path / "deep.png")
    Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(tmp_path / "cyan.jpg", quality=100)
    Image.new("RGBA", (3, 3), (255, 0, 0, 128)).save(tmp_path / "half.png")
    for name in ("deep.png", "cyan.jpg", "half.png"):
        for decoder in images.DECODERS:
            got = images.load_image_tensor(tmp_path / name, decoder=decoder)
            assert torch.equal(got, _reference(tmp_path / name)), name
    assert images.load_image_tensor(tmp_path / "deep.png", 1).unique().tolist() == [round(40000 / 257)]


def test_jpeg_header_matches_pillow(tmp_path: Path) -> None:
    for shape, components in (((31, 47, 3), 3), ((12, 9), 1)):
        path = _jpeg(tmp_path / "x.jpg", shape)
        header = images.jpeg_header(path.read_bytes())
        assert header is not None
        assert (header.height, header.width, header.components, header.precision) == (
            shape[0], shape[1], components, 8
        )  # fmt: skip
        assert not header.exif
    Image.fromarray(np.zeros((10, 20, 3), np.uint8)).save(tmp_path / "p.jpg", progressive=True)
    assert images.jpeg_header((tmp_path / "p.jpg").read_bytes()).width == 20  # type: ignore[union-attr]
    assert images.jpeg_header(_jpeg(tmp_path / "o.jpg", (4, 4, 3), 6).read_bytes()).exif  # type: ignore[union-attr]
    Image.new("CMYK", (8, 8)).save(tmp_path / "cmyk.jpg")
    cmyk = images.jpeg_header((tmp_path / "cmyk.jpg").read_bytes())
    assert cmyk is not None and cmyk.components == 4 and not images.gpu_decodable(cmyk, 3)
    for junk in (b"", b"\x89PNG\r\n", b"\xff\xd8\xff\xe0\x00", b"\xff\xd8\xff\xd9"):
        assert images.jpeg_header(junk) is None


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_is_pillows_exif_transpose(tmp_path: Path, orientation: int) -> None:
    path = _jpeg(tmp_path / "o.jpg", (6, 10, 3), orientation)
    data = path.read_bytes()
    assert images.exif_orientation(data) == orientation
    with Image.open(path) as raw:
        stored = images.pil_to_tensor(raw.convert("RGB"))
        upright = images.pil_to_tensor(ImageOps.exif_transpose(raw).convert("RGB"))
    assert torch.equal(images.orient(stored, orientation), upright)


def test_errors_are_the_same_as_pillows(tmp_path: Path) -> None:
    cut = truncated_jpeg(tmp_path / "cut.jpg")
    with pytest.raises(DataError, match=r"cut\.jpg': image file is truncated"):
        images.load_image_tensor(cut)
    with pytest.raises(DataError, match=r"nowhere\.jpg': No such file"):
        images.load_image_tensor(tmp_path / "nowhere.jpg")
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(DataError, match=r"text\.jpg': not an image file"):
        images.load_image_tensor(tmp_path / "text.jpg")
    with pytest.raises(ConfigError, match="decoder"):
        images.load_image_tensor(cut, decoder="opencv")


def test_pixel_limit_is_checked_on_the_jpeg_header(tmp_path: Path) -> None:
    path = _jpeg(tmp_path / "big.jpg", (40, 50, 3))
    with pytest.raises(
        images.ImageTooLargeError, match=r"2,000 pixels \(50×40\), more than the limit of 1,999"
    ):
        images.load_image_tensor(path, max_pixels=1999)
    assert images.load_image_tensor(path, max_pixels=2000).shape == (3, 40, 50)
    huge = png_header(tmp_path / "huge.png", 20_000, 10_000)  # Pillow's path keeps its own check
    with pytest.raises(images.ImageTooLargeError, match="200,000,000 pixels"):
        images.load_image_tensor(huge)


def test_no_deprecation_warning_per_call(tmp_path: Path) -> None:
    """torchvision 0.29's decode_jpeg wrapper warns at every call; dmlkit calls its operators."""
    path = _jpeg(tmp_path / "x.jpg", (8, 8, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        images.load_image_tensor(path)
        images.decode_jpegs([torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)], 3)


def test_real_clothing_photos_decode_identically(clothing_paths: list[str]) -> None:
    for path in clothing_paths[:40]:
        assert torch.equal(images.load_image_tensor(path), _reference(Path(path)))
