"""Shared helpers of the sampler tests: label strategies and an independent view of an epoch."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from dmlkit.samplers import BatchSampler


@st.composite
def class_sizes(draw: st.DrawFn, max_classes: int = 25, max_size: int = 12) -> list[int]:
    """Number of images of each class: skewed mixes of tiny and larger classes."""
    return draw(st.lists(st.integers(1, max_size), min_size=1, max_size=max_classes))


def labels_from_sizes(sizes: list[int], seed: int = 0, offset: int = 0) -> np.ndarray:
    """Shuffled int64 labels with ``sizes[c]`` items of class ``offset + 3 * c`` (non-contiguous ids)."""
    labels = np.repeat(offset + 3 * np.arange(len(sizes), dtype=np.int64), sizes)
    return np.random.default_rng(seed).permutation(labels)


def iterate_epoch(sampler: BatchSampler, epoch: int) -> list[list[int]]:
    """Batches ``for batch in sampler`` yields after ``set_epoch(epoch)`` from a fresh cursor."""
    sampler.load_state_dict({"epoch": epoch, "batches_yielded": 0})
    return list(sampler)
