"""Image files: the accepted extensions, one listing helper, one decoder and the build-time check.

Every path → PIL image decoding in dmlkit goes through :func:`load_image` (datasets, ``dmlkit embed`` /
``search`` / landmark benchmarks), so a broken file always raises the same ``DataError`` naming it, and every
image comes out the same way whatever its file stores:

- EXIF orientation applied (``ImageOps.exif_transpose``), before any crop;
- 16-bit and 32-bit integer grayscale (modes ``I;16*``, ``I``) scaled from 0–65535 to 0–255, float grayscale
  (``F``) read as 0–1; 8-bit conversion by Pillow would clip them to white;
- transparency (``RGBA``, ``LA``, ``PA``, palette or colour-key ``transparency``) composited onto white, the
  paper / product-shot background, instead of exposing whatever colour transparent pixels happen to hold;
- then mode ``L`` (one channel) or ``RGB`` (``CMYK``, ``YCbCr``, 1-bit, palette: Pillow's conversion).

Images with more pixels than a limit are refused with the pixel count and the limit (a decompression-bomb
guard, like Pillow's own). dmlkit applies its own limit, passed per call, instead of setting Pillow's
process-wide ``Image.MAX_IMAGE_PIXELS``: no global state changes, and threads with different limits coexist.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import struct
import warnings
from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from dmlkit.errors import ConfigError, DataError

_log = logging.getLogger(__name__)

_PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

#: Extensions (lower case; matched in any case) of the images the ``folder`` and ``csv`` datasets use.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(_PHOTO_EXTENSIONS)
#: Extensions ``dmlkit embed`` / ``search`` accept, in the order a suffix-less CSV entry tries them: the
#: dataset ones plus GIF and TIFF (kept apart so that the datasets' file lists stay as they are).
EMBED_EXTENSIONS: tuple[str, ...] = (*_PHOTO_EXTENSIONS, ".gif", ".tif", ".tiff")

#: The default pixel limit: Pillow's own refusal threshold, 2 × its shipped ``Image.MAX_IMAGE_PIXELS``
#: (89,478,485 = 1024³ // 4 // 3: a third of the pixels of a 1 GiB RGBA image). ``None``: no limit.
DEFAULT_MAX_IMAGE_PIXELS = 2 * 89_478_485

#: How the build-time check reads files: ``header`` parses headers (``Image.verify``: fast, misses
#: truncated or corrupt pixel data), ``full`` decodes every image as training will, ``auto`` picks ``full``
#: when the images total at most :data:`FULL_VERIFY_PIXEL_BUDGET` pixels, else ``header``.
VERIFY_MODES: tuple[str, ...] = ("auto", "header", "full")
VerifyMode = Literal["auto", "header", "full"]

#: ``auto`` decodes everything when the images (sizes read from the headers) total at most this many pixels:
#: decoding costs ≈ 7 ns per pixel and core (a 500 × 375 JPEG: 1.3 ms), so 4·10⁹ pixels are ≈ 30 s on one
#: core. That covers e.g. CUB-200 (11,788 images, ≈ 2·10⁹ pixels) and the clothing photos (5,756 images,
#: 0.2·10⁹ pixels: 1.4–1.7 s on 2 busy cores against 0.3–0.5 s for the headers), not SOP (120,053 images).
FULL_VERIFY_PIXEL_BUDGET = 4_000_000_000

#: Grayscale modes holding more than 8 bits (Pillow would clip them to 0–255 when converting to ``L``).
_WIDE_GRAY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_BACKGROUND = (255, 255, 255, 255)  # transparent pixels become white


_RAISE_LIMIT = "raise it with max_image_pixels / --max-image-pixels N, or none for no limit"


class ImageTooLargeError(DataError):
    """An image has more pixels than the limit (``max_image_pixels``); the message gives both.

    ``reason`` is the message without the path (for lists of files). Constructible from the message alone,
    as torch re-creates an error raised in a DataLoader worker.
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason if reason is not None else message

    @classmethod
    def of(cls, path: str | Path, size: tuple[int, int], max_pixels: int) -> ImageTooLargeError:
        """The error for ``path`` of ``size`` (width, height) above ``max_pixels``."""
        width, height = size
        reason = (
            f"{width * height:,} pixels ({width}×{height}), more than the limit of {max_pixels:,} "
            f"(a decompression-bomb guard; {_RAISE_LIMIT})"
        )
        return cls(f"image '{path}' is too large: {reason}", reason)


