"""Intra-class uniform sampling: P×K batches whose images are used equally often across epochs."""

from __future__ import annotations

import time
import warnings
from collections import Counter
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sampler_checks import class_sizes, labels_from_sizes

from dmlkit import samplers
from dmlkit.errors import ConfigError
from dmlkit.samplers.intra_class import hash_keys


def build(labels: Any, batch_size: int, **kwargs: Any) -> samplers.IntraClassUniformSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sampler = samplers.build("intra_class_uniform", labels, batch_size, **kwargs)
    assert isinstance(sampler, samplers.IntraClassUniformSampler)
    return sampler


def check_composition(batch: list[int], labels: np.ndarray, p: int, k: int) -> None:
    """``p`` distinct classes × ``k`` consecutive images; distinct images where the class allows."""
    assert len(batch) == p * k
    sizes = Counter(labels.tolist())
    seen_classes = set()
    for i in range(0, p * k, k):
        chunk = batch[i : i + k]
        cls = {int(labels[j]) for j in chunk}
        assert len(cls) == 1
        seen_classes |= cls
        (c,) = cls
        assert len(set(chunk)) == min(k, sizes[c])
        counts = Counter(chunk).values()
        assert max(counts) - min(counts) <= 1
    assert len(seen_classes) == p


def usage_spread(usage: np.ndarray, labels: np.ndarray) -> int:
    """Largest difference between usage counts of two images of the same class."""
    return max(int(np.ptp(usage[labels == c])) for c in np.unique(labels))


def test_usage_counts_within_each_class_differ_by_at_most_one_after_every_epoch() -> None:
    # Mixed class sizes: multiples of K, not multiples, between K and 2K, and smaller than K.
    labels = labels_from_sizes([4, 5, 7, 9, 13, 3, 2, 1, 16, 6, 11, 8], seed=2)
    sampler = build(labels, 12, samples_per_class=4, batches_per_epoch=7)
    usage = np.zeros(len(labels), dtype=np.int64)
    for epoch in range(40):
        np.add.at(usage, sampler.global_batches(epoch), 1)
        assert usage_spread(usage, labels) <= 1, f"after epoch {epoch}"
    assert usage.min() > 0


