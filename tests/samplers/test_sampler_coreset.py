"""Embedding-driven samplers (Roth et al. 2020): trainer interface, lazy batches, selection quality."""

from __future__ import annotations

import io
import warnings
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sampler_checks import class_sizes, labels_from_sizes
from torch.utils.data import DataLoader, Dataset

from dmlkit import samplers
from dmlkit.errors import ConfigError, DataError, UnknownNameError
from dmlkit.samplers.coreset import (
    coreset_select,
    d2_rule,
    distance_histogram,
    farthest_item,
    histogram_wasserstein,
)

NAMES = ("greedy_coreset", "d2_coreset", "disthist_batchmatch")


def build(name: str, labels: Any, batch_size: int, **kwargs: Any) -> samplers.EmbeddingBatchSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sampler = samplers.build(name, labels, batch_size, **kwargs)
    assert isinstance(sampler, samplers.EmbeddingBatchSampler)
    return sampler


def clustered(
    num_classes: int = 48, per_class: int = 4, clusters: int = 6, dim: int = 8, seed: int = 0
) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
    """Labels, embeddings and cluster of every item: class ``c`` lies in cluster ``c mod clusters``."""
    gen = torch.Generator().manual_seed(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    cluster = labels % clusters
    centres = torch.randn(clusters, dim, generator=gen) * 10
    spread = 0.3 + torch.rand(clusters, 1, generator=gen)  # clusters of different widths
    emb = centres[cluster] + torch.randn(len(labels), dim, generator=gen) * spread[cluster]
    return labels, emb, cluster


def covering_radius(dist: torch.Tensor, chosen: np.ndarray) -> float:
    """Largest distance from a pool item to its nearest chosen item (the k-center objective)."""
    return float(dist[:, torch.from_numpy(chosen)].min(dim=1).values.max())


def check_batch(batch: list[int] | np.ndarray, labels: np.ndarray, pool: np.ndarray, k: int) -> list[int]:
    """P distinct classes × K consecutive items, made of whole groups of ``pool``; returns the groups."""
    batch = np.asarray(batch)
    groups = [int(np.flatnonzero((pool == batch[i : i + k]).all(axis=1))[0]) for i in range(0, len(batch), k)]
    assert len(set(groups)) == len(groups)
    assert len(set(labels[batch].tolist())) == len(batch) // k
    return groups


# -- trainer interface -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_buffer_is_allocated_lazily_as_float32_cpu(name: str) -> None:
    labels, emb, _ = clustered()
    sampler = build(name, labels, 16, samples_per_class=2)
    assert sampler.needs_embeddings
    assert sampler.embeddings is None and not bool(sampler.seen.any())
    sampler.update_embeddings(torch.tensor([3, 5], dtype=torch.int32), emb[[3, 5]].double())
    assert sampler.embeddings is not None
    assert sampler.embeddings.shape == (len(labels), 8) and sampler.embeddings.dtype == torch.float32
    assert sampler.seen.nonzero().ravel().tolist() == [3, 5]
    torch.testing.assert_close(sampler.embeddings[[3, 5]], emb[[3, 5]])
    assert not bool(sampler.embeddings[0].any())
    sampler.update_embeddings(torch.tensor([5]), torch.ones(1, 8, dtype=torch.bfloat16, requires_grad=True))
    assert sampler.embeddings[5].tolist() == [1.0] * 8


def test_non_finite_rows_are_ignored() -> None:
    labels, emb, _ = clustered()
    sampler = build("greedy_coreset", labels, 16, samples_per_class=2)
    sampler.update_embeddings(torch.tensor([1, 2]), emb[[1, 2]])
    bad = emb[[1, 2, 3]].clone()
    bad[0, 0] = float("nan")
    bad[2, 1] = float("inf")
    sampler.update_embeddings(torch.tensor([1, 2, 3]), bad)
    assert sampler.embeddings is not None
    torch.testing.assert_close(sampler.embeddings[1], emb[1])  # kept its previous embedding
    assert sampler.seen[[1, 2, 3]].tolist() == [True, True, False]


@pytest.mark.parametrize(
    ("indices", "embeddings", "message"),
    [
        (torch.tensor([0.0, 1.0]), torch.zeros(2, 4), "indices must be an integer tensor"),
        (torch.tensor([[0, 1]]), torch.zeros(2, 4), "indices must be 1-D"),
        (torch.tensor([0, 1]), torch.zeros(2, 4, dtype=torch.int64), "floating-point"),
        (torch.tensor([0, 1]), torch.zeros(3, 4), r"shape \(len\(indices\), D\) = \(2, D\)"),
        (torch.tensor([0, 192]), torch.zeros(2, 4), r"indices must lie in \[0, 192\)"),
        (torch.tensor([-1, 0]), torch.zeros(2, 4), "from -1 to 0"),
        (
            torch.tensor([0, 1]),
            torch.zeros(2, 5),
            "dimension 5, but the sampler's buffer was started with dimension 4",
        ),
    ],
)
def test_update_embeddings_errors(indices: torch.Tensor, embeddings: torch.Tensor, message: str) -> None:
    labels, _, _ = clustered()
    sampler = build("d2_coreset", labels, 16, samples_per_class=2)
    sampler.update_embeddings(torch.tensor([7]), torch.zeros(1, 4))
    with pytest.raises(DataError, match=message):
        sampler.update_embeddings(indices, embeddings)


def test_batches_are_built_lazily_from_the_newest_embeddings() -> None:
    labels, emb, _ = clustered()
    sampler = build("greedy_coreset", labels, 16, samples_per_class=2)
    first_expected = sampler.global_batch(0, 0).tolist()  # no embedding yet: random groups of the pool
    it = iter(sampler)
    assert next(it) == first_expected
    sampler.update_embeddings(torch.arange(len(labels)), emb)
    assert next(it) == sampler.global_batch(0, 1).tolist()  # built after the update
    second_without = build("greedy_coreset", labels, 16, samples_per_class=2).global_batch(0, 1).tolist()
    assert sampler.global_batch(0, 1).tolist() != second_without


class IndexDataset(Dataset[tuple[int, int]]):
    def __init__(self, labels: np.ndarray) -> None:
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[int, int]:
        return index, int(self.labels[index])


def train(
    sampler: samplers.EmbeddingBatchSampler,
    table: torch.Tensor,
    epochs: range,
    stop: int | None = None,
    first_step: int = 0,
) -> list[list[int]]:
    """A trainer's loop: DataLoader over the sampler, ``update_embeddings`` after every step."""
    dataset = IndexDataset(sampler.labels)
    seen: list[list[int]] = []
    for epoch in epochs:
        sampler.set_epoch(epoch)
        for indices, _ in DataLoader(dataset, batch_sampler=sampler):
            step = first_step + len(seen)
            seen.append(indices.tolist())
            sampler.update_embeddings(
                indices, table[indices] + 0.01 * step
            )  # embeddings drift while training
            if stop is not None and len(seen) == stop:
                return seen
    return seen


@pytest.mark.parametrize("name", NAMES)
def test_resume_mid_epoch_restores_buffer_and_continues_identically(name: str) -> None:
    labels, emb, _ = clustered()
    kwargs: dict[str, Any] = {"samples_per_class": 2, "seed": 3}
    reference = train(build(name, labels, 16, **kwargs), emb, range(3))
    assert len(reference) == 3 * 12

    interrupted = build(name, labels, 16, **kwargs)
    before = train(interrupted, emb, range(3), stop=17)  # 5 steps into epoch 1
    state = interrupted.state_dict()
    assert isinstance(state["embeddings"], torch.Tensor) and state["seen"].dtype == torch.bool
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    resumed = build(name, labels, 16, **kwargs)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.state_dict()["batches_yielded"] == 5
    after = train(resumed, emb, range(1, 3), first_step=17)
    assert before + after == reference
    # without the buffer the continuation differs: the batches really depend on the embeddings
    blind = build(name, labels, 16, **kwargs)
    blind.load_state_dict({"epoch": 1, "batches_yielded": 5})
    assert train(blind, emb, range(1, 3), first_step=17) != after


def test_state_dict_is_a_copy_and_absent_buffer_keys_keep_the_buffer() -> None:
    labels, emb, _ = clustered()
    sampler = build("greedy_coreset", labels, 16, samples_per_class=2)
    empty = sampler.state_dict()
    assert empty["embeddings"] is None and not bool(empty["seen"].any())
    sampler.update_embeddings(torch.arange(10), emb[:10])
    state = sampler.state_dict()
    sampler.update_embeddings(torch.arange(10), emb[:10] + 1)
    torch.testing.assert_close(state["embeddings"][:10], emb[:10])
    sampler.load_state_dict({"epoch": 2, "batches_yielded": 1})  # a trainer's own cursor: buffer kept
    assert sampler.embeddings is not None and int(sampler.seen.sum()) == 10
    sampler.load_state_dict(empty)
    assert sampler.embeddings is None and not bool(sampler.seen.any())


NO_SEEN = torch.zeros(192, dtype=torch.bool)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"embeddings": None}, "both 'embeddings' and 'seen' or neither"),
        ({"embeddings": None, "seen": torch.zeros(3, dtype=torch.bool)}, r"'seen' must be a bool tensor"),
        ({"embeddings": None, "seen": NO_SEEN.float()}, r"'seen' must be a bool tensor of shape \(192,\)"),
        ({"embeddings": torch.zeros(191, 8), "seen": NO_SEEN}, r"floating tensor of shape \(192, D\)"),
        ({"embeddings": torch.zeros(192, 8, dtype=torch.int64), "seen": NO_SEEN}, "floating tensor"),
        ({"embeddings": None, "seen": ~NO_SEEN}, "marked 'seen' but no 'embeddings'"),
        ({"embedding": None}, "did you mean 'embeddings'"),
    ],
)
def test_load_state_dict_buffer_errors(extra: dict[str, Any], message: str) -> None:
    labels, emb, _ = clustered()
    sampler = build("disthist_batchmatch", labels, 16, samples_per_class=2)
    sampler.update_embeddings(torch.arange(len(labels)), emb)
    with pytest.raises(ConfigError, match=message):
        sampler.load_state_dict({"epoch": 1, "batches_yielded": 0, **extra})
    assert sampler.epoch == 0 and sampler.embeddings is not None  # nothing changed