def image_files(
    folder: Path, *, recursive: bool = True, extensions: Collection[str] = IMAGE_EXTENSIONS, skip_hidden: bool
) -> list[Path]:
    """Sorted files below ``folder`` (or directly in it) whose lower-cased suffix is in ``extensions``.

    ``skip_hidden`` leaves out every path with a component (below ``folder``) starting with ``.``.
    """
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        path
        for path in found
        if path.suffix.lower() in extensions
        and not (skip_hidden and any(part.startswith(".") for part in path.relative_to(folder).parts))
        and path.is_file()
    )


@contextlib.contextmanager
def _open_unchecked(path: str | Path) -> Iterator[Image.Image]:
    """``Image.open`` without Pillow's decompression-bomb check, which reads the process-wide
    ``Image.MAX_IMAGE_PIXELS``: the format is identified as ``Image.open`` does, through Pillow's plugin
    registry (``Image.ID`` / ``Image.OPEN``, what ``Image.register_open`` fills). Only used once Pillow
    refused a file for its size; the caller applies dmlkit's own limit."""
    Image.init()
    with open(path, "rb") as handle:
        prefix = handle.read(16)
        for name in Image.ID:
            factory, accept = Image.OPEN[name]
            accepted = accept(prefix) if accept is not None else True
            if not accepted or isinstance(accepted, str):  # a string: "looks like it, but unsupported"
                continue
            handle.seek(0)
            try:
                image = factory(handle, str(path))
            except (SyntaxError, IndexError, TypeError, struct.error):  # what Image.open skips too
                continue
            with image:
                yield image
            return
    raise Image.UnidentifiedImageError(f"cannot identify image file '{path}'")


@contextlib.contextmanager
def open_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Iterator[Image.Image]:
    """The opened (not yet decoded) image of ``path``; :class:`ImageTooLargeError` above ``max_pixels``.

    Other failures propagate as PIL / OS exceptions (:func:`load_image` and :func:`check_image` turn them
    into messages naming the file).
    """
    try:
        opened: contextlib.AbstractContextManager[Image.Image] = Image.open(path)
    except Image.DecompressionBombError:
        # Pillow's own limit (a global) refused it: identify the file without it and apply ours below
        opened = _open_unchecked(path)
    with opened as image:
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise ImageTooLargeError.of(path, image.size, max_pixels)
        yield image


def to_channels(image: Image.Image, channels: int) -> Image.Image:
    """``image`` as mode ``L`` (``channels == 1``) or ``RGB``, wide grayscale scaled and transparency
    composited onto white (see the module docstring)."""
    if image.mode in _WIDE_GRAY_MODES or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        # F: floats in [0, 1]; I: the 16-bit data of PNG and TIFF files as Pillow reads it
        scale = 255.0 if image.mode == "F" else 255.0 / 65535.0
        image = Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8))
    elif image.mode in _ALPHA_MODES or "transparency" in image.info:
        background = Image.new("RGBA", image.size, _BACKGROUND)
        image = Image.alpha_composite(background, image.convert("RGBA"))
    target = "L" if channels == 1 else "RGB"
    return image if image.mode == target else image.convert(target)


def _decode(path: str | Path, channels: int, max_pixels: int | None) -> Image.Image:
    with open_image(path, max_pixels) as image:
        ImageOps.exif_transpose(image, in_place=True)  # decodes; orientation before any crop
        return to_channels(image, channels)


