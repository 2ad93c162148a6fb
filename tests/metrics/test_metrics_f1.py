"""Clustering F1 (pair counting, Song et al. 2016 / Roth et al. 2020) against a brute-force pair loop and
scikit-learn's pair confusion matrix; its wiring in ``evaluate``."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics.cluster import pair_confusion_matrix

from dmlkit.errors import DataError
from dmlkit.metrics import evaluate, f1, kmeans


def brute_force_f1(labels, clusters) -> float:
    tp = fp = fn = 0
    for i, j in itertools.combinations(range(len(labels)), 2):
        same_class, same_cluster = labels[i] == labels[j], clusters[i] == clusters[j]
        tp += same_class and same_cluster
        fp += same_cluster and not same_class
        fn += same_class and not same_cluster
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_f1_matches_brute_force_and_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 7, 150)
    clusters = np.where(rng.random(150) < 0.6, labels, rng.integers(0, 9, 150)) + 100
    ours = f1(torch.from_numpy(labels), clusters)
    assert ours == pytest.approx(brute_force_f1(labels, clusters), rel=1e-12)
    c = pair_confusion_matrix(labels, clusters)  # ordered pairs: c[1, 1] = 2·TP
    assert ours == pytest.approx(2 * c[1, 1] / (2 * c[1, 1] + c[0, 1] + c[1, 0]), rel=1e-12)


def test_f1_edge_cases():
    assert f1([0, 0, 1, 1], [5, 5, 9, 9]) == 1.0  # same partition, other ids
    assert f1([0, 1, 2], [0, 1, 2]) == 1.0  # all singletons on both sides: identical partitions
    assert f1([0, 1, 2], [0, 0, 0]) == 0.0  # no same-class pair is clustered together
    assert f1([3, 3, 3], [0, 1, 2]) == 0.0
    big = 2**40
    assert f1(np.array([big, big, big + 1]), [0, 0, 1]) == 1.0  # int64 labels are exact
    with pytest.raises(DataError, match="differ in length"):
        f1([0, 1], [0])
    with pytest.raises(DataError, match="integer codes"):
        f1(np.array([0.0, 1.0]), [0, 1])


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_evaluate_f1_scores_its_kmeans(distance):
    gen = torch.Generator().manual_seed(4)
    labels = torch.arange(5).repeat_interleave(12)
    x = torch.randn(5, 6, generator=gen)[labels] * 2 + torch.randn(60, 6, generator=gen)
    results = evaluate(x, labels, metrics=("f1", "nmi"), distance=distance, seed=2)
    assignment = kmeans(F.normalize(x, dim=1) if distance == "cosine" else x, 5, seed=2)
    assert torch.equal(results.cluster_assignments, assignment)
    assert results["f1"] == pytest.approx(brute_force_f1(labels.tolist(), assignment.tolist()), rel=1e-12)
    assert results.per_class == {}


def test_f1_with_string_labels_and_a_single_class():
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(5))
    assert evaluate(x, ["a"] * 8, metrics=("f1",))["f1"] == 1.0  # one class, one cluster
    names = ["cat", "dog"] * 4
    codes = [0, 1] * 4
    assert evaluate(x, names, metrics=("f1",))["f1"] == evaluate(x, codes, metrics=("f1",))["f1"]