@pytest.mark.parametrize(
    ("name", "kwargs", "error", "message"),
    [
        ("greedy_coreset", {"distance": "dot"}, ConfigError, "not a metric"),
        ("greedy_coreset", {"distance": "euclidian"}, UnknownNameError, "did you mean 'euclidean'"),
        ("greedy_coreset", {"pool_factor": 0}, ConfigError, "pool_factor must be >= 1"),
        ("d2_coreset", {"power": -1.0}, ConfigError, "power must be a finite number >= 0"),
        ("d2_coreset", {"power": "2"}, ConfigError, "power must be a number"),
        ("disthist_batchmatch", {"num_candidates": 0}, ConfigError, "num_candidates must be >= 1"),
        ("disthist_batchmatch", {"bins": 0}, ConfigError, "bins must be >= 1"),
        ("disthist_batchmatch", {"reference_size": 1}, ConfigError, "reference_size must be >= 2"),
        ("greedy_coreset", {"batch_size": 16, "samples_per_class": 1}, ConfigError, "needs 16 distinct"),
    ],
)
def test_bad_arguments(name: str, kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    labels = labels_from_sizes([4] * 10)
    arguments: dict[str, Any] = {"batch_size": 8, "samples_per_class": 2, **kwargs}
    with pytest.raises(error, match=message):
        samplers.build(name, labels, **arguments)


# -- items without embeddings --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_without_embeddings_batches_are_random_groups_of_the_pool(name: str) -> None:
    labels, _, _ = clustered()
    sampler = build(name, labels, 16, samples_per_class=2, pool_factor=3)
    assert sampler.pool_classes == 24
    pools = sampler.pools(0)
    assert pools.shape == (12, 24, 2)
    for g, batch in enumerate(sampler.batches(0)):
        check_batch(batch, labels, pools[g], 2)


@pytest.mark.parametrize("name", NAMES)
def test_groups_without_embeddings_are_taken_first(name: str) -> None:
    labels, emb, _ = clustered(seed=2)
    sampler = build(name, labels, 16, samples_per_class=2, seed=1)
    known = torch.from_numpy(np.flatnonzero(labels % 8 != 0))  # 6 of 48 classes never embedded
    sampler.update_embeddings(known, emb[known])
    seen = sampler.seen.numpy()
    for g, batch in enumerate(sampler.batches(0)):
        pool = sampler.pools(0)[g]
        fresh = set(np.flatnonzero(~seen[pool].all(axis=1)).tolist())
        groups = check_batch(batch, labels, pool, 2)
        assert set(groups[: len(fresh)]) == fresh  # fresh groups first, then the selected ones


# -- selection quality -------------------------------------------------------------------------------------


def test_greedy_coreset_covers_the_pool_better_than_random_batches() -> None:
    labels, emb, cluster = clustered()
    sampler = build("greedy_coreset", labels, 16, samples_per_class=2, batches_per_epoch=30)
    sampler.update_embeddings(torch.arange(len(labels)), emb)
    rng = np.random.default_rng(0)
    greedy, random = [], []
    for g in range(30):
        pool = sampler.pools(0)[g]
        dist = torch.cdist(emb[torch.from_numpy(pool.ravel().copy())], emb)
        batch = sampler.global_batch(0, g)
        # with no more clusters than classes per batch, the coreset reaches every cluster of the pool
        assert set(cluster[batch].tolist()) == set(cluster[pool.ravel()].tolist())
        greedy.append(covering_radius(dist, batch))
        for _ in range(5):
            random.append(covering_radius(dist, pool[rng.choice(len(pool), 8, replace=False)].ravel()))
    assert np.mean(greedy) < 0.5 * np.mean(random)
    assert np.mean(np.array(greedy) <= np.median(random)) > 0.9


def test_greedy_selection_rule_picks_the_farthest_group() -> None:
    points = torch.tensor([[0.0], [1.0], [3.0], [2.5]])
    dist = torch.cdist(points, points)
    group_of = torch.tensor([0, 1, 2, 3])
    available = torch.tensor([False, True, True, True])
    centers = torch.tensor([True, False, False, False])
    rng = np.random.default_rng(0)
    assert coreset_select(dist, group_of, available, centers, 2, rng, farthest_item) == [2, 1]


def test_d2_draws_far_points_with_probability_proportional_to_squared_distance() -> None:
    # Chosen point at 0; candidate groups at distance 1 and 3: P(far) = 9 / 10 (power 1), 81 / 82
    # (power 2), 1 / 2 (power 0).
    points = torch.tensor([[0.0], [1.0], [3.0]])
    dist = torch.cdist(points, points)
    group_of = torch.tensor([0, 1, 2])
    available = torch.tensor([False, True, True])
    centers = torch.tensor([True, False, False])
    rng = np.random.default_rng(1)
    for power, expected in ((1.0, 0.9), (2.0, 81 / 82), (0.0, 0.5)):
        rule = d2_rule(power)
        draws = [coreset_select(dist, group_of, available, centers, 1, rng, rule)[0] for _ in range(1000)]
        assert abs(np.mean(np.array(draws) == 2) - expected) < 0.045, power  # > 2.8 standard errors


def test_d2_groups_weigh_all_their_items() -> None:
    # Group 1 has two items at distance 1, group 2 one item at distance 1 and one at 0: 2 : 1.
    points = torch.tensor([[0.0], [1.0], [-1.0], [1.0], [0.0]])
    dist = torch.cdist(points, points)
    group_of = torch.tensor([0, 1, 1, 2, 2])
    available = torch.tensor([False, True, True])
    centers = torch.tensor([True, False, False, False, False])
    rng = np.random.default_rng(2)
    draws = [coreset_select(dist, group_of, available, centers, 1, rng, d2_rule())[0] for _ in range(1000)]
    assert abs(np.mean(np.array(draws) == 1) - 2 / 3) < 0.045


def test_d2_coreset_batches_spread_over_more_clusters_than_random_batches() -> None:
    labels, emb, cluster = clustered(clusters=12)
    sampler = build("d2_coreset", labels, 16, samples_per_class=2, batches_per_epoch=40)
    sampler.update_embeddings(torch.arange(len(labels)), emb)
    rng = np.random.default_rng(0)
    d2, random = [], []
    for g in range(40):
        pool = sampler.pools(0)[g]
        d2.append(len(set(cluster[sampler.global_batch(0, g)].tolist())))
        for _ in range(5):
            random.append(len(set(cluster[pool[rng.choice(len(pool), 8, replace=False)].ravel()].tolist())))
    assert np.mean(d2) > np.mean(random) + 0.5


def test_disthist_batches_match_the_global_histogram_better_than_random_batches() -> None:
    labels, emb, _ = clustered(clusters=4)
    sampler = build("disthist_batchmatch", labels, 16, samples_per_class=2, batches_per_epoch=30)
    sampler.update_embeddings(torch.arange(len(labels)), emb)
    everything = torch.cdist(emb, emb)
    upper = torch.triu(torch.ones_like(everything, dtype=torch.bool), diagonal=1)
    top, bins = float(everything[upper].max()), sampler.bins
    reference = distance_histogram(everything[upper], torch.ones(int(upper.sum())), top, bins)

    def mismatch(items: np.ndarray) -> float:
        d = torch.cdist(emb[torch.from_numpy(items)], emb[torch.from_numpy(items)])
        mask = torch.triu(torch.ones_like(d, dtype=torch.bool), diagonal=1)
        hist = distance_histogram(d[mask], torch.ones(int(mask.sum())), top, bins)
        return float(histogram_wasserstein(hist, reference, top / bins))

    rng = np.random.default_rng(0)
    matched, random = [], []
    for g in range(30):
        pool = sampler.pools(0)[g]
        matched.append(mismatch(sampler.global_batch(0, g)))
        for _ in range(5):
            random.append(mismatch(pool[rng.choice(len(pool), 8, replace=False)].ravel()))
    assert np.mean(matched) < 0.8 * np.mean(random)


def test_histogram_helpers() -> None:
    values = torch.tensor([[0.1, 0.6, 0.9, 5.0]])
    hist = distance_histogram(values, torch.tensor([[1.0, 1.0, 0.0, 1.0]]), top=1.0, bins=2)
    torch.testing.assert_close(hist, torch.tensor([[1 / 3, 2 / 3]], dtype=torch.float64))  # 5.0 → last bin
    a = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    b = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    assert float(histogram_wasserstein(a, b, 0.5)) == pytest.approx(1.0)  # mass moved by 2 bins of 0.5


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("distance", ["squared_euclidean", "cosine"])
def test_other_distances(name: str, distance: str) -> None:
    labels, emb, _ = clustered()
    sampler = build(name, labels, 16, samples_per_class=2, distance=distance)
    sampler.update_embeddings(torch.arange(len(labels)), emb)
    for g, batch in enumerate(sampler.batches(0)):
        check_batch(batch, labels, sampler.pools(0)[g], 2)


def test_identical_embeddings_still_give_valid_batches() -> None:
    labels, _, _ = clustered()
    for name in NAMES:
        sampler = build(name, labels, 16, samples_per_class=2)
        sampler.update_embeddings(torch.arange(len(labels)), torch.ones(len(labels), 4))
        for g, batch in enumerate(sampler.batches(1)):
            check_batch(batch, labels, sampler.pools(1)[g], 2)


def test_disthist_reference_from_the_pool() -> None:
    labels, emb, _ = clustered()
    sampler = build("disthist_batchmatch", labels, 16, samples_per_class=2, reference_size=None)
    sampler.update_embeddings(torch.arange(len(labels)), emb)
    for g, batch in enumerate(sampler.batches(0)):
        check_batch(batch, labels, sampler.pools(0)[g], 2)


@settings(max_examples=30, deadline=None)
@given(
    sizes=class_sizes(max_classes=16, max_size=6),
    name=st.sampled_from(NAMES),
    k=st.integers(1, 3),
    p=st.integers(1, 4),
    pool_factor=st.integers(1, 3),
    data=st.data(),
)
def test_property_composition_and_fresh_groups_first(
    sizes: list[int], name: str, k: int, p: int, pool_factor: int, data: st.DataObject
) -> None:
    labels = labels_from_sizes(sizes, seed=len(sizes))
    if p > len(sizes):
        with pytest.raises(ConfigError, match="distinct classes"):
            build(name, labels, p * k, samples_per_class=k)
        return
    seed = data.draw(st.integers(0, 100))
    sampler = build(name, labels, p * k, samples_per_class=k, pool_factor=pool_factor, seed=seed)
    known = np.flatnonzero(np.random.default_rng(seed).random(len(labels)) < data.draw(st.floats(0, 1)))
    if len(known):
        sampler.update_embeddings(torch.from_numpy(known), torch.randn(len(known), 3))
    seen = sampler.seen.numpy()
    epoch = data.draw(st.integers(0, 5))
    for g, batch in enumerate(sampler.batches(epoch)):
        pool = sampler.pools(epoch)[g]
        assert pool.shape == (min(len(sizes), pool_factor * p), k)
        groups = check_batch(batch, labels, pool, k)
        assert Counter(labels[batch].tolist()) == Counter(dict.fromkeys(set(labels[batch].tolist()), k))
        if sampler.embeddings is not None:
            fresh = set(np.flatnonzero(~seen[pool].all(axis=1)).tolist())
            if len(fresh) <= p:
                assert set(groups[: len(fresh)]) == fresh
            else:
                assert set(groups) <= fresh
