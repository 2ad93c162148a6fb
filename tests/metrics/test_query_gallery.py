"""A split's protocol in evaluation (:func:`dmlkit.inference.evaluate_embeddings`): query/gallery flags and
sequences against a brute-force numpy computation; per-category metrics (:func:`dmlkit.metrics.per_group`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dmlkit import metrics
from dmlkit.data.base import ItemAnnotations
from dmlkit.inference import evaluate_embeddings


def brute_force(
    x: np.ndarray, labels: np.ndarray, queries: np.ndarray, gallery: np.ndarray, groups: np.ndarray | None
) -> dict[str, float]:
    """recall@1, precision@1 and MAP@R (Musgrave et al.) by sorting every query's cosine similarities; a
    gallery item is excluded when it is the query itself or shares its group."""
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    recall, map_r = [], []
    for q in queries:
        candidates = [g for g in gallery if g != q and (groups is None or groups[g] != groups[q])]
        relevant = np.array([labels[g] == labels[q] for g in candidates])
        r = int(relevant.sum())
        if r == 0:
            continue
        sims = np.array([unit[q] @ unit[g] for g in candidates])
        order = np.argsort(-sims, kind="stable")
        hits = relevant[order]
        recall.append(float(hits[0]))
        precision = np.cumsum(hits[:r]) / np.arange(1, r + 1)
        map_r.append(float((precision * hits[:r]).sum() / r))
    return {"recall@1": float(np.mean(recall)), "map@r": float(np.mean(map_r))}


@pytest.mark.parametrize("with_sequences", [False, True])
def test_query_gallery_and_sequences_match_brute_force(with_sequences: bool) -> None:
    rng = np.random.default_rng(3)
    n = 90
    x = rng.normal(size=(n, 6)).astype(np.float32)
    labels = rng.integers(0, 7, size=n)
    is_query = rng.random(n) < 0.5
    is_gallery = ~is_query | (rng.random(n) < 0.3)  # some items are both
    groups = rng.integers(0, 30, size=n) if with_sequences else None
    annotations = ItemAnnotations(is_query=is_query, is_gallery=is_gallery, sequences=groups)
    results = evaluate_embeddings(
        torch.from_numpy(x), torch.from_numpy(labels), annotations, ["recall@1", "map@r"]
    )
    expected = brute_force(x, labels, np.flatnonzero(is_query), np.flatnonzero(is_gallery), groups)
    for name, value in expected.items():
        assert results.metrics[name] == pytest.approx(value, abs=1e-6)
    assert results.query_ids.tolist() == np.flatnonzero(is_query).tolist()
    assert results.gallery_ids.tolist() == np.flatnonzero(is_gallery).tolist()
    # leave-one-out with sequences: every item a query against all the others
    loo = evaluate_embeddings(
        torch.from_numpy(x),
        torch.from_numpy(labels),
        ItemAnnotations(sequences=groups),
        ["recall@1", "map@r"],
    )
    expected = brute_force(x, labels, np.arange(n), np.arange(n), groups)
    for name, value in expected.items():
        assert loo.metrics[name] == pytest.approx(value, abs=1e-6)


def test_per_group_equals_the_metrics_of_each_groups_queries() -> None:
    rng = np.random.default_rng(5)
    n = 80
    x = rng.normal(size=(n, 5)).astype(np.float32)
    labels = rng.integers(0, 6, size=n)
    categories = labels % 2  # each class in one category, as SOP's super-classes
    results = evaluate_embeddings(torch.from_numpy(x), torch.from_numpy(labels), None, ["recall@1", "map@r"])
    found = metrics.per_group(results, categories, ["recall@1", "map@r"], ["even", "odd"])
    for code, name in enumerate(["even", "odd"]):
        expected = brute_force(x, labels, np.flatnonzero(categories == code), np.arange(n), None)
        for metric, value in expected.items():
            assert found[metric][name] == pytest.approx(value, abs=1e-6)
    with pytest.raises(Exception, match="3 group codes for 80 queries"):
        metrics.per_group(results, [0, 1, 0], ["recall@1"])


def test_a_query_gallery_split_needs_both() -> None:
    annotations = ItemAnnotations(is_query=np.ones(4, bool), is_gallery=np.zeros(4, bool))
    with pytest.raises(Exception, match="4 queries, 0 gallery items"):
        evaluate_embeddings(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), annotations, ["recall@1"])