def describe_failure(exc: BaseException) -> str:
    """Why a file could not be used, without its path: the OS error text, Pillow's message, the pixel
    count against the limit, or the exception's name."""
    if isinstance(exc, ImageTooLargeError):
        return exc.reason
    if isinstance(exc, Image.DecompressionBombError):  # a plugin's own check while decoding (GIF frames)
        return f"{exc} ({_RAISE_LIMIT})"
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not an image file Pillow can identify"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror  # e.g. "No such file or directory"
    return str(exc) or type(exc).__name__


def load_image(
    path: str | Path, channels: int = 3, *, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> Image.Image:
    """Decode ``path`` into mode ``L`` (``channels == 1``) or ``RGB``, EXIF orientation applied (see the
    module docstring); ``DataError`` names the file and the cause, :class:`ImageTooLargeError` (a
    ``DataError``) when it has more than ``max_pixels`` pixels (``None``: no limit)."""
    try:
        return _decode(path, channels, max_pixels)
    except ImageTooLargeError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read image '{path}': {describe_failure(exc)}") from exc


def check_image(
    path: str | Path, full: bool, channels: int = 3, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> tuple[str | None, int]:
    """``(problem, pixels)`` of one file: ``problem`` is None when it passes (``full``: it decodes as with
    :func:`load_image`; else its header parses and ``Image.verify`` passes), else why not
    (:func:`describe_failure`); ``pixels`` is its size (0 when it could not be read)."""
    try:
        if full:
            image = _decode(path, channels, max_pixels)
            return None, image.width * image.height
        with open_image(path, max_pixels) as opened:
            pixels = opened.width * opened.height
            opened.verify()
        return None, pixels
    except Exception as exc:
        return describe_failure(exc), 0


def _threads(full: bool) -> int:
    """Threads of the check: parsing headers waits on I/O, so a few per core; decoding keeps a core busy
    (Pillow releases the GIL while decoding), so about one per core, which also bounds how many decoded
    images are held at once."""
    cores = os.cpu_count() or 1
    return max(4, cores) if full else min(32, max(8, 2 * cores))


def _check_all(
    paths: Sequence[str], full: bool, channels: int, max_pixels: int | None
) -> tuple[list[str | None], np.ndarray]:
    with ThreadPoolExecutor(max_workers=_threads(full)) as pool:
        results = list(
            pool.map(
                lambda p: check_image(p, full, channels, max_pixels), paths, chunksize=16 if full else 64
            )
        )
    problems = [problem for problem, _ in results]
    pixels = np.fromiter((count for _, count in results), dtype=np.int64, count=len(paths))
    return problems, pixels


def resolve_verify_mode(mode: str, total_pixels: int) -> str:
    """``header`` or ``full`` for ``mode`` (``auto``: ``full`` up to :data:`FULL_VERIFY_PIXEL_BUDGET`)."""
    if mode not in VERIFY_MODES:
        raise ConfigError(f"verify_images must be one of {', '.join(VERIFY_MODES)}, got '{mode}'")
    if mode == "auto":
        return "full" if total_pixels <= FULL_VERIFY_PIXEL_BUDGET else "header"
    return mode


def verify_images(
    paths: Sequence[str],
    skip_unreadable: bool,
    source: str,
    *,
    mode: str = "auto",
    channels: int = 3,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """Check every file before any training (threads); boolean mask of the good ones.

    ``mode`` (:data:`VERIFY_MODES`): ``header`` parses headers, ``full`` decodes every image as
    :func:`load_image` will (to ``channels``), ``auto`` parses the headers and then decodes everything when
    the images total at most :data:`FULL_VERIFY_PIXEL_BUDGET` pixels. Images above ``max_pixels`` fail too.
    Failures raise one ``DataError`` naming ``source``, the count and the first files with their causes,
    unless ``skip_unreadable``: they are then dropped with a warning giving the same.
    """
    paths = [str(p) for p in paths]
    resolve_verify_mode(mode, 0)  # a bad mode fails before any file is read
    problems, pixels = _check_all(paths, mode == "full", channels, max_pixels)
    if mode == "auto" and resolve_verify_mode(mode, int(pixels.sum())) == "header":
        _log.info(
            "verify_images auto: the %d images of '%s' total %.1f·10⁹ pixels, above the full-decode budget "
            "(%.0f·10⁹): only their headers were checked; a file that fails to decode stops the run when it "
            "is loaded (--verify-images full checks every pixel; --skip-unreadable replaces such files)",
            len(paths),
            source,
            pixels.sum() / 1e9,
            FULL_VERIFY_PIXEL_BUDGET / 1e9,
        )
    elif mode == "auto":
        good = [i for i, problem in enumerate(problems) if problem is None]
        decoded, _ = _check_all([paths[i] for i in good], True, channels, max_pixels)
        for i, problem in zip(good, decoded, strict=True):
            problems[i] = problem
    bad = [(path, problem) for path, problem in zip(paths, problems, strict=True) if problem is not None]
    if bad:
        more = " ..." if len(bad) > 3 else ""
        shown = "; ".join(f"'{path}': {problem}" for path, problem in bad[:3]) + more
        if not skip_unreadable:
            raise DataError(
                f"{len(bad)} of {len(paths)} image(s) in '{source}' cannot be used: {shown} "
                "(skip_unreadable / --skip-unreadable drops them)"
            )
        warnings.warn(
            f"skipped {len(bad)} of {len(paths)} image(s) in '{source}' that cannot be used: {shown}",
            stacklevel=3,
        )
    return np.fromiter((problem is None for problem in problems), dtype=bool, count=len(paths))


#: What :func:`find_overlap` compares: the resolved path, the file's content (BLAKE2b), or nothing.
OVERLAP_CHECKS: tuple[str, ...] = ("path", "content", "none")
OverlapCheck = Literal["path", "content", "none"]


def _file_digest(path: str) -> str:
    digest = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise DataError(f"cannot read image '{path}': {describe_failure(exc)}") from exc
    return digest.hexdigest()


def _keys(paths: Sequence[str], by: str) -> list[str]:
    if by == "path":
        return [os.path.realpath(p) for p in paths]  # symlinks and ../ spellings of one file meet
    with ThreadPoolExecutor(max_workers=_threads(False)) as pool:
        return list(pool.map(_file_digest, paths, chunksize=64))


def find_overlap(first: Sequence[str], second: Sequence[str], by: str = "path") -> list[tuple[str, str]]:
    """Pairs ``(a, b)`` of files of ``first`` and ``second`` that are the same image, ``by`` ``path``
    (resolved) or ``content`` (BLAKE2b of the bytes), in the order of ``first`` (one pair per file of
    ``first``); ``none``: no check."""
    if by not in OVERLAP_CHECKS:
        raise ConfigError(f"overlap_check must be one of {', '.join(OVERLAP_CHECKS)}, got '{by}'")
    if by == "none" or not first or not second:
        return []
    second_by_key = dict(zip(_keys(second, by), second, strict=True))
    return [
        (a, second_by_key[key])
        for a, key in zip(first, _keys(first, by), strict=True)
        if key in second_by_key
    ]


__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "EMBED_EXTENSIONS",
    "FULL_VERIFY_PIXEL_BUDGET",
    "IMAGE_EXTENSIONS",
    "OVERLAP_CHECKS",
    "VERIFY_MODES",
    "ImageTooLargeError",
    "OverlapCheck",
    "VerifyMode",
    "check_image",
    "describe_failure",
    "find_overlap",
    "image_files",
    "load_image",
    "open_image",
    "resolve_verify_mode",
    "to_channels",
    "verify_images",
]
