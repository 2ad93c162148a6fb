"""P×K class-balanced sampler: batch composition, class coverage, per-class cycles, small classes."""

from __future__ import annotations

import time
import warnings
from collections import Counter
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_metric_learning.samplers import MPerClassSampler as PMLMPerClassSampler
from sampler_checks import class_sizes, labels_from_sizes

from dmlkit import samplers
from dmlkit.errors import ConfigError


def build(labels: Any, batch_size: int, **kwargs: Any) -> samplers.MPerClassSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sampler = samplers.build("m_per_class", labels, batch_size, **kwargs)
    assert isinstance(sampler, samplers.MPerClassSampler)
    return sampler


def check_composition(batch: list[int], labels: np.ndarray, p: int, k: int) -> None:
    """Exactly ``p`` distinct classes with ``k`` items each; distinct items where the class allows."""
    assert len(batch) == p * k
    per_class = Counter(labels[batch].tolist())
    assert len(per_class) == p
    assert set(per_class.values()) == {k}
    sizes = Counter(labels.tolist())
    for cls in per_class:
        items = [i for i in batch if labels[i] == cls]
        # as many distinct images as the class has, spread evenly (counts differ by at most one)
        assert len(set(items)) == min(k, sizes[cls])
        counts = Counter(items).values()
        assert max(counts) - min(counts) <= 1


def test_composition_matches_pytorch_metric_learning_definition() -> None:
    # PML's MPerClassSampler(m=K, batch_size) batches have batch_size // K classes × K images: ours too.
    labels = labels_from_sizes([6, 9, 4, 12, 7, 5, 8, 6, 10, 4, 11, 6], seed=3)
    ours = build(labels, 12, samples_per_class=4)
    pml = PMLMPerClassSampler(labels, m=4, batch_size=12, length_before_new_iter=len(labels))
    pml_indices = list(iter(pml))
    pml_batches = [pml_indices[i : i + 12] for i in range(0, len(pml_indices) - 11, 12)]
    assert pml_batches
    for batch in pml_batches + ours.batches(0):
        check_composition(batch, labels, p=3, k=4)
    assert len(ours) == len(labels) // 12


