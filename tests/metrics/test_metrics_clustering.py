"""NMI / AMI: our wiring against scikit-learn on the same cluster assignment; k-means backends."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

from dmlkit.errors import ConfigError, UnknownNameError
from dmlkit.metrics import ami, clustering_scores, evaluate, f1, kmeans, nmi
from dmlkit.metrics.clustering import faiss_available


def blobs(seed: int, n_per_class: int = 20, n_classes: int = 4, dim: int = 6, spread: float = 0.05):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=gen) * 3
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    x = centres[labels] + spread * torch.randn(len(labels), dim, generator=gen)
    return x, labels


def test_scores_of_known_assignments_match_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, 200)
    assignment = np.where(rng.random(200) < 0.7, labels, rng.integers(0, 6, 200))
    assert nmi(torch.from_numpy(labels), torch.from_numpy(assignment)) == pytest.approx(
        normalized_mutual_info_score(labels, assignment), rel=1e-12
    )
    assert ami(labels, assignment) == pytest.approx(adjusted_mutual_info_score(labels, assignment), rel=1e-12)
    scores = clustering_scores(labels, assignment)
    assert scores == {
        "nmi": nmi(labels, assignment),
        "ami": ami(labels, assignment),
        "f1": f1(labels, assignment),
    }
    with pytest.raises(UnknownNameError, match="did you mean 'nmi'"):
        clustering_scores(labels, assignment, metrics=("nmii",))


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_evaluate_scores_its_kmeans_assignment(distance):
    x, labels = blobs(1, spread=1.5)
    results = evaluate(x, labels, metrics=("nmi", "ami"), distance=distance, seed=3)
    embeddings = F.normalize(x, dim=1) if distance == "cosine" else x
    assignment = kmeans(embeddings, 4, seed=3)
    assert torch.equal(results.cluster_assignments, assignment)
    assert results["nmi"] == pytest.approx(normalized_mutual_info_score(labels.numpy(), assignment.numpy()))
    assert results["ami"] == pytest.approx(adjusted_mutual_info_score(labels.numpy(), assignment.numpy()))
    assert results.per_class == {}


@pytest.mark.parametrize("backend", ["sklearn", "faiss"])
def test_kmeans_backends_are_seeded_and_separate_blobs(backend):
    if backend == "faiss" and not faiss_available():
        pytest.skip("faiss is not installed")
    x, labels = blobs(2)
    first = kmeans(x, 4, seed=5, backend=backend)
    assert first.dtype == torch.int64 and first.shape == (80,)
    assert torch.equal(first, kmeans(x.numpy(), 4, seed=5, backend=backend))
    assert set(first.tolist()) <= {0, 1, 2, 3}
    # faiss initialises with random points (no k-means++), so it may merge two blobs for some seeds.
    assert nmi(labels, first) > 0.6


def test_kmeans_bad_arguments():
    x = torch.randn(5, 2)
    with pytest.raises(UnknownNameError, match="did you mean 'faiss'"):
        kmeans(x, 2, backend="fais")
    with pytest.raises(ConfigError, match="num_clusters"):
        kmeans(x, 6)
