"""Embedding-space diagnostics (Roth et al. 2020): ρ against a direct numpy SVD, intra/inter-class
distances against brute-force loops with scipy's ``cdist``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from scipy.stats import entropy

from dmlkit.errors import ConfigError
from dmlkit.metrics import embedding_space as es
from dmlkit.metrics import (
    evaluate,
    inter_class_distance,
    intra_class_distance,
    intra_over_inter,
    rho_spectrum,
    singular_values,
)

SCIPY = {"cosine": "cosine", "euclidean": "euclidean", "squared_euclidean": "sqeuclidean"}


def data(seed: int, n: int = 90, d: int = 12, classes: int = 7):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    x = rng.standard_normal((classes, d))[labels] + 0.7 * rng.standard_normal((n, d))
    return x.astype(np.float64), labels


def numpy_rho(x: np.ndarray, K: int) -> float:
    """Roth et al.'s formula on numpy's SVD: drop |K|−1 largest values, normalise, KL to uniform."""
    s = np.linalg.svd(x, compute_uv=False)[abs(K) - 1 :]
    p = s / s.sum()
    u = np.ones(len(s)) / len(s)
    return float(entropy(u, p) if K > 0 else entropy(p, u))


@pytest.mark.parametrize("K", [1, 2, 5, -1, -3])
@pytest.mark.parametrize("shape", [(200, 16), (10, 32)])
def test_rho_spectrum_matches_numpy_svd(K, shape):
    x = np.random.default_rng(0).standard_normal(shape) * np.linspace(3, 0.2, shape[1])
    assert rho_spectrum(torch.from_numpy(x).float(), K) == pytest.approx(numpy_rho(x, K), rel=1e-5, abs=1e-9)
    np.testing.assert_allclose(
        singular_values(x).numpy(), np.linalg.svd(x, compute_uv=False), rtol=1e-8, atol=1e-10
    )


def test_rho_spectrum_extremes_and_errors():
    flat = np.eye(8) * 3  # all singular values equal
    assert rho_spectrum(flat, 1) == pytest.approx(0.0, abs=1e-12)
    assert rho_spectrum(flat, -1) == pytest.approx(0.0, abs=1e-12)
    rank_one = np.outer(np.arange(1, 11), np.ones(4)).astype(float)
    assert rho_spectrum(rank_one, 1) == math.inf  # KL(u ‖ p) with p_i = 0
    assert rho_spectrum(rank_one, -1) == pytest.approx(math.log(4))  # KL(p ‖ u) with p = (1, 0, 0, 0)
    with pytest.raises(ConfigError, match="K ≠ 0"):
        rho_spectrum(flat, 0)
    with pytest.raises(ConfigError, match="only 8"):
        rho_spectrum(flat, 9)


def brute_intra(x, labels, distance):
    per_class = []
    for c in np.unique(labels):
        members = x[labels == c]
        if len(members) < 2:
            continue
        d = cdist(members, members, SCIPY[distance])
        per_class.append(d.sum() / (len(members) ** 2 - len(members)))
    return float(np.mean(per_class)) if per_class else math.nan


def brute_inter(x, labels, distance):
    centroids = []
    for c in np.unique(labels):
        members = x[labels == c]
        if distance == "cosine":
            members = members / np.linalg.norm(members, axis=1, keepdims=True)
            mean = members.mean(0)
            centroids.append(mean / np.linalg.norm(mean))
        else:
            centroids.append(members.mean(0))
    d = cdist(np.array(centroids), np.array(centroids), SCIPY[distance])
    n = len(centroids)
    return float(d.sum() / (n * n - n)) if n > 1 else math.nan


@pytest.mark.parametrize("distance", ["cosine", "euclidean", "squared_euclidean"])
def test_intra_and_inter_match_brute_force(distance):
    x, labels = data(1)
    labels[:2] = [40, 41]  # singleton classes have no pair: skipped by intra, kept by inter
    intra, inter = intra_class_distance(x, labels, distance), inter_class_distance(x, labels, distance)
    assert intra == pytest.approx(brute_intra(x, labels, distance), rel=1e-10)
    assert inter == pytest.approx(brute_inter(x, labels, distance), rel=1e-10)
    assert intra_over_inter(x, labels, distance) == pytest.approx(intra / inter, rel=1e-12)


def test_euclidean_intra_in_many_small_blocks(monkeypatch):
    x, labels = data(2, n=150, classes=4)
    expected = brute_intra(x, labels, "euclidean")
    monkeypatch.setattr(es, "MAX_BLOCK_ELEMENTS", 300)  # forces several row blocks per class
    monkeypatch.setattr(es, "ROW_CHUNK", 17)
    assert intra_class_distance(torch.from_numpy(x), labels, "euclidean") == pytest.approx(
        expected, rel=1e-10
    )
    assert inter_class_distance(x, labels, "cosine") == pytest.approx(
        brute_inter(x, labels, "cosine"), rel=1e-10
    )


def test_distance_edge_cases():
    x, _ = data(3, n=10)
    assert math.isnan(intra_class_distance(x, np.arange(10), "cosine"))  # all singletons
    assert math.isnan(inter_class_distance(x, np.zeros(10, dtype=int), "cosine"))  # one class
    assert math.isnan(intra_over_inter(x, np.zeros(10, dtype=int), "euclidean"))
    with pytest.raises(ConfigError, match="similarity"):
        intra_class_distance(x, np.zeros(10, dtype=int), "dot")


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_evaluate_wires_the_diagnostics_on_the_query_embeddings(distance):
    x, labels = data(4)
    q = torch.from_numpy(x).float()
    names = ("rho_spectrum@1", "rho_spectrum@-2", "dists@intra", "dists@inter", "dists@intra_over_inter")
    results = evaluate(q, labels + 2**40, metrics=names, distance=distance)
    assert results.k == 0 and results.per_class == {}
    embedded = x / np.linalg.norm(x, axis=1, keepdims=True) if distance == "cosine" else x
    assert results["rho_spectrum@1"] == pytest.approx(numpy_rho(embedded, 1), rel=1e-4)
    assert results["rho_spectrum@-2"] == pytest.approx(numpy_rho(embedded, -2), rel=1e-4)
    assert results["dists@intra"] == pytest.approx(brute_intra(x, labels, distance), rel=1e-5)
    assert results["dists@inter"] == pytest.approx(brute_inter(x, labels, distance), rel=1e-5)
    strings = evaluate(q, [f"c{v}" for v in labels], metrics=names, distance=distance)
    assert strings.metrics == pytest.approx(results.metrics, rel=1e-12)
    with pytest.raises(ConfigError, match="similarity"):
        evaluate(q, labels, metrics=("dists@intra",), distance="dot")