def test_m_per_class_drifts_where_intra_class_uniform_does_not() -> None:
    # The point of the sampler: m_per_class restarts its cycles every epoch, so usage drifts apart.
    labels = labels_from_sizes([7] * 12, seed=1)
    uniform = build(labels, 12, samples_per_class=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m_per_class = samplers.build("m_per_class", labels, 12, samples_per_class=4)
    spreads = {}
    for name, sampler in (("uniform", uniform), ("m_per_class", m_per_class)):
        usage = np.zeros(len(labels), dtype=np.int64)
        for epoch in range(30):
            np.add.at(usage, sampler.global_batches(epoch), 1)
        spreads[name] = usage_spread(usage, labels)
    assert spreads["uniform"] <= 1 < spreads["m_per_class"]


def test_visits_before_matches_replaying_the_epochs() -> None:
    labels = labels_from_sizes([3, 8, 5, 6, 2, 9, 4], seed=3)
    for batches_per_epoch in (1, 2, 3, 5, 11):
        sampler = build(labels, 9, samples_per_class=3, batches_per_epoch=batches_per_epoch, seed=4)
        visits = np.zeros(7, dtype=np.int64)
        for epoch in range(12):
            np.testing.assert_array_equal(sampler.visits_before(epoch), visits)
            visits += np.bincount(sampler.class_schedule(epoch).ravel(), minlength=7)


def test_every_class_visited_each_epoch_when_the_budget_allows() -> None:
    labels = labels_from_sizes([3] * 50)
    sampler = build(labels, 16, samples_per_class=4, batches_per_epoch=13)  # P = 4, ceil(50 / 4) = 13
    for epoch in range(4):
        assert set(labels[sampler.global_batches(epoch)].tolist()) == set(labels.tolist())
    short = build(labels, 16, samples_per_class=4, batches_per_epoch=12)  # 48 visits < 50 classes
    assert len(set(labels[short.global_batches(0)].tolist())) == 48


def test_class_visits_are_balanced_within_and_across_epochs() -> None:
    labels = labels_from_sizes([40] * 7 + [400])  # one huge class must not be favoured
    sampler = build(labels, 12, samples_per_class=4)  # P = 3, C = 8: rounds of 3 batches, 2 fills each
    total = np.zeros(8, dtype=np.int64)
    for epoch in range(6):
        visits = np.bincount(sampler.class_schedule(epoch).ravel(), minlength=8)
        assert visits.max() - visits.min() <= 2
        total += visits
    assert total.max() - total.min() <= 2


def test_hash_keys_are_deterministic_and_well_spread() -> None:
    a = hash_keys(5, 1, np.arange(1000), 3)
    np.testing.assert_array_equal(a, hash_keys(5, 1, np.arange(1000), 3))
    assert len(np.unique(a)) == 1000
    assert not np.array_equal(a, hash_keys(6, 1, np.arange(1000), 3))
    assert not np.array_equal(a, hash_keys(5, 2, np.arange(1000), 3))
    top_bit = (a >> np.uint64(63)).astype(np.int64)
    assert 400 < top_bit.sum() < 600
    assert hash_keys(-1, 1, 0)[0] == hash_keys(2**64 - 1, 1, 0)[0]  # seeds are taken modulo 2**64


def test_bad_arguments() -> None:
    labels = labels_from_sizes([5] * 10)
    with pytest.raises(ConfigError, match=r"batch_size=10 must be divisible by samples_per_class=4"):
        samplers.build("intra_class_uniform", labels, 10, samples_per_class=4)
    with pytest.raises(ConfigError, match=r"needs 4 distinct classes per batch, but the labels have only 3"):
        samplers.build("intra_class_uniform", labels_from_sizes([10, 10, 10]), 16, samples_per_class=4)


def test_default_epoch_length() -> None:
    assert len(build(labels_from_sizes([10] * 10), 8)) == 12
    assert len(build(labels_from_sizes([10] * 10), 8, world_size=5)) == 3
    assert len(build(labels_from_sizes([1, 1, 1]), 12, samples_per_class=4)) == 1


def test_one_million_labels_build_an_epoch_in_reasonable_time() -> None:
    labels = np.random.default_rng(0).integers(0, 20_000, size=1_000_000)
    sampler = build(labels, 64, samples_per_class=4)
    start = time.perf_counter()
    flat = sampler.global_batches(3)
    elapsed = time.perf_counter() - start
    assert flat.shape == (len(sampler) * 64,)
    assert elapsed < 6.0, f"building an epoch of 1M labels took {elapsed:.2f} s"


@settings(max_examples=60, deadline=None)
@given(
    sizes=class_sizes(max_classes=14, max_size=12),
    k=st.integers(1, 5),
    p=st.integers(1, 5),
    batches_per_epoch=st.one_of(st.none(), st.integers(1, 25)),
    seed=st.integers(-(2**40), 2**40),
    epochs=st.integers(1, 6),
)
def test_property_composition_coverage_and_uniform_usage(
    sizes: list[int], k: int, p: int, batches_per_epoch: int | None, seed: int, epochs: int
) -> None:
    if p > len(sizes):
        with pytest.raises(ConfigError, match="distinct classes"):
            build(labels_from_sizes(sizes), p * k, samples_per_class=k)
        return
    labels = labels_from_sizes(sizes, seed=epochs, offset=-4)
    sampler = build(labels, p * k, samples_per_class=k, batches_per_epoch=batches_per_epoch, seed=seed)
    expected = batches_per_epoch or max(1, len(labels) // (p * k))
    usage = np.zeros(len(labels), dtype=np.int64)
    for epoch in range(epochs):
        batches = sampler.batches(epoch)
        assert len(batches) == expected
        for batch in batches:
            check_composition(batch, labels, p, k)
        if p * expected >= len(sizes):
            assert set(labels[np.concatenate(batches)].tolist()) == set(labels.tolist())
        np.add.at(usage, np.concatenate(batches), 1)
        assert usage_spread(usage, labels) <= 1
