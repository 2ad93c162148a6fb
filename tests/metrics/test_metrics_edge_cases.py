"""Edge cases of the metrics added for issue 6, with the exact and the faiss backend: a single class,
singleton classes, an empty gallery, duplicates of the query, large integer and string labels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dmlkit.errors import DataError
from dmlkit.metrics import evaluate, gldv2_map, revisited_map
from dmlkit.metrics.clustering import faiss_available

RANKING = ("map@3", "map@50", "map_pml@3", "mrr@2", "map_1000", "map_lim", "map_c", "recall@1", "map@r")
BACKENDS = [
    "torch",
    pytest.param("faiss-flat", marks=pytest.mark.skipif(not faiss_available(), reason="no faiss")),
]


def points(seed: int, n: int, dim: int = 5) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_class(backend):
    x = points(0, 12)
    r = evaluate(
        x,
        torch.zeros(12, dtype=torch.int64),
        metrics=(*RANKING, "f1", "dists@inter", "dists@intra"),
        backend=backend,
    )
    assert r["map@3"] == r["map@50"] == r["mrr@2"] == r["recall@1"] == r["map@r"] == 1.0
    assert r["map_pml@3"] == pytest.approx(3 / 11)  # R = 11
    for name in ("map_1000", "map_lim", "map_c"):
        assert r[name] == pytest.approx(11 / 12)  # Roth et al.'s denominator is the class size
    assert r["f1"] == 1.0 and math.isnan(r["dists@inter"]) and r["dists@intra"] > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_singleton_classes_have_no_relevant_item(backend):
    x = points(1, 10)
    r = evaluate(x, torch.arange(10) * 7, metrics=(*RANKING, "dists@intra", "f1"), backend=backend)
    assert r.num_queries_without_relevant == 10
    assert all(math.isnan(r[name]) for name in RANKING)
    assert math.isnan(r["dists@intra"])
    assert r["f1"] == 1.0  # ten classes, ten clusters of one point: identical partitions


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_gallery_is_a_clear_error(backend):
    x = points(2, 4)
    with pytest.raises(DataError, match="gallery is empty"):
        evaluate(x, torch.arange(4), torch.zeros(0, 5), torch.zeros(0, dtype=torch.int64), backend=backend)
    with pytest.raises(DataError, match="gallery is empty"):
        gldv2_map([[0]], query=x[:1], gallery=torch.zeros(0, 5))
    with pytest.raises(DataError, match="gallery is empty"):
        revisited_map([{"easy": [0]}], query=x[:1], gallery=torch.zeros(0, 5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicates_of_the_query_are_retrieved(backend):
    x = points(3, 6)
    data = torch.cat([x, x[:1]])  # item 6 duplicates item 0 under another id
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0])
    r = evaluate(data, labels, metrics=("map@2", "mrr@1", "map_c"), distance="euclidean", backend=backend)
    assert r.topk_indices[0, 0] == 6 and r.topk_indices[6, 0] == 0
    assert r.topk_distances[0, 0] == 0.0
    same_id = evaluate(data, labels, metrics=("mrr@1",), query_ids=[0, 1, 2, 3, 4, 5, 0], backend=backend)
    assert 6 not in same_id.topk_indices[0].tolist() and 0 not in same_id.topk_indices[6].tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_integer_and_string_labels(backend):
    gen = torch.Generator().manual_seed(4)
    q, g = torch.randn(40, 6, generator=gen), torch.randn(60, 6, generator=gen)
    ql, gl = torch.randint(0, 5, (40,), generator=gen), torch.randint(0, 5, (60,), generator=gen)
    names = (*RANKING, "f1", "dists@intra_over_inter", "rho_spectrum@2")
    small = evaluate(q, ql, g, gl, metrics=names, backend=backend)
    big = evaluate(q, ql + 2**40, g, gl + 2**40, metrics=names, backend=backend)
    words = np.array(["ash", "birch", "cedar", "elm", "fir"])
    strings = evaluate(q, list(words[ql]), g, words[gl], metrics=names, backend=backend)
    assert big.metrics == small.metrics == strings.metrics
    assert set(strings.per_class["map@3"]) <= set(words)
    # Adjacent huge labels stay distinct.
    labels = torch.tensor([2**40, 2**40 + 1, 2**40, 2**40 + 1])
    x = torch.tensor([[0.0, 1.0], [0.0, 1.1], [1.0, 0.0], [1.1, 0.0]])
    assert evaluate(x, labels, metrics=("map@1",), backend=backend)["map@1"] == 0.0
