"""Fixtures of the serving tests: a tiny trained checkpoint (one epoch on synthetic glyphs) and PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dmlkit.cli import main
from dmlkit.inference import load_model
from dmlkit.train import checkpoint as ckpt
from tests_support import tiny_argv


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """``best.pt`` of a one-epoch run on the tiny synthetic dataset (16 × 16 glyphs, 16-d embeddings)."""
    out = tmp_path_factory.mktemp("serving")
    assert main(["train", *tiny_argv(out / "runs", name="serve", epochs=1)]) == 0
    return out / "runs" / "serve" / "best.pt"


@pytest.fixture(scope="session")
def other_checkpoint(trained: Path, tmp_path_factory) -> Path:
    """The trained checkpoint with one weight changed: same architecture, another fingerprint."""
    checkpoint = ckpt.load(trained)
    name = next(k for k, v in checkpoint["model"].items() if v.is_floating_point())
    checkpoint["model"][name] = checkpoint["model"][name] + 0.5
    path = tmp_path_factory.mktemp("other") / "other.pt"
    ckpt.save_atomic(checkpoint, path)
    return path


def _write_pngs(folder: Path, names: list[str], seed: int = 0) -> list[Path]:
    """Small gray PNGs of blobs (varied sizes: the eval pipeline resizes them to 16 × 16)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i, name in enumerate(names):
        height, width = 16 + (i % 3) * 4, 16 + (i % 2) * 6
        pixels = rng.integers(0, 60, (height, width))
        y, x = rng.integers(2, height - 6), rng.integers(2, width - 6)
        pixels[y : y + rng.integers(3, 6), x : x + rng.integers(3, 6)] = 255
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.astype(np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """20 PNGs, some in a subfolder (ids are paths relative to the folder)."""
    folder = tmp_path / "gallery"
    _write_pngs(folder, [f"{'sub/' if i % 4 == 0 else ''}img_{i:02d}.png" for i in range(20)])
    return folder


def _reference_embeddings(checkpoint_path: Path, paths: list[Path]) -> np.ndarray:
    """The checkpoint's embeddings of ``paths``, computed here with the library (not by the command)."""
    from dmlkit.cli.common import FilesDataset
    from dmlkit.inference import compute_embeddings

    model, checkpoint = load_model(checkpoint_path, torch.device("cpu"))
    embeddings, _ = compute_embeddings(model, FilesDataset.for_checkpoint(paths, checkpoint))
    return embeddings.numpy()


@pytest.fixture
def write_pngs():
    """``write_pngs(folder, names, seed=0) -> paths``: small gray PNGs of blobs."""
    return _write_pngs


@pytest.fixture
def reference_embeddings():
    """``reference_embeddings(checkpoint, paths) -> array``: the checkpoint's embeddings of the files."""
    return _reference_embeddings
