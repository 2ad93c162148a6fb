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

Two decoders give the same images: :func:`load_image` (Pillow, a PIL image) and :func:`load_image_tensor`
(a ``uint8`` ``C × H × W`` tensor, what the datasets feed their pipelines). The tensor decoder reads baseline
and progressive 8-bit JPEGs (the bulk of photo datasets) with ``torchvision.io.decode_jpeg`` (libjpeg-turbo,
EXIF orientation applied; ≈ 1.3–2× Pillow per core, see BENCHMARKS.md) after checking their size against the
pixel limit from the frame header; every other file (PNG, GIF, WebP, CMYK JPEGs, colour JPEGs asked for as
gray, or a JPEG libjpeg-turbo refuses) goes through Pillow, so errors and conversions stay the ones above.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import struct
import warnings
from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision import io as tv_io

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


#: The image decoders of :func:`load_image_tensor`: ``torchvision`` (libjpeg-turbo for 8-bit JPEGs, Pillow
#: for the rest) and ``pil`` (Pillow for everything).
DECODERS: tuple[str, ...] = ("torchvision", "pil")
Decoder = Literal["torchvision", "pil"]

# Start-of-frame markers (baseline, extended, progressive, lossless; Huffman or arithmetic): the segment
# that holds the frame's precision, size and component count. C4 (DHT), C8 (JPG) and CC (DAC) are not.
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_EXIF_ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class JpegHeader:
    """What a JPEG's frame header says: ``height`` × ``width`` pixels (as stored, before any EXIF
    orientation), ``components`` (1 gray, 3 YCbCr/RGB, 4 CMYK/YCCK), sample ``precision`` in bits, and
    whether an EXIF segment (which may hold an orientation) precedes the frame."""

    height: int
    width: int
    components: int
    precision: int
    exif: bool


def jpeg_header(data: bytes | bytearray | memoryview) -> JpegHeader | None:
    """The frame header of the JPEG ``data`` (ITU T.81 B.2: markers ``FF xx``, then a big-endian length
    for every segment but SOI, RSTn and TEM), or None when ``data`` is not a JPEG or has no readable
    frame header before the first scan (the caller then leaves the file to Pillow)."""
    if bytes(data[:3]) != b"\xff\xd8\xff":
        return None
    position, size, exif = 2, len(data), False
    while position + 4 <= size:
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # TEM, SOI, RSTn: no length field
            position += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or a scan before any frame header
            return None
        length = (data[position + 2] << 8) | data[position + 3]
        if marker == 0xE1 and bytes(data[position + 4 : position + 10]) == b"Exif\x00\x00":
            exif = True
        if marker in _SOF_MARKERS:
            if position + 10 > size:
                return None
            frame = data[position + 4 : position + 10]
            height, width = (frame[1] << 8) | frame[2], (frame[3] << 8) | frame[4]
            if height == 0 or width == 0:  # height given later by a DNL segment: rare, Pillow's job
                return None
            return JpegHeader(height, width, frame[5], frame[0], exif)
        position += 2 + length
    return None


def exif_orientation(data: bytes | bytearray | memoryview, header: JpegHeader | None = None) -> int:
    """The EXIF orientation (1–8; 1: as stored) of the JPEG ``data``: read with Pillow from the header
    segments only, and only when the file has an EXIF segment (most photo datasets have none)."""
    header = header if header is not None else jpeg_header(data)
    if header is None or not header.exif:
        return 1
    with Image.open(io.BytesIO(data)) as image:
        value = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    return int(value) if isinstance(value, int) and 1 <= value <= 8 else 1


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """``image`` (``… × H × W``) turned upright for EXIF ``orientation``, as ``ImageOps.exif_transpose``
    does (a view: flips and transposes only, on any device)."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-1).flip(-2)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-1, -2)
    if orientation == 6:
        return image.transpose(-1, -2).flip(-1)
    if orientation == 7:
        return image.transpose(-1, -2).flip(-1).flip(-2)
    if orientation == 8:
        return image.transpose(-1, -2).flip(-2)
    return image


def read_bytes(path: str | Path) -> bytearray:
    """The bytes of ``path`` in a writable buffer (``torch.frombuffer`` needs one; no extra copy);
    ``DataError`` naming the file when it cannot be read."""
    try:
        with open(path, "rb") as handle:
            buffer = bytearray(os.fstat(handle.fileno()).st_size)
            handle.readinto(buffer)
    except OSError as exc:
        raise DataError(f"cannot read image '{path}': {describe_failure(exc)}") from exc
    return buffer


def gpu_decodable(header: JpegHeader | None, channels: int) -> bool:
    """Whether libjpeg-turbo / nvJPEG give exactly the image Pillow would: an 8-bit JPEG of 1 or 3
    components, asked for as RGB, or a gray one asked for as gray (a colour JPEG turned gray is left to
    Pillow, whose luma rounding is the reference; CMYK / YCCK JPEGs too)."""
    if header is None or header.precision != 8:
        return False
    return header.components == 1 or (header.components == 3 and channels == 3)


def jpeg_ops_available() -> bool:
    """Whether torchvision's compiled JPEG decoders are there (the ``image`` extension loaded)."""
    try:
        return hasattr(torch.ops.image, "decode_jpeg")
    except (AttributeError, RuntimeError):
        return False


