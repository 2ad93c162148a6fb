"""Plain shuffled batches."""

from __future__ import annotations

import numpy as np
import pytest

from dmlkit import samplers
from dmlkit.errors import ConfigError


def test_each_epoch_is_a_permutation_cut_into_batches() -> None:
    sampler = samplers.build("random", np.zeros(50, dtype=np.int64), 8, drop_last=False)
    batches = sampler.batches(0)
    assert [len(b) for b in batches] == [8] * 6 + [2]
    assert sorted(i for b in batches for i in b) == list(range(50))
    assert len(sampler) == 7
    assert batches != sampler.batches(1)


def test_drop_last_is_the_default_and_drops_the_partial_batch() -> None:
    sampler = samplers.build("random", np.arange(50), 8)
    assert sampler.drop_last
    batches = sampler.batches(2)
    assert [len(b) for b in batches] == [8] * 6
    flat = [i for b in batches for i in b]
    assert len(set(flat)) == 48


def test_partial_last_batch_with_ranks() -> None:
    labels = np.arange(50)
    shares = [
        samplers.build("random", labels, 8, drop_last=False, rank=r, world_size=2).batches(0)
        for r in range(2)
    ]
    assert [len(s) for s in shares] == [4, 4]  # 7 batches padded to 8
    assert sorted(i for s in shares for b in s for i in b) == sorted([*range(50), *shares[0][0]])


def test_batch_larger_than_dataset() -> None:
    with pytest.raises(ConfigError, match="batch_size=16 exceeds the dataset size 10"):
        samplers.build("random", np.arange(10), 16)
    sampler = samplers.build("random", np.arange(10), 16, drop_last=False)
    assert [sorted(b) for b in sampler.batches(0)] == [list(range(10))]
