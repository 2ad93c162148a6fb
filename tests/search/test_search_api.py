"""``dmlkit.search``: one ``search`` returns a ``RetrievalResults`` without metric values; metrics are
functions of it (``compute(search(...))`` is ``evaluate(...)``); the backend registry checks its options and
declares what each backend can do."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dmlkit import metrics, search
from dmlkit.errors import ConfigError, UnknownNameError
from dmlkit.metrics import compute, evaluate, gldv2_map, revisited_map

METRICS = ("recall@1", "recall@4", "precision@2", "r_precision", "map@r", "map@5", "map_c", "mrr@3", "nmi")
DISTANCES = ("cosine", "dot", "euclidean", "squared_euclidean")


def make_data(seed: int, n_query: int = 60, n_gallery: int = 90, n_classes: int = 6):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n_query, 8, generator=gen),
        torch.randint(0, n_classes, (n_query,), generator=gen),
        torch.randn(n_gallery, 8, generator=gen),
        torch.randint(0, n_classes, (n_gallery,), generator=gen),
    )


def assert_same_results(a: metrics.RetrievalResults, b: metrics.RetrievalResults) -> None:
    assert torch.equal(a.topk_indices, b.topk_indices)
    assert torch.equal(a.topk_distances, b.topk_distances)
    assert torch.equal(a.num_relevant, b.num_relevant)
    assert a.metrics == b.metrics and list(a.metrics) == list(b.metrics)
    assert a.per_class == b.per_class
    assert a.to_dict(neighbors=True) == b.to_dict(neighbors=True)


@pytest.mark.parametrize("distance", DISTANCES)
def test_search_then_compute_equals_evaluate(distance):
    q, ql, g, gl = make_data(0)
    rng = np.random.default_rng(0)
    groups = (rng.integers(0, 4, 60), rng.integers(0, 4, 90))
    k = metrics.choose_k(METRICS, ql, gl)
    found = search.search(q, g, k=k, distance=distance, query_labels=ql, gallery_labels=gl, ignore=groups)
    assert found.metrics == {} and found.per_class == {} and found.cluster_assignments is None
    assert found.k == k and found.distance == distance and found.backend == "torch"
    scored = compute(found, METRICS, seed=3)
    assert_same_results(
        scored, evaluate(q, ql, g, gl, metrics=METRICS, distance=distance, ignore=groups, seed=3)
    )
    assert found.metrics == {}  # compute returns a copy; the search results are left as they were
    assert scored.topk_indices is found.topk_indices  # ... sharing its tensors, not copying them

    loo = search.search(q, k=metrics.choose_k(("mrr", "map@r"), ql), query_labels=ql, first_relevant=True)
    assert loo.leave_one_out and loo.first_relevant_rank is not None
    assert_same_results(compute(loo, ("mrr", "map@r")), evaluate(q, ql, metrics=("mrr", "map@r")))


def test_results_keep_a_reference_to_the_query_embeddings():
    q, ql, _, _ = make_data(1)
    found = search.search(q, k=3, query_labels=ql)
    assert found.query_embeddings is not None and found.query_embeddings.data_ptr() == q.data_ptr()
    assert compute(found, ("nmi", "dists@intra"))["nmi"] == evaluate(q, ql, metrics=("nmi",), k=3)["nmi"]


def test_search_without_labels():
    q, _, g, _ = make_data(2)
    found = search.search(q, g, k=5, distance="euclidean")
    assert (
        found.query_labels is None and found.num_relevant is None and found.num_queries_without_relevant == 0
    )
    d, i = metrics.knn(q, g, 5, "euclidean")
    assert torch.equal(found.topk_indices, i) and torch.equal(found.topk_distances, d)
    assert found.to_dict(neighbors=True)["query_labels"] == []
    with pytest.raises(ConfigError, match="need labels"):
        compute(found, ("recall@1",))
    with pytest.raises(ConfigError, match="first_relevant needs labels"):
        search.search(q, g, k=5, first_relevant=True)


def test_compute_checks_what_the_search_kept():
    q, ql, g, gl = make_data(3)
    found = search.search(q, g, k=2, query_labels=ql, gallery_labels=gl)
    with pytest.raises(ConfigError, match="'recall@4' needs 4 neighbours"):
        compute(found, ("recall@1", "recall@4"))
    with pytest.raises(ConfigError, match="r_precision and map@r need k"):
        compute(found, ("map@r",))
    with pytest.raises(ConfigError, match="first_relevant=True"):
        compute(found, ("mrr",))
    assert (
        compute(found, ("recall@2",))["recall@2"] == evaluate(q, ql, g, gl, metrics=("recall@2",))["recall@2"]
    )


def test_query_blocks_equal_the_whole_search():
    # SearchInputs.take: the ids, groups and a callable exclusion follow the queries into a block.
    q, ql, g, gl = make_data(4)
    rng = np.random.default_rng(4)
    ids = (rng.integers(0, 30, 60), rng.integers(0, 30, 90))
    mask = torch.from_numpy(rng.random((60, 90)) < 0.2)
    inputs = search.prepare(
        q, g, query_labels=ql, gallery_labels=gl, query_ids=ids[0], gallery_ids=ids[1],
        ignore=lambda qi, gi: mask[qi][:, gi],
    )  # fmt: skip
    whole = search.run(inputs, 12, distance="euclidean")
    for start in (0, 17, 50):
        part = search.run(inputs.take(start, start + 17), 12, distance="euclidean")
        assert torch.equal(part.topk_indices, whole.topk_indices[start : start + 17])
        assert torch.equal(part.num_relevant, whole.num_relevant[start : start + 17])


def test_backend_registry():
    assert search.available() == ["faiss-flat", "faiss-hnsw", "faiss-ivf", "torch"]
    assert tuple(search.available()) == metrics.BACKENDS
    capabilities = {name: (search.REGISTRY.get(name).exact, search.REGISTRY.get(name).full_ranking)
                    for name in search.available()}  # fmt: skip
    assert capabilities == {
        "torch": (True, True),
        "faiss-flat": (True, False),
        "faiss-ivf": (False, False),
        "faiss-hnsw": (False, False),
    }
    with pytest.raises(UnknownNameError, match="did you mean 'nprobe'"):
        search.build("faiss-ivf", nprob=3)  # options are checked before faiss is imported
    with pytest.raises(ConfigError, match="takes no backend_options"):
        search.build("torch", nlist=3)
    with pytest.raises(UnknownNameError, match="did you mean 'torch'"):
        search.build("torhc")
    with pytest.raises(ConfigError, match="use 'mrr@K'"):
        search.check_full_ranking("faiss-hnsw")


def test_a_distance_without_an_index_form_is_refused():
    q, ql, _, _ = make_data(5)
    with pytest.raises(ConfigError, match="'snr' cannot be searched"):
        search.search(q, k=3, distance="snr")
    with pytest.raises(ConfigError, match="'snr' cannot be searched"):
        evaluate(q, ql, distance="snr")
    with pytest.raises(UnknownNameError, match="did you mean 'cosine'"):
        search.search(q, k=3, distance="cosin")


def test_landmark_protocols_take_search_results():
    rng = np.random.default_rng(6)
    q, _, g, _ = make_data(6, n_query=8, n_gallery=40)
    gnd = [{"easy": rng.choice(40, 3, replace=False).tolist(), "hard": [], "junk": []} for _ in range(8)]
    whole = search.search(q, g, k=40)
    assert revisited_map(gnd, whole).metrics == revisited_map(gnd, query=q, gallery=g, chunk_size=3).metrics
    relevant = [e["easy"] for e in gnd]
    top = search.search(q, g, k=10, distance="euclidean")
    from_results = gldv2_map(relevant, top, k=10)
    assert from_results.metrics == gldv2_map(relevant, query=q, gallery=g, distance="euclidean", k=10).metrics
    assert not math.isnan(from_results["map@10"])
