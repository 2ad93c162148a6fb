"""``dmlkit.data.images``: what every decoded image looks like, the pixel limit and the build-time check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bad_images import png_header, truncated_jpeg
from dmlkit.data import images
from dmlkit.errors import ConfigError, DataError


def _pixels(path: Path, channels: int = 3) -> np.ndarray:
    return np.asarray(images.load_image(path, channels))


@pytest.mark.parametrize("value", [0, 257, 32768, 65535])
def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path: Path, value: int) -> None:
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((6, 5), value, dtype=np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"
    expected = round(value / 257)
    assert np.all(_pixels(path, 1) == expected) and _pixels(path, 1).shape == (6, 5)
    assert np.all(_pixels(path, 3) == expected) and _pixels(path, 3).shape == (6, 5, 3)


def test_32_bit_integer_and_float_grayscale(tmp_path: Path) -> None:
    Image.fromarray(np.full((4, 4), 65535, dtype=np.int32)).save(tmp_path / "wide.tif")
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(tmp_path / "float.tif")
    assert Image.open(tmp_path / "wide.tif").mode == "I" and Image.open(tmp_path / "float.tif").mode == "F"
    assert np.all(_pixels(tmp_path / "wide.tif", 1) == 255)
    assert np.all(_pixels(tmp_path / "float.tif", 3) == 128)


def test_transparency_is_composited_onto_white(tmp_path: Path) -> None:
    palette = Image.new("P", (4, 2), 0)
    palette.putpalette([0, 0, 0, 200, 10, 20] + [0] * 762)
    palette.paste(1, (2, 0, 4, 2))
    palette.save(tmp_path / "palette.png", transparency=0)
    rgb = _pixels(tmp_path / "palette.png")
    assert rgb[0, 0].tolist() == [255, 255, 255] and rgb[0, 3].tolist() == [200, 10, 20]

    Image.new("LA", (3, 3), (0, 0)).save(tmp_path / "la.png")
    Image.new("LA", (3, 3), (0, 255)).save(tmp_path / "la_opaque.png")
    assert np.all(_pixels(tmp_path / "la.png", 1) == 255) and np.all(
        _pixels(tmp_path / "la_opaque.png", 1) == 0
    )

    Image.new("RGBA", (3, 3), (255, 0, 0, 128)).save(tmp_path / "half.png")
    assert _pixels(tmp_path / "half.png")[1, 1].tolist() == [255, 127, 127]


def test_cmyk_and_one_bit(tmp_path: Path) -> None:
    Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(tmp_path / "cyan.jpg", quality=100)
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(tmp_path / "paper.jpg", quality=100)
    assert Image.open(tmp_path / "cyan.jpg").mode == "CMYK"
    np.testing.assert_allclose(_pixels(tmp_path / "cyan.jpg")[4, 4], [0, 255, 255], atol=2)
    np.testing.assert_allclose(_pixels(tmp_path / "paper.jpg")[4, 4], [255, 255, 255], atol=2)
    bits = Image.new("1", (4, 4), 0)
    bits.paste(1, (0, 0, 2, 4))
    bits.save(tmp_path / "bits.png")
    assert _pixels(tmp_path / "bits.png", 1)[0].tolist() == [255, 255, 0, 0]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    """Orientation 6: the camera was turned, the viewer rotates 90° clockwise; 30 × 10 stored → 10 × 30."""
    stored = np.zeros((10, 30, 3), dtype=np.uint8)
    stored[:, :10] = (0, 0, 255)  # the left third is blue: after the rotation it is the top third
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "turned.jpg", exif=exif.tobytes(), quality=100)
    upright = images.load_image(tmp_path / "turned.jpg")
    assert upright.size == (10, 30)
    pixels = np.asarray(upright).astype(int)
    assert pixels[2, 5, 2] > 200 and pixels[2, 5, 0] < 50  # top: blue
    assert pixels[-2, 5].max() < 50  # bottom: black
    assert images.load_image(tmp_path / "turned.jpg", 1).size == (10, 30)


def test_pixel_limit_is_dmlkits_own(tmp_path: Path) -> None:
    default_limit = Image.MAX_IMAGE_PIXELS
    small = tmp_path / "small.png"
    Image.new("RGB", (20, 10)).save(small)
    with pytest.raises(images.ImageTooLargeError, match=r"small\.png.*200 pixels \(20×10\).*limit of 199"):
        images.load_image(small, max_pixels=199)
    assert images.load_image(small, max_pixels=200).size == (20, 10)

    huge = png_header(tmp_path / "huge.png", 20_000, 10_000)
    with pytest.raises(DataError, match=r"huge\.png.*200,000,000 pixels.*178,956,970.*--max-image-pixels"):
        images.load_image(huge)
    # a higher limit or none: opened without Pillow's global check (header only here: no decoding)
    for limit in (200_000_000, None):
        with images.open_image(huge, limit) as opened:
            assert opened.size == (20_000, 10_000)
    assert default_limit == Image.MAX_IMAGE_PIXELS  # Pillow's process-wide limit was never touched


def test_failures_name_the_file_and_cause(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"cannot read image '.*nowhere\.png': No such file"):
        images.load_image(tmp_path / "nowhere.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(DataError, match=r"text\.png': not an image file Pillow can identify"):
        images.load_image(tmp_path / "text.png")
    with pytest.raises(DataError, match=r"cut\.jpg': image file is truncated"):
        images.load_image(truncated_jpeg(tmp_path / "cut.jpg"))


def test_header_check_misses_a_truncated_jpeg_full_decode_does_not(tmp_path: Path) -> None:
    cut = str(truncated_jpeg(tmp_path / "cut.jpg"))
    assert images.check_image(cut, full=False) == (None, 48 * 48)
    problem, _ = images.check_image(cut, full=True)
    assert problem is not None and "truncated" in problem
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8)).save(good)
    paths = [str(good), cut]
    assert images.verify_images(paths, False, "src", mode="header").tolist() == [True, True]
    for mode in ("full", "auto"):  # auto: 2 small images are far below the budget, so decoded
        with pytest.raises(DataError, match=r"1 of 2 image\(s\) in 'src' cannot be used: '.*cut\.jpg'"):
            images.verify_images(paths, False, "src", mode=mode)
    with pytest.warns(UserWarning, match=r"skipped 1 .*cut\.jpg.*truncated"):
        assert images.verify_images(paths, True, "src", mode="full").tolist() == [True, False]
    with pytest.raises(ConfigError, match=r"verify_images.*'fast'"):
        images.verify_images(paths, False, "src", mode="fast")


def test_auto_decodes_below_the_pixel_budget_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cut = str(truncated_jpeg(tmp_path / "cut.jpg"))  # 2,304 pixels
    assert images.resolve_verify_mode("auto", images.FULL_VERIFY_PIXEL_BUDGET) == "full"
    assert images.resolve_verify_mode("auto", images.FULL_VERIFY_PIXEL_BUDGET + 1) == "header"
    monkeypatch.setattr(images, "FULL_VERIFY_PIXEL_BUDGET", 2_000)
    with caplog.at_level("INFO", logger="dmlkit.data.images"):
        assert images.verify_images([cut], False, "src", mode="auto").tolist() == [True]  # headers only
    # the user is told that only headers were checked, and how to check everything
    assert "only their headers were checked" in caplog.text and "--verify-images full" in caplog.text


def test_full_check_runs_in_threads_and_names_every_bad_file(tmp_path: Path) -> None:
    paths = []
    for i in range(40):
        path = tmp_path / f"{i:02d}.jpg"
        if i in (7, 31):
            truncated_jpeg(path, seed=i)
        else:
            Image.new("RGB", (16, 16), (i, i, i)).save(path)
        paths.append(str(path))
    expected = r"2 of 40 image\(s\) in 'src' cannot be used: .*07\.jpg': image file is truncated.*31\.jpg'"
    with pytest.raises(DataError, match=expected):
        images.verify_images(paths, False, "src", mode="full")


def test_find_overlap_by_path_and_content(tmp_path: Path) -> None:
    for name, value in (("a", 1), ("b", 2), ("copy_of_a", 1)):
        Image.new("L", (4, 4), value).save(tmp_path / f"{name}.png")
    (tmp_path / "sub").mkdir()
    first = [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    second = [str(tmp_path / "sub" / ".." / "b.png"), str(tmp_path / "copy_of_a.png")]
    assert images.find_overlap(first, second, "path") == [(first[1], second[0])]
    assert images.find_overlap(first, second, "content") == [(first[0], second[1]), (first[1], second[0])]
    assert images.find_overlap(first, second, "none") == []
    with pytest.raises(ConfigError, match="overlap_check"):
        images.find_overlap(first, second, "hash")
