"""Bad image files for the data and reliability tests, built in a test's ``tmp_path``."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def truncated_jpeg(path: Path, size: int = 48, seed: int = 0) -> Path:
    """A JPEG cut in the middle of its pixel data: the header parses, decoding fails."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, quality=90)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width × height`` (8-bit gray) with one row of data: enough for Pillow to
    open it (and refuse it for its size), never decoded here."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(width + 1)))
        + chunk(b"IEND", b"")
    )
    return path