def decode_jpegs(
    data: Sequence[torch.Tensor], channels: int, device: torch.device | str = "cpu", *, exif: bool = False
) -> list[torch.Tensor]:
    """Decode JPEG bytes (1-D ``uint8`` CPU tensors) into ``uint8`` ``channels × H × W`` images: libjpeg-turbo
    one by one on the CPU (``exif``: EXIF orientation applied), nvJPEG as one batch on a CUDA ``device`` (no
    orientation there: :func:`orient` does it). A ``RuntimeError`` when a file cannot be decoded.

    The operators behind ``torchvision.io.decode_jpeg`` (``torch.ops.image.decode_jpeg`` /
    ``decode_jpegs_cuda``), called directly: since torchvision 0.29 that wrapper warns on every call that
    decoding moves to TorchCodec, and silencing it would mean changing the process-wide warning filters.
    """
    mode = (tv_io.ImageReadMode.GRAY if channels == 1 else tv_io.ImageReadMode.RGB).value
    device = torch.device(device)
    if device.type == "cuda":
        return list(torch.ops.image.decode_jpegs_cuda(list(data), mode, device))
    return [torch.ops.image.decode_jpeg(item, mode, exif) for item in data]


def _check_pixels(path: str | Path, width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError.of(path, (width, height), max_pixels)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """A mode ``L`` / ``RGB`` PIL image as a ``uint8`` ``C × H × W`` tensor (one copy)."""
    array = np.asarray(image)
    tensor = torch.from_numpy(array.copy())
    return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1)


def load_image_tensor(
    path: str | Path,
    channels: int = 3,
    *,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    decoder: str = "torchvision",
) -> torch.Tensor:
    """:func:`load_image` as a ``uint8`` ``channels × H × W`` tensor: the same image, the same errors.

    ``decoder`` (:data:`DECODERS`): ``torchvision`` decodes 8-bit JPEGs with libjpeg-turbo (after the pixel
    limit is checked on the frame header) and falls back to Pillow for other files, and for a JPEG that
    libjpeg-turbo refuses (Pillow then decodes it or names why not, e.g. ``image file is truncated``);
    ``pil`` always uses Pillow.
    """
    if decoder not in DECODERS:
        raise ConfigError(f"decoder must be one of {', '.join(DECODERS)}, got '{decoder}'")
    if decoder == "torchvision":
        data = read_bytes(path)
        header = jpeg_header(data)
        if gpu_decodable(header, channels) and jpeg_ops_available():
            assert header is not None
            _check_pixels(path, header.width, header.height, max_pixels)
            try:
                return decode_jpegs([torch.frombuffer(data, dtype=torch.uint8)], channels, exif=header.exif)[
                    0
                ]
            except RuntimeError:
                pass  # Pillow decodes it or says why it cannot, in the words of every other failure
    return pil_to_tensor(load_image(path, channels, max_pixels=max_pixels))


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
    "DECODERS",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "EMBED_EXTENSIONS",
    "FULL_VERIFY_PIXEL_BUDGET",
    "IMAGE_EXTENSIONS",
    "OVERLAP_CHECKS",
    "VERIFY_MODES",
    "Decoder",
    "ImageTooLargeError",
    "JpegHeader",
    "OverlapCheck",
    "VerifyMode",
    "check_image",
    "decode_jpegs",
    "describe_failure",
    "exif_orientation",
    "find_overlap",
    "gpu_decodable",
    "image_files",
    "jpeg_header",
    "jpeg_ops_available",
    "load_image",
    "load_image_tensor",
    "open_image",
    "orient",
    "pil_to_tensor",
    "read_bytes",
    "resolve_verify_mode",
    "to_channels",
    "verify_images",
]
