"""MAP@K (both denominators), MRR@K and Roth et al.'s mAP_1000 / mAP_lim / mAP_c against brute-force
loops, PML's AccuracyCalculator and a transcription of Roth et al.'s published algorithm."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN

from dmlkit.errors import ConfigError
from dmlkit.metrics import evaluate

DISTANCES = ("cosine", "euclidean")


def make_data(seed: int, n_query: int, n_gallery: int, n_classes: int, dim: int = 8):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n_query, dim, generator=gen)
    g = torch.randn(n_gallery, dim, generator=gen)
    ql = torch.randint(0, n_classes, (n_query,), generator=gen)
    gl = torch.randint(0, n_classes, (n_gallery,), generator=gen)
    return q, ql, g, gl


def rankings(q, g, distance, excluded=None):
    """Full stable ranking of every query (list of gallery-index arrays), excluded items removed."""
    q, g = np.asarray(q, dtype=np.float64), np.asarray(g, dtype=np.float64)
    if distance == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
        key = -(q @ g.T)
    else:
        key = np.sqrt(((q[:, None, :] - g[None, :, :]) ** 2).sum(-1))
    out = []
    for i in range(len(q)):
        order = np.argsort(key[i], kind="stable")
        if excluded is not None:
            order = order[~excluded[i][order]]
        out.append(order)
    return out


def brute_force(q, ql, g, gl, distance, names, excluded=None):
    """Mean over queries with R > 0 of each metric, one Python loop per query, textbook formulas."""
    ql, gl = np.asarray(ql), np.asarray(gl)
    values = {name: [] for name in names}
    for i, order in enumerate(rankings(q, g, distance, excluded)):
        rel = gl[order] == ql[i]
        r = int(rel.sum())
        if r == 0:
            continue
        for name in names:
            kind, K = name.split("@")
            K = int(K)
            hits, total = 0, 0.0
            for rank in range(1, min(K, len(rel)) + 1):
                if rel[rank - 1]:
                    hits += 1
                    total += hits / rank
            if kind == "map":
                values[name].append(total / min(K, r))
            elif kind == "map_pml":
                values[name].append(total / r)
            elif kind == "mrr":
                first = next((rank for rank in range(1, min(K, len(rel)) + 1) if rel[rank - 1]), None)
                values[name].append(0.0 if first is None else 1.0 / first)
    return {name: float(np.mean(v)) if v else math.nan for name, v in values.items()}


NAMES = ("map@1", "map@3", "map@10", "map@40", "map_pml@1", "map_pml@3", "map_pml@10", "map_pml@40")
NAMES += ("mrr@1", "mrr@5", "mrr@40")


@pytest.mark.parametrize("distance", DISTANCES)
def test_leave_one_out_matches_brute_force(distance):
    q, ql, _, _ = make_data(0, 120, 1, 6)
    ql[:2] = torch.tensor([50, 51])  # singleton classes: R = 0, excluded and counted
    results = evaluate(q, ql, metrics=NAMES, distance=distance)
    ref = brute_force(q, ql, q, ql, distance, NAMES, np.eye(120, dtype=bool))
    assert results.num_queries_without_relevant == 2
    for name in NAMES:
        assert results[name] == pytest.approx(ref[name], rel=1e-12), name


@pytest.mark.parametrize("distance", DISTANCES)
def test_query_gallery_with_exclusions_matches_brute_force(distance):
    q, ql, g, gl = make_data(1, 60, 90, 5)
    rng = np.random.default_rng(1)
    q_groups, g_groups = rng.integers(0, 6, 60), rng.integers(0, 6, 90)
    excluded = q_groups[:, None] == g_groups[None, :]
    results = evaluate(
        q, ql, g, gl, metrics=NAMES, distance=distance, ignore=(q_groups, g_groups), chunk_size=7
    )
    ref = brute_force(q, ql, g, gl, distance, NAMES, excluded)
    for name in NAMES:
        assert results[name] == pytest.approx(ref[name], rel=1e-12), name


def test_map_at_k_relations():
    q, ql, g, gl = make_data(2, 80, 100, 4)
    r = evaluate(
        q, ql, g, gl, metrics=("map@r", "map@5", "map_pml@5", "map@200", "map_pml@200", "mrr", "mrr@200")
    )
    # Same numerator; min(K, R) ≤ R, so the PML variant is never larger.
    assert r["map_pml@5"] <= r["map@5"]
    # Once K reaches the whole gallery both variants are the full-ranking AP, and MRR@K is the MRR.
    assert r["map@200"] == pytest.approx(r["map_pml@200"], rel=1e-12)
    assert r["mrr@200"] == pytest.approx(r["mrr"], rel=1e-12)
    assert r["map@200"] >= r["map@r"]


def test_perfect_ranking_scores_one():
    labels = torch.arange(5).repeat_interleave(4)
    x = torch.nn.functional.one_hot(labels).float() + 0.01 * torch.randn(
        20, 5, generator=torch.Generator().manual_seed(3)
    )
    r = evaluate(x, labels, metrics=("map@2", "map@3", "map@10", "map_pml@2", "map_pml@3", "mrr@1"))
    assert r["map@2"] == r["map@3"] == r["map@10"] == r["mrr@1"] == 1.0
    assert r["map_pml@2"] == pytest.approx(2 / 3) and r["map_pml@3"] == 1.0  # R = 3


# ---------------------------------------------------------------------------------------------------------
# pytorch-metric-learning
# ---------------------------------------------------------------------------------------------------------


def pml(distance: str, k: int) -> AccuracyCalculator:
    pml_distance = CosineSimilarity() if distance == "cosine" else LpDistance(normalize_embeddings=False)
    return AccuracyCalculator(
        include=("mean_average_precision", "mean_reciprocal_rank"),
        k=k,
        device=torch.device("cpu"),
        knn_func=CustomKNN(pml_distance),
    )


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("K", [1, 5, 30])
def test_map_pml_and_mrr_at_k_match_pml(distance, K):
    q, ql, g, gl = make_data(4, 150, 200, 10)
    loo = evaluate(q, ql, metrics=(f"map_pml@{K}", f"mrr@{K}"), distance=distance)
    theirs = pml(distance, K).get_accuracy(q, ql)
    assert loo[f"map_pml@{K}"] == pytest.approx(theirs["mean_average_precision"], rel=1e-6)
    assert loo[f"mrr@{K}"] == pytest.approx(theirs["mean_reciprocal_rank"], rel=1e-6)
    ours = evaluate(q, ql, g, gl, metrics=(f"map_pml@{K}", f"mrr@{K}"), distance=distance)
    theirs = pml(distance, K).get_accuracy(q, ql, g, gl)
    assert ours[f"map_pml@{K}"] == pytest.approx(theirs["mean_average_precision"], rel=1e-6)
    assert ours[f"mrr@{K}"] == pytest.approx(theirs["mean_reciprocal_rank"], rel=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Roth et al. 2020
# ---------------------------------------------------------------------------------------------------------


def roth_map(features, labels, distance, variant):
    """Roth et al.'s mAP_1000 / mAP_lim / mAP_c as their paper's code describes it: rank every item
    against all others (itself dropped), and for each item of a class of size ``freq`` sum
    cumsum(hits)·hit / rank over the first L neighbours, divided by ``freq``; mean over all items.
    (L = 1000, min(1023, n) or freq.) Written as loops over classes and rows like the original."""
    labels = np.asarray(labels)
    n = len(labels)
    ranking = rankings(features, features, distance, np.eye(n, dtype=bool))
    nn_labels = np.stack([labels[r] for r in ranking])
    classes, freqs = np.unique(labels, return_counts=True)
    limit = {"map_1000": 1000, "map_lim": min(1023, n)}.get(variant)
    values = []
    for label, freq in zip(classes, freqs, strict=True):
        for row in np.where(labels == label)[0]:
            depth = freq if variant == "map_c" else limit
            hits = nn_labels[row, :depth] == label
            ranks = np.arange(1, len(hits) + 1)
            values.append(np.sum(np.cumsum(hits) * hits / ranks) / freq)
    return float(np.mean(values))


@pytest.mark.parametrize("distance", DISTANCES)
def test_roth_map_variants_match_their_algorithm(distance):
    # 1,200 items so that the 1000 / 1023 cut-offs fall inside the ranking.
    q, ql, _, _ = make_data(5, 1200, 1, 3, dim=4)
    q = q.double()  # float64 so that deep ranks of near-equal distances agree with the numpy reference
    results = evaluate(q, ql, metrics=("map_1000", "map_lim", "map_c"), distance=distance)
    assert results.k == 1023
    for variant in ("map_1000", "map_lim", "map_c"):
        assert results[variant] == pytest.approx(roth_map(q, ql, distance, variant), rel=1e-10), variant
    assert results["map_1000"] != results["map_lim"]


def test_roth_map_on_a_perfect_embedding_is_r_over_class_size():
    labels = torch.arange(3).repeat_interleave(5)
    x = torch.nn.functional.one_hot(labels).float() * 10 + 0.01 * torch.randn(
        15, 3, generator=torch.Generator().manual_seed(6)
    )
    r = evaluate(x, labels, metrics=("map_1000", "map_lim", "map_c", "map@r"))
    assert r["map@r"] == 1.0
    for name in ("map_1000", "map_lim", "map_c"):
        assert r[name] == pytest.approx(4 / 5)  # Roth et al. divide by the class size, R + 1
    assert r.k == 14  # min(1023, n_gallery)


def test_explicit_k_must_cover_every_metric():
    q, ql, _, _ = make_data(7, 50, 1, 5)
    with pytest.raises(ConfigError, match="'map@20' needs 20"):
        evaluate(q, ql, metrics=("map@20",), k=10)
    with pytest.raises(ConfigError, match="'map_c' needs"):
        evaluate(q, ql, metrics=("map_c",), k=2)
    assert evaluate(q, ql, metrics=("map_lim",)).k == 49  # min(1023, n − 1 retrievable)
