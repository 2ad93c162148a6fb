"""A decoded-image cache at a reduced size (``--cache-size 256``), shared by every DataLoader worker.

Small datasets are decoded once, before training: each image is decoded as the dataset would
(:func:`~dmlkit.data.images.load_image_tensor`), its shorter side brought down to ``size`` when longer
(bilinear, antialiased, ``uint8``; ``torchvision``'s ``Resize(size)`` rule for the longer side: ``int(size ·
long / short)``), and the pixels are stored one after the other in a single flat ``uint8`` buffer:

- in memory (``directory=None``): a shared-memory tensor. Forked DataLoader workers share its pages; spawned
  ones receive a handle to the same memory through torch's multiprocessing pickler: no per-worker copy;
- on disk (``directory``): a file mapped read-only (``numpy.memmap``) by each process, named after a hash of
  the files' paths, sizes and modification times and of the cache's settings, so a later run over the same
  files reuses it and a changed file rebuilds it.

The memory cost is the sum of ``channels · h · w`` bytes over the images (reported when built): e.g. the
5,756 clothing photos (≈ 176 × 215) hold ≈ 0.65 GB at any ``size`` ≥ 176; CUB-200's 11,788 images at 256 px
≈ 2.7 GB. A cached image is what the training and evaluation pipelines then crop and resize: augmentation
stays a pure function of (seed, epoch, index), only its input is the reduced image.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.transforms import v2

from dmlkit.data.images import DEFAULT_MAX_IMAGE_PIXELS, load_image_tensor
from dmlkit.errors import ConfigError, DataError

_log = logging.getLogger(__name__)

#: Bumped when the stored layout or the resize changes, so older cache files are not reused.
CACHE_FORMAT = 1


def reduce(image: torch.Tensor, size: int) -> torch.Tensor:
    """``image`` (``C × H × W`` ``uint8``) with its shorter side brought down to ``size`` (kept when not
    longer), as ``torchvision.transforms.v2.Resize(size, antialias=True)`` does."""
    if min(image.shape[-2:]) <= size:
        return image
    return v2.functional.resize(image, [size], antialias=True)


def _threads() -> int:
    # decoding and resizing release the GIL: about one thread per core
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(2, cores)


class DecodedCache:
    """Rows of decoded ``uint8`` images at a reduced size in one flat buffer (see the module docstring).

    ``rows[i]`` is the stored row of item ``i`` (views made by :meth:`select` share the buffer), ``offsets``
    and ``shapes`` locate each stored row in the buffer; a row whose file failed to decode while building
    (with ``skip_unreadable``) has offset −1 and is decoded (and replaced) at load time instead.
    """

    def __init__(
        self,
        offsets: np.ndarray,
        shapes: np.ndarray,
        size: int,
        *,
        storage: torch.Tensor | None = None,
        path: str | None = None,
        rows: np.ndarray | None = None,
    ) -> None:
        if (storage is None) == (path is None):
            raise ValueError("a cache lives either in memory (storage) or in a file (path)")
        self.offsets, self.shapes, self.size = offsets, shapes, size
        self.rows = np.arange(len(offsets)) if rows is None else rows
        self.storage, self.path = storage, path
        self._mapped: np.memmap | None = None

    # -- building --------------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        paths: Sequence[str],
        size: int,
        *,
        channels: int = 3,
        max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        decoder: str = "torchvision",
        directory: str | Path | None = None,
        skip_unreadable: bool = False,
    ) -> DecodedCache:
        """Decode ``paths`` (threads) into a cache at shorter side ``size``: in shared memory, or in a file
        under ``directory`` (reused when it was built from the same files with the same settings).

        A file that fails to decode raises its ``DataError`` unless ``skip_unreadable`` (its row is then
        left out, and the dataset decodes it, or replaces it, when it is loaded).
        """
        if size < 1:
            raise ConfigError(f"cache_size must be positive, got {size}")
        paths = [str(p) for p in paths]
        settings = {"size": size, "channels": channels, "max_pixels": max_pixels, "decoder": decoder}
        if directory is not None:
            found = cls._reuse(paths, settings, Path(directory))
            if found is not None:
                return found

        def decode(path: str) -> torch.Tensor | None:
            try:
                return reduce(load_image_tensor(path, channels, max_pixels=max_pixels, decoder=decoder), size)
            except DataError:
                if not skip_unreadable:
                    raise
                return None

        with ThreadPoolExecutor(max_workers=_threads()) as pool:
            images = list(pool.map(decode, paths, chunksize=16))
        shapes = np.array([tuple(im.shape) if im is not None else (0, 0, 0) for im in images], dtype=np.int64)
        counts = shapes.prod(axis=1)
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        offsets[[im is None for im in images]] = -1
        total = int(counts.sum())
        if directory is None:
            cache = cls._in_memory(images, offsets, total, size, shapes)
        else:
            cache = cls._on_disk(images, offsets, shapes, settings, paths, Path(directory))
        _log.info(
            "decoded-image cache: %d images at shorter side ≤ %d px, %.2f GB %s",
            len(paths),
            size,
            total / 1e9,
            "in shared memory" if directory is None else f"in {cache.path}",
        )
        return cache

    @classmethod
    def _in_memory(
        cls, images: list[torch.Tensor | None], offsets: np.ndarray, total: int, size: int, shapes: np.ndarray
    ) -> DecodedCache:
        # shared before it is written: the pages are allocated as the copies fill them, while the decoded
        # images are dropped one by one, so the peak stays near one copy of the data
        storage = torch.empty(total, dtype=torch.uint8).share_memory_()
        for row, image in enumerate(images):
            if image is not None:
                start = int(offsets[row])
                storage[start : start + image.numel()].copy_(image.reshape(-1))
                images[row] = None
        return cls(offsets, shapes, size, storage=storage)

    @staticmethod
    def _key(paths: Sequence[str], settings: dict[str, Any]) -> str:
        digest = hashlib.blake2b(digest_size=16)
        digest.update(json.dumps({"format": CACHE_FORMAT, **settings}, sort_keys=True).encode())
        for path in paths:
            try:
                stat = os.stat(path)
                digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(f"{path}\0missing\n".encode())
        return digest.hexdigest()

    @classmethod
    def _files(cls, paths: Sequence[str], settings: dict[str, Any], directory: Path) -> tuple[Path, Path]:
        key = cls._key(paths, settings)
        return directory / f"dmlkit-cache-{key}.u8", directory / f"dmlkit-cache-{key}.npz"

    @classmethod
    def _reuse(cls, paths: Sequence[str], settings: dict[str, Any], directory: Path) -> DecodedCache | None:
        data, index = cls._files(paths, settings, directory)
        if not (data.is_file() and index.is_file()):
            return None
        with np.load(index) as stored:
            offsets, shapes = stored["offsets"], stored["shapes"]
        if len(offsets) != len(paths) or data.stat().st_size != int(shapes.prod(axis=1).sum()):
            return None  # written by something else: rebuild
        _log.info("decoded-image cache: reusing %s", data)
        return cls(offsets, shapes, int(settings["size"]), path=str(data))

    @classmethod
    def _on_disk(
        cls,
        images: list[torch.Tensor | None],
        offsets: np.ndarray,
        shapes: np.ndarray,
        settings: dict[str, Any],
        paths: Sequence[str],
        directory: Path,
    ) -> DecodedCache:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            data, index = cls._files(paths, settings, directory)
            # written under temporary names and renamed: a reader never maps a half-written file
            with tempfile.NamedTemporaryFile(dir=directory, suffix=".part", delete=False) as handle:
                for image in images:
                    if image is not None:
                        handle.write(image.numpy().tobytes())
            partial_index = index.with_suffix(".part.npz")
            np.savez(partial_index, offsets=offsets, shapes=shapes)
            os.replace(handle.name, data)
            os.replace(partial_index, index)
        except OSError as exc:
            raise DataError(f"cannot write the decoded-image cache in '{directory}': {exc}") from exc
        return cls(offsets, shapes, int(settings["size"]), path=str(data))

    # -- reading ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    @property
    def nbytes(self) -> int:
        """Bytes of the images this view reaches."""
        return int(self.shapes[self.rows].prod(axis=1).sum())

    def get(self, index: int) -> torch.Tensor | None:
        """A copy of item ``index``'s cached image (``C × h × w`` ``uint8``), or None when its file did
        not decode while building (a copy: the pipeline may write into what it is given)."""
        row = int(self.rows[index])
        start = int(self.offsets[row])
        if start < 0:
            return None
        shape = tuple(int(s) for s in self.shapes[row])
        count = shape[0] * shape[1] * shape[2]
        if self.storage is not None:
            return self.storage[start : start + count].view(shape).clone()
        assert self.path is not None
        if self._mapped is None:  # opened once per process (each worker maps the file itself)
            self._mapped = np.memmap(self.path, dtype=np.uint8, mode="r")
        return torch.from_numpy(np.array(self._mapped[start : start + count])).view(shape)

    def select(self, indices: np.ndarray) -> DecodedCache:
        """The cache of items ``indices`` (in that order), sharing this one's buffer or file."""
        view = DecodedCache(
            self.offsets,
            self.shapes,
            self.size,
            storage=self.storage,
            path=self.path,
            rows=self.rows[indices],
        )
        return view

    def __getstate__(self) -> dict[str, Any]:
        # a file-backed cache is pickled as its path (each worker maps it), never as its bytes
        state = dict(self.__dict__)
        state["_mapped"] = None
        return state

    def __repr__(self) -> str:
        where = "shared memory" if self.storage is not None else self.path
        return f"{type(self).__name__}(items={len(self)}, size={self.size}, bytes={self.nbytes}, in={where})"


__all__ = ["CACHE_FORMAT", "DecodedCache", "reduce"]
