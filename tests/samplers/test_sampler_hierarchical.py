"""Hierarchical sampler: super-class tuples, per-super-class P×K sub-batches, PML's epoch definition."""

from __future__ import annotations

import warnings
from collections import Counter
from math import comb
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_metric_learning.samplers import HierarchicalSampler as PMLHierarchicalSampler

from dmlkit import samplers
from dmlkit.errors import ConfigError, DataError


def dataset(classes_per_super: list[int], images: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled (labels, super_labels): super-class ``10 s`` holds ``classes_per_super[s]`` classes."""
    sup = np.repeat(10 * np.arange(len(classes_per_super)), classes_per_super)
    labels = np.repeat(np.arange(len(sup)) * 2 + 1, images)
    supers = np.repeat(sup, images)
    order = np.random.default_rng(seed).permutation(len(labels))
    return labels[order], supers[order]


def build(labels: Any, batch_size: int, **kwargs: Any) -> samplers.HierarchicalSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sampler = samplers.build("hierarchical", labels, batch_size, **kwargs)
    assert isinstance(sampler, samplers.HierarchicalSampler)
    return sampler


def check_batch(
    batch: list[int], labels: np.ndarray, supers: np.ndarray, spb: int, k: int
) -> tuple[int, ...]:
    """``spb`` consecutive sub-batches of distinct super-classes, each of distinct classes × ``k``."""
    sub = len(batch) // spb
    found = []
    for i in range(spb):
        part = batch[i * sub : (i + 1) * sub]
        assert len(set(supers[part].tolist())) == 1
        found.append(int(supers[part[0]]))
        counts = Counter(labels[part].tolist())
        assert set(counts.values()) == {k}
        assert all(len(set(labels[part[j : j + k]].tolist())) == 1 for j in range(0, sub, k))
    assert len(set(found)) == spb
    assert len(set(labels[batch].tolist())) == len(batch) // k
    return tuple(sorted(found))


def test_epoch_gives_every_super_tuple_its_batches_like_pml() -> None:
    labels, supers = dataset([6, 5, 8, 4])
    ours = build(labels, 16, super_labels=supers, samples_per_class=2, super_classes_per_batch=2)
    pml = PMLHierarchicalSampler(
        np.stack([labels, supers], axis=1), batch_size=16, samples_per_class=2, super_classes_per_batch=2
    )
    assert len(ours) == len(pml) == 6 * 4  # comb(4, 2) tuples × batches_per_super_tuple
    tuples = Counter(check_batch(b, labels, supers, 2, 2) for b in ours.batches(0))
    assert set(tuples.values()) == {4} and len(tuples) == 6
    # PML's batches have the same make-up (PML shuffles positions, so compare per batch contents)
    for batch in pml:
        per_super = Counter(supers[batch].tolist())
        assert len(per_super) == 2 and set(per_super.values()) == {8}
        assert set(Counter(labels[batch].tolist()).values()) == {2}


def test_per_item_super_labels_mapping_and_tensor_agree() -> None:
    labels, supers = dataset([4, 4, 4], seed=1)
    mapping = {int(c): int(s) for c, s in zip(labels, supers, strict=True)}
    reference = build(labels, 12, super_labels=supers, samples_per_class=3).batches(2)
    assert build(labels, 12, super_labels=mapping, samples_per_class=3).batches(2) == reference
    assert (
        build(labels, 12, super_labels=torch.from_numpy(supers), samples_per_class=3).batches(2) == reference
    )
    assert build(labels, 12, super_labels=supers.tolist(), samples_per_class=3).batches(2) == reference


def test_every_class_of_a_super_class_is_visited_when_its_batches_allow() -> None:
    labels, supers = dataset([6, 6, 6])
    sampler = build(labels, 12, super_labels=supers, samples_per_class=2, super_classes_per_batch=2)
    # Each super-class is in comb(2, 1) × 4 = 8 batches, taking 3 classes each: 24 >= 6 classes.
    for epoch in range(3):
        assert set(labels[np.concatenate(sampler.batches(epoch))].tolist()) == set(labels.tolist())
        visits = Counter(labels[b[0]] for batch in sampler.batches(epoch) for b in np.reshape(batch, (-1, 2)))
        assert max(visits.values()) - min(visits.values()) <= 1  # rounds: 24 visits over 6 classes, 4 each


def test_batches_per_epoch_overrides_and_cycles_through_tuples() -> None:
    labels, supers = dataset([4, 4, 4, 4])
    sampler = build(labels, 8, super_labels=supers, samples_per_class=2, batches_per_epoch=30)
    batches = sampler.batches(0)
    assert len(batches) == len(sampler) == 30
    tuples = Counter(check_batch(b, labels, supers, 2, 2) for b in batches)
    assert len(tuples) == 6 and min(tuples.values()) >= 4  # 24 entries once, then 6 from a new shuffle
    short = build(labels, 8, super_labels=supers, samples_per_class=2, batches_per_epoch=3)
    assert len(short.batches(1)) == 3


def test_one_super_class_per_batch_and_three() -> None:
    labels, supers = dataset([3, 4, 5, 3])
    one = build(labels, 6, super_labels=supers, samples_per_class=2, super_classes_per_batch=1)
    assert len(one) == 4 * 4
    for batch in one.batches(0):
        check_batch(batch, labels, supers, 1, 2)
    three = build(labels, 18, super_labels=supers, samples_per_class=2, super_classes_per_batch=3)
    assert len(three) == 4 * 4
    for batch in three.batches(0):
        check_batch(batch, labels, supers, 3, 2)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"batch_size": 10},
            ConfigError,
            r"divisible by super_classes_per_batch × samples_per_class = 2 × 2",
        ),
        ({"super_classes_per_batch": 5, "batch_size": 20}, ConfigError, "only 3 super-class"),
        ({"batch_size": 24}, ConfigError, r"super-class\(es\) have fewer than 6 classes"),
        ({"super_classes_per_batch": 0}, ConfigError, "super_classes_per_batch must be >= 1"),
        ({"batches_per_super_tuple": 0}, ConfigError, "batches_per_super_tuple must be >= 1"),
        ({"super_labels": [0, 1]}, DataError, "one super-class per item"),
        (
            {"super_labels": np.zeros(60, dtype=np.float32)},
            DataError,
            "super_labels: labels must be integers",
        ),
        ({"super_labels": {1: 0}}, DataError, "no super-class for 11 class"),
        ({"super_labels": {c: 0.5 for c in range(1, 24, 2)}}, DataError, "must be an integer super-class"),
    ],
)
def test_errors(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    labels, supers = dataset([4, 4, 4])
    arguments: dict[str, Any] = {"batch_size": 8, "super_labels": supers, "samples_per_class": 2, **kwargs}
    with pytest.raises(error, match=message):
        samplers.build("hierarchical", labels, **arguments)


def test_inconsistent_super_labels_name_the_class() -> None:
    labels, supers = dataset([4, 4])
    supers = supers.copy()
    supers[np.flatnonzero(labels == 3)[0]] = 99
    with pytest.raises(DataError, match=r"class 3 has items in several super-classes \[0, 99\]"):
        samplers.build("hierarchical", labels, 8, super_labels=supers, samples_per_class=2)


def test_too_many_super_tuples_is_refused() -> None:
    labels = np.arange(3000)
    with pytest.raises(ConfigError, match="super-class combinations per epoch"):
        samplers.build(
            "hierarchical", labels, 3, super_labels=labels, samples_per_class=1, super_classes_per_batch=3
        )


@settings(max_examples=40, deadline=None)
@given(
    classes_per_super=st.lists(st.integers(1, 6), min_size=1, max_size=5),
    images=st.integers(1, 4),
    k=st.integers(1, 3),
    q=st.integers(1, 3),
    spb=st.integers(1, 3),
    seed=st.integers(0, 1000),
)
def test_property_composition(
    classes_per_super: list[int], images: int, k: int, q: int, spb: int, seed: int
) -> None:
    labels, supers = dataset(classes_per_super, images=images, seed=seed)
    if spb > len(classes_per_super) or min(classes_per_super) < q:
        with pytest.raises(ConfigError):
            build(labels, spb * q * k, super_labels=supers, samples_per_class=k, super_classes_per_batch=spb)
        return
    sampler = build(
        labels, spb * q * k, super_labels=supers, samples_per_class=k, super_classes_per_batch=spb, seed=seed
    )
    batches = sampler.batches(seed % 7)
    assert len(batches) == comb(len(classes_per_super), spb) * 4
    for batch in batches:
        sub = len(batch) // spb
        parts = [batch[i * sub : (i + 1) * sub] for i in range(spb)]
        assert len({int(supers[p[0]]) for p in parts}) == spb
        for part in parts:
            assert len(set(supers[part].tolist())) == 1
            for j in range(0, sub, k):
                chunk = part[j : j + k]
                assert len(set(labels[chunk].tolist())) == 1
                assert len(set(chunk)) == min(k, images)
        assert len(set(labels[batch].tolist())) == spb * q


def test_super_labels_from_class_names_or_a_mapping() -> None:
    class Named:
        class_names = ("a/x", "a/y", "b/z")
        labels = (0, 1, 2, 2, 0)

    assert samplers.super_labels_of(Named(), None).tolist() == [0, 0, 1, 1, 0]
    assert samplers.super_labels_of(Named(), {"a/x": "q", "a/y": "p", "b/z": "p"}).tolist() == [1, 0, 0, 0, 1]
    with pytest.raises(ConfigError, match=r"no super-class for class\(es\) \['b/z'\]"):
        samplers.super_labels_of(Named(), {"a/x": "q", "a/y": "p"})

    class Flat:
        class_names = ("x", "y")
        labels = (0, 1)

    with pytest.raises(ConfigError, match="needs super-classes"):
        samplers.super_labels_of(Flat(), None)