@settings(max_examples=120, deadline=None)
@given(
    sizes=class_sizes(),
    k=st.integers(1, 5),
    p=st.integers(1, 6),
    batches_per_epoch=st.one_of(st.none(), st.integers(1, 40)),
    seed=st.integers(-(2**40), 2**40),
    epoch=st.integers(0, 10_000),
)
def test_property_composition_and_class_coverage(
    sizes: list[int], k: int, p: int, batches_per_epoch: int | None, seed: int, epoch: int
) -> None:
    if p > len(sizes):
        with pytest.raises(ConfigError, match="distinct classes"):
            build(labels_from_sizes(sizes), p * k, samples_per_class=k)
        return
    labels = labels_from_sizes(sizes, seed=epoch, offset=-5)
    sampler = build(labels, p * k, samples_per_class=k, batches_per_epoch=batches_per_epoch, seed=seed)
    batches = sampler.batches(epoch)
    expected = batches_per_epoch or max(1, len(labels) // (p * k))
    assert len(batches) == len(sampler) == expected
    for batch in batches:
        check_composition(batch, labels, p, k)
    visited = Counter(labels[b].tolist()[0] for batch in batches for b in np.reshape(batch, (p, k)))
    num_classes = len(sizes)
    if p * expected >= num_classes:
        assert set(visited) == set(labels.tolist())  # every class at least once
    check_round_bounds(visited, num_classes, p, expected)
    check_per_class_cycles(batches, labels, k)


def check_round_bounds(visited: Counter[int], num_classes: int, p: int, num_batches: int) -> None:
    """Rounds of ceil(C / P) batches visit every class once, plus at most one fill visit per round."""
    per_round = -(-num_classes // p)
    complete, started = num_batches // per_round, -(-num_batches // per_round)
    assert len(visited) == num_classes or complete == 0
    assert all(complete <= v <= 2 * started for v in visited.values())
    assert sum(visited.values()) == p * num_batches


def check_per_class_cycles(batches: list[list[int]], labels: np.ndarray, k: int) -> None:
    """A class's draws, in batch order, are passes of ceil(n/K)*K draws starting with a permutation of it."""
    per_class: dict[int, list[int]] = {}
    for batch in batches:
        for i in batch:
            per_class.setdefault(int(labels[i]), []).append(i)
    for cls, items in per_class.items():
        n = int(np.count_nonzero(labels == cls))
        if n < k:
            continue  # repeated inside each batch; checked by check_composition
        pass_length = -(-n // k) * k
        for start in range(0, len(items), pass_length):
            head = items[start : start + n]
            assert len(set(head)) == len(head), "an image repeats before its class's cycle is through"
            assert all(labels[i] == cls for i in head)


def test_every_class_visited_when_budget_allows_even_with_many_classes() -> None:
    # 1000 classes of 3 images with K = 4: the default budget (N // batch_size batches) is too small,
    # PML would miss classes; with batches_per_epoch = ceil(C / P) every class appears.
    labels = labels_from_sizes([3] * 1000)
    default = build(labels, 32, samples_per_class=4)
    assert len(default) == 3000 // 32
    sampler = build(labels, 32, samples_per_class=4, batches_per_epoch=125)
    for epoch in range(3):
        seen = set(labels[np.concatenate(sampler.batches(epoch))].tolist())
        assert len(seen) == 1000


def test_class_visits_are_balanced_over_an_epoch() -> None:
    labels = labels_from_sizes([50] * 7 + [400])  # one huge class must not be favoured
    sampler = build(labels, 12, samples_per_class=4)  # P = 3: rounds of 3 batches, 62 batches
    batches = sampler.batches(0)
    visits = Counter(labels[b[0]].item() for batch in batches for b in np.reshape(batch, (3, 4)))
    check_round_bounds(visits, 8, 3, 62)
    assert visits[labels.max().item()] <= 62 * 3 / 8 * 1.5


def test_images_of_a_class_are_cycled_without_replacement() -> None:
    labels = labels_from_sizes([20] * 4)
    sampler = build(labels, 8, samples_per_class=4, batches_per_epoch=40)  # each class ~20 visits = 4 passes
    per_class: dict[int, list[int]] = {}
    for batch in sampler.batches(0):
        for i in batch:
            per_class.setdefault(int(labels[i]), []).append(i)
    for items in per_class.values():
        for start in range(0, len(items) - 19, 20):  # each pass of 20 draws is a permutation of the class
            assert len(set(items[start : start + 20])) == 20


def test_small_classes_warn_once_with_their_count() -> None:
    labels = labels_from_sizes([1, 2, 3, 4, 9, 2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sampler = samplers.build("m_per_class", labels, 8, samples_per_class=4)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1
    assert "4 of 6 classes have fewer than samples_per_class=4" in messages[0]
    assert "replacement" in messages[0]
    single = np.flatnonzero(labels == 0)[0]
    batches = build(labels, 8, samples_per_class=4, batches_per_epoch=30).batches(0)
    assert any(batch.count(single) == 4 for batch in batches)  # a 1-image class is repeated K times
    for batch in batches + sampler.batches(1):
        check_composition(batch, labels, p=2, k=4)


def test_no_warning_when_every_class_is_large_enough() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        samplers.build("m_per_class", labels_from_sizes([4, 5, 6]), 8, samples_per_class=4)


def test_batch_size_not_divisible_names_both_values() -> None:
    with pytest.raises(ConfigError, match=r"batch_size=10 must be divisible by samples_per_class=4"):
        samplers.build("m_per_class", labels_from_sizes([5] * 10), 10, samples_per_class=4)


def test_too_few_classes_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"needs 4 distinct classes per batch, but the labels have only 3"):
        samplers.build("m_per_class", labels_from_sizes([10, 10, 10]), 16, samples_per_class=4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"samples_per_class": 0}, "samples_per_class must be >= 1"),
        ({"batches_per_epoch": 0}, "batches_per_epoch must be >= 1"),
        ({"batches_per_epoch": 2.5}, "batches_per_epoch must be an integer"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        samplers.build("m_per_class", labels_from_sizes([5] * 10), 8, **kwargs)


def test_default_epoch_length_and_tiny_dataset() -> None:
    assert len(build(labels_from_sizes([10] * 10), 8)) == 12
    assert len(build(labels_from_sizes([10] * 10), 8, world_size=5)) == 3  # 12 batches padded to 15
    assert len(build(labels_from_sizes([1, 1, 1]), 12, samples_per_class=4)) == 1  # N < batch_size


def test_labels_keep_their_integer_values() -> None:
    labels = np.array([2**40, -(2**40), 2**40 + 1, 7] * 4, dtype=np.int64)  # would collide as float32
    sampler = build(labels, 8, samples_per_class=2)
    np.testing.assert_array_equal(sampler.classes, np.unique(labels))
    for batch in sampler.batches(0):
        check_composition(batch, labels, p=4, k=2)


def test_one_million_labels_build_an_epoch_quickly() -> None:
    labels = np.random.default_rng(0).integers(0, 20_000, size=1_000_000)
    sampler = build(labels, 64, samples_per_class=4)
    start = time.perf_counter()
    flat = sampler.global_batches(0)
    elapsed = time.perf_counter() - start
    assert flat.shape == (len(sampler) * 64,)
    assert elapsed < 2.0, f"building an epoch of 1M labels took {elapsed:.2f} s"
