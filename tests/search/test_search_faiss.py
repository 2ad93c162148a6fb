"""faiss backends: flat search equals the exact torch search (neighbours, R, every metric), IVF / HNSW
are close to it on clustered data, and the optional dependency fails clearly."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from dmlkit import search
from dmlkit.distances import Cosine
from dmlkit.errors import ConfigError, UnknownNameError
from dmlkit.metrics import evaluate, knn
from dmlkit.metrics.clustering import faiss_available
from dmlkit.search import build_exclusion, count_relevant
from dmlkit.search.torch_backend import TorchSearch

pytestmark = pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")

DISTANCES = ("cosine", "dot", "euclidean", "squared_euclidean")
METRICS = ("recall@1", "recall@5", "precision@3", "r_precision", "map@r", "map@10", "map_pml@10", "mrr@10")
METRICS += ("map_c",)


def make_data(seed: int, n_query: int, n_gallery: int, n_classes: int, dim: int = 16):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n_query, dim, generator=gen)
    g = torch.randn(n_gallery, dim, generator=gen)
    return (
        q,
        torch.randint(0, n_classes, (n_query,), generator=gen),
        g,
        torch.randint(0, n_classes, (n_gallery,), generator=gen),
    )


def clustered(seed: int, n_classes: int = 60, per_class: int = 50, dim: int = 32, spread: float = 0.6):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    x = torch.randn(n_classes, dim, generator=gen)[labels] + spread * torch.randn(
        len(labels), dim, generator=gen
    )
    return x, labels


@pytest.mark.parametrize("distance", DISTANCES)
def test_flat_knn_equals_torch(distance):
    q, _, g, _ = make_data(0, 50, 300, 5)
    d_torch, i_torch = knn(q, g, 20, distance)
    d_faiss, i_faiss = knn(q, g, 20, distance, backend="faiss-flat")
    assert torch.equal(i_torch, i_faiss)
    torch.testing.assert_close(d_faiss, d_torch, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_flat_metrics_equal_torch_leave_one_out_and_query_gallery(distance):
    q, ql, g, gl = make_data(1, 120, 200, 8)
    for args in ((q, ql), (q, ql, g, gl)):
        exact = evaluate(*args, metrics=METRICS, distance=distance)
        flat = evaluate(*args, metrics=METRICS, distance=distance, backend="faiss-flat")
        assert torch.equal(flat.topk_indices, exact.topk_indices)
        assert torch.equal(flat.num_relevant, exact.num_relevant)
        assert flat.metrics == pytest.approx(exact.metrics, rel=1e-12)
        assert flat.per_class == exact.per_class
        assert flat.backend == "faiss-flat" and flat.to_dict()["backend"] == "faiss-flat"
    # Ranking the whole gallery (map_lim: k = 199), float32 near-ties deep in the list may swap.
    exact = evaluate(q, ql, metrics=("map_lim",), distance=distance)
    flat = evaluate(q, ql, metrics=("map_lim",), distance=distance, backend="faiss-flat")
    assert flat.k == exact.k == 119
    assert (flat.topk_indices != exact.topk_indices).float().mean() < 0.01
    assert flat["map_lim"] == pytest.approx(exact["map_lim"], abs=1e-3)


def test_flat_with_ids_and_groups_equals_torch():
    q, ql, g, gl = make_data(2, 80, 150, 6)
    rng = np.random.default_rng(2)
    q_ids, g_ids = rng.integers(0, 40, 80), rng.integers(0, 40, 150)
    q_groups, g_groups = rng.integers(0, 5, 80), rng.integers(0, 5, 150)
    kwargs = {"query_ids": q_ids, "gallery_ids": g_ids, "ignore": (q_groups, g_groups), "metrics": METRICS}
    exact = evaluate(q, ql, g, gl, **kwargs)
    flat = evaluate(q, ql, g, gl, backend="faiss-flat", **kwargs)
    assert torch.equal(flat.topk_indices, exact.topk_indices)
    assert flat.metrics == pytest.approx(exact.metrics, rel=1e-12)
    assert (exact.topk_indices == -1).any() or exact.k < 150

    # Leave-one-out with duplicated ids and a single group array: R by counting equals R by a pass.
    ids = rng.integers(0, 60, 80)
    groups = rng.integers(0, 9, 80)
    exact = evaluate(q, ql, query_ids=ids, ignore=groups, metrics=METRICS)
    flat = evaluate(q, ql, query_ids=ids, ignore=groups, metrics=METRICS, backend="faiss-flat")
    assert torch.equal(flat.num_relevant, exact.num_relevant)
    assert torch.equal(flat.topk_indices, exact.topk_indices)
    assert flat.metrics == pytest.approx(exact.metrics, rel=1e-12)


def test_count_relevant_equals_the_search_pass():
    q, ql, g, gl = make_data(3, 40, 70, 4)
    rng = np.random.default_rng(3)
    ids = (rng.integers(0, 10, 40), rng.integers(0, 10, 70))
    groups = (rng.integers(0, 3, 40), rng.integers(0, 3, 70))
    for exclude, ignore in ((None, None), (ids, None), (None, groups), (ids, groups)):
        exclusion = build_exclusion(40, 70, ids=exclude, ignore=ignore, same_set=False)
        # The same pairs as a callable, which makes the search count R during its pass over every pair.
        mask = torch.zeros(40, 70, dtype=torch.bool)
        for pair in (exclude, ignore):
            if pair is not None:
                mask |= torch.from_numpy(pair[0][:, None] == pair[1][None, :])
        inputs = search.prepare(q, g, ql, gl, ignore=lambda qi, gi, m=mask: m[qi][:, gi])
        searched = TorchSearch().search(inputs, search.SearchRequest(1, Cosine()))
        assert inputs.exclusion.fn is not None and searched.num_relevant is not None
        assert torch.equal(count_relevant(ql, gl, exclusion), searched.num_relevant)


@pytest.mark.parametrize("backend", ["faiss-ivf", "faiss-hnsw"])
@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_approximate_backends_are_close_on_clustered_data(backend, distance):
    x, labels = clustered(4)
    exact = evaluate(x, labels, metrics=("recall@1", "map@r"), distance=distance)
    approx = evaluate(x, labels, metrics=("recall@1", "map@r"), distance=distance, backend=backend)
    assert approx.backend == backend
    assert abs(approx["recall@1"] - exact["recall@1"]) < 0.02
    assert abs(approx["map@r"] - exact["map@r"]) < 0.05
    assert torch.equal(approx.num_relevant, exact.num_relevant)  # R is counted, never approximate
    overlap = (approx.topk_indices[:, :1] == exact.topk_indices[:, :1]).float().mean()
    assert overlap > 0.9
    assert not (approx.topk_indices == torch.arange(len(x))[:, None]).any()  # never the query itself


def test_backend_options():
    x, labels = clustered(5, n_classes=10, per_class=30)
    tight = evaluate(
        x, labels, metrics=("recall@1",), backend="faiss-ivf", backend_options={"nlist": 8, "nprobe": 8}
    )
    exact = evaluate(x, labels, metrics=("recall@1",))
    assert tight["recall@1"] == pytest.approx(exact["recall@1"])  # every cell probed: exact
    hnsw = evaluate(
        x, labels, metrics=("recall@1",), backend="faiss-hnsw", backend_options={"M": 8, "ef_search": 64}
    )
    assert hnsw["recall@1"] > 0.9 * exact["recall@1"]
    with pytest.raises(UnknownNameError, match="did you mean 'nprobe'"):
        evaluate(x, labels, backend="faiss-ivf", backend_options={"nprob": 3})
    with pytest.raises(ConfigError, match="positive integer"):
        evaluate(x, labels, backend="faiss-ivf", backend_options={"nlist": 0})
    with pytest.raises(ConfigError, match="takes no backend_options"):
        evaluate(x, labels, backend="torch", backend_options={"nlist": 3})


def test_unsupported_requests_fail_clearly():
    x, labels = clustered(6, n_classes=4, per_class=10)
    with pytest.raises(UnknownNameError, match="did you mean 'faiss-flat'"):
        evaluate(x, labels, backend="faiss-flta")
    with pytest.raises(ConfigError, match="use 'mrr@K'"):
        evaluate(x, labels, metrics=("mrr",), backend="faiss-flat")
    with pytest.raises(ConfigError, match="callable ignore"):
        evaluate(
            x, labels, backend="faiss-flat", ignore=lambda qi, gi: torch.zeros(len(qi), len(gi), dtype=bool)
        )
    with pytest.raises(ConfigError, match="runs on the CPU"):
        evaluate(x, labels, backend="faiss-flat", device="cuda")


def test_missing_faiss_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes "import faiss" raise ImportError
    x, labels = clustered(7, n_classes=3, per_class=5)
    with pytest.raises(ConfigError, match=r"needs the optional package faiss.*dmlkit\[faiss\]"):
        evaluate(x, labels, backend="faiss-hnsw")
    assert evaluate(x, labels, metrics=("recall@1",))["recall@1"] >= 0  # torch needs no faiss


def test_float64_and_numpy_inputs():
    q, ql, g, gl = make_data(8, 30, 60, 3)
    exact = evaluate(q.double(), ql, g.double(), gl, metrics=("recall@4", "map@r"))
    flat = evaluate(
        q.double().numpy(),
        ql.numpy(),
        g.double().numpy(),
        gl.numpy(),
        metrics=("recall@4", "map@r"),
        backend="faiss-flat",
    )
    assert flat.metrics == pytest.approx(exact.metrics)
