"""``dmlkit.data.cache``: decoded images at a reduced size, shared by the workers, in memory or on disk."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from bad_images import truncated_jpeg
from dmlkit.data import DecodedCache, FileImageDataset, cache, images, item_seed, transforms
from dmlkit.errors import ConfigError, DataError


@pytest.fixture
def files(tmp_path: Path) -> list[str]:
    """Six JPEGs and PNGs of assorted sizes and orientations, in two classes."""
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(40, 60), (70, 30), (20, 25), (64, 64), (33, 90), (50, 41)]):
        path = tmp_path / f"{i}.{'jpg' if i % 2 == 0 else 'png'}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _dataset(paths: list[str], **kwargs: object) -> FileImageDataset:
    labels = [i % 2 for i in range(len(paths))]
    return FileImageDataset(paths, labels, ["a", "b"], [Path(p).name for p in paths], **kwargs)  # type: ignore[arg-type]


def test_images_are_decoded_and_reduced_like_torchvision_resize(files: list[str]) -> None:
    built = DecodedCache.build(files, 32)
    for i, path in enumerate(files):
        full = images.load_image_tensor(path)
        expected = full if min(full.shape[-2:]) <= 32 else v2.functional.resize(full, [32], antialias=True)
        got = built.get(i)
        assert got is not None and torch.equal(got, expected), path
        assert min(got.shape[-2:]) == min(32, min(full.shape[-2:]))
    assert built.nbytes == sum(int(np.prod(built.get(i).shape)) for i in range(len(files)))  # type: ignore[union-attr]
    assert built.storage is not None and built.storage.is_shared()


def test_a_cached_dataset_serves_the_reduced_images(files: list[str]) -> None:
    plain, cached = _dataset(files), _dataset(files)
    cached.build_cache(32)
    pipeline = transforms.build("train", 24, recipe="base")
    for dataset in (plain, cached):
        dataset.transform, dataset.augment_seed = pipeline, 7
    for i in range(len(files)):
        reduced = cache.reduce(plain.load(i), 32)
        assert torch.equal(cached.load(i), reduced)
        # the augmentation draws follow (seed, epoch, index) on the reduced image as on any other input
        torch.manual_seed(item_seed(7, 0, i))
        assert torch.equal(cached[i][0], pipeline(reduced))
    part = cached.subset([4, 1])
    assert part.cache is not None and torch.equal(part.load(0), cached.load(4))
    assert part.cache.storage is cached.cache.storage  # type: ignore[union-attr]  # a view, not a copy


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_workers_share_the_memory_cache(files: list[str], context: str) -> None:
    """Forked and spawned workers read the same shared memory: no per-worker copy of the pixels."""
    dataset = _dataset(files)
    dataset.build_cache(32)
    loader = torch.utils.data.DataLoader(
        _Probe(dataset), batch_size=None, num_workers=1, multiprocessing_context=context
    )
    shared, same_bytes = next(iter(loader))
    assert shared and same_bytes


class _Probe(torch.utils.data.Dataset):
    """Item 0: whether the worker's cache buffer is shared memory holding the main process's bytes."""

    def __init__(self, dataset: FileImageDataset) -> None:
        self.dataset = dataset
        assert dataset.cache is not None and dataset.cache.storage is not None
        self.expected = dataset.cache.storage[:64].clone()

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> tuple[bool, bool]:
        storage = self.dataset.cache.storage  # type: ignore[union-attr]
        return bool(storage.is_shared()), bool(torch.equal(storage[:64], self.expected))


def test_disk_cache_is_reused_and_rebuilt_when_a_file_changes(
    files: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "cache"
    first = DecodedCache.build(files, 32, directory=folder)
    assert first.storage is None and first.path is not None and Path(first.path).parent == folder
    expected = [first.get(i) for i in range(len(files))]
    assert len(pickle.dumps(first)) < 4096  # pickled as its path, never its bytes

    def no_decoding(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(cache, "load_image_tensor", no_decoding)
    again = DecodedCache.build(files, 32, directory=folder)
    assert again.path == first.path
    assert all(torch.equal(again.get(i), expected[i]) for i in range(len(files)))  # type: ignore[arg-type]
    monkeypatch.undo()
    os.utime(files[0], ns=(1, 1))
    rebuilt = DecodedCache.build(files, 32, directory=folder)
    assert rebuilt.path != first.path
    assert DecodedCache.build(files, 16, directory=folder).path not in (first.path, rebuilt.path)


def test_disk_cache_in_workers(files: list[str], tmp_path: Path) -> None:
    dataset = _dataset(files)
    dataset.build_cache(32, tmp_path / "cache")
    dataset.transform = transforms.build("eval", 16)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2)
    batched = torch.cat([batch[0] for batch in loader])
    assert torch.equal(batched, torch.stack([dataset[i][0] for i in range(len(files))]))


def test_unreadable_files(files: list[str], tmp_path: Path) -> None:
    files = [*files, str(truncated_jpeg(tmp_path / "cut.jpg"))]
    with pytest.raises(DataError, match=r"cut\.jpg': image file is truncated"):
        DecodedCache.build(files, 32)
    dataset = _dataset(files, skip_unreadable=True)
    dataset.build_cache(32)
    assert dataset.cache is not None and dataset.cache.get(len(files) - 1) is None
    with pytest.warns(UserWarning, match=r"cut\.jpg.*replaced by another image of class 'a'"):
        substitute = dataset.load(len(files) - 1)
    assert min(substitute.shape[-2:]) <= 32 and dataset.substituted == 1
    with pytest.raises(ConfigError, match="cache_size"):
        DecodedCache.build(files, 0)
