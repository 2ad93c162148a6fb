"""The search in gallery tiles (large galleries) gives exactly the one-tile result: same neighbours, same
tie-breaking by gallery index, same R and the same full-ranking MRR (its second pass included)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dmlkit.metrics import evaluate, knn
from dmlkit.search import torch_backend

METRICS = ("recall@1", "recall@3", "precision@4", "r_precision", "map@r", "mrr", "mrr@3", "map@5", "map_c")


def brute_mrr(q, ql, g, gl, distance, excluded=None):
    q, g = q.double().numpy(), g.double().numpy()
    if distance == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
        key = -(q @ g.T)
    else:
        key = ((q[:, None] - g[None]) ** 2).sum(-1)
    values = []
    for i in range(len(q)):
        order = np.argsort(key[i], kind="stable")
        if excluded is not None:
            order = order[~excluded[i][order]]
        rel = gl.numpy()[order] == ql[i].item()
        if rel.any():
            values.append(1 / (np.argmax(rel) + 1))
    return float(np.mean(values))


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(torch_backend, "GALLERY_TILE", 7)


@pytest.mark.parametrize("distance", ["cosine", "dot", "euclidean", "squared_euclidean"])
def test_tiled_knn_equals_one_tile(small_tiles, distance):
    gen = torch.Generator().manual_seed(0)
    q, g = (
        torch.randn(23, 5, generator=gen, dtype=torch.float64),
        torch.randn(40, 5, generator=gen, dtype=torch.float64),
    )
    tiled = knn(q, g, 12, distance, chunk_size=4)
    torch_backend.GALLERY_TILE = 2**16
    whole = knn(q, g, 12, distance)
    assert torch.equal(tiled[1], whole[1])
    torch.testing.assert_close(tiled[0], whole[0], rtol=1e-12, atol=1e-12)


def test_tiled_ties_follow_gallery_index(small_tiles):
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(-1, 2, (30, 3), generator=gen).float()
    g = torch.randint(-1, 2, (50, 3), generator=gen).float()
    _, idx = knn(q, g, 20, "squared_euclidean", chunk_size=3)
    key = ((q[:, None] - g[None]) ** 2).sum(-1).numpy()
    np.testing.assert_array_equal(idx.numpy(), np.argsort(key, axis=1, kind="stable")[:, :20])


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_tiled_evaluate_equals_one_tile_with_exclusions(small_tiles, distance):
    gen = torch.Generator().manual_seed(2)
    q, g = torch.randn(45, 6, generator=gen), torch.randn(61, 6, generator=gen)
    ql, gl = torch.randint(0, 5, (45,), generator=gen), torch.randint(0, 5, (61,), generator=gen)
    rng = np.random.default_rng(2)
    q_groups, g_groups = rng.integers(0, 4, 45), rng.integers(0, 4, 61)
    excluded = torch.from_numpy(q_groups[:, None] == g_groups[None, :])
    kwargs = {"metrics": METRICS, "distance": distance, "chunk_size": 6}
    by_groups = evaluate(q, ql, g, gl, ignore=(q_groups, g_groups), **kwargs)
    by_callable = evaluate(q, ql, g, gl, ignore=lambda qi, gi: excluded[qi][:, gi], **kwargs)
    loo = evaluate(g, gl, **kwargs)
    torch_backend.GALLERY_TILE = 2**16
    for tiled, whole in (
        (by_groups, evaluate(q, ql, g, gl, ignore=(q_groups, g_groups), **kwargs)),
        (by_callable, evaluate(q, ql, g, gl, ignore=(q_groups, g_groups), **kwargs)),
        (loo, evaluate(g, gl, **kwargs)),
    ):
        assert torch.equal(tiled.topk_indices, whole.topk_indices)
        assert torch.equal(tiled.num_relevant, whole.num_relevant)
        assert tiled.metrics == pytest.approx(whole.metrics, rel=1e-12)
    assert by_groups["mrr"] == pytest.approx(brute_mrr(q, ql, g, gl, distance, excluded.numpy()), rel=1e-12)


def test_mrr_alone_is_counted_in_the_second_pass(small_tiles):
    # With only "mrr" asked, k = 0: every query's rank comes from the counting pass.
    gen = torch.Generator().manual_seed(3)
    q, g = torch.randn(33, 4, generator=gen), torch.randn(52, 4, generator=gen)
    ql, gl = torch.randint(0, 6, (33,), generator=gen), torch.randint(0, 6, (52,), generator=gen)
    results = evaluate(q, ql, g, gl, metrics=("mrr",), chunk_size=5)
    assert results.k == 0
    assert results["mrr"] == pytest.approx(brute_mrr(q, ql, g, gl, "cosine"), rel=1e-12)
    loo = evaluate(g, gl, metrics=("mrr",), distance="euclidean")
    assert loo["mrr"] == pytest.approx(
        brute_mrr(g, gl, g, gl, "euclidean", np.eye(52, dtype=bool)), rel=1e-12
    )


@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean"])
def test_small_distances_far_from_the_origin_are_precise(distance):
    # ‖q‖² − 2⟨q, g⟩ + ‖g‖² cancels badly here (‖x‖² ≈ 1e5, d² ≈ 1e-5): the search centres the data on
    # the gallery mean, and near-zero kept distances are recomputed from the vectors.
    gen = torch.Generator().manual_seed(4)
    x = 100 + 1e-3 * torch.randn(200, 10, generator=gen)
    dist, idx = knn(x, x, 8, distance, exclude_self_ids=True)
    direct = ((x.double()[:, None] - x.double()[idx]) ** 2).sum(-1)
    expected = direct if distance == "squared_euclidean" else direct.sqrt()
    torch.testing.assert_close(dist.double(), expected, rtol=1e-3, atol=0)
    assert (dist.diff(dim=1) >= 0).all()
    # The same nearest neighbour as an exact float64 ranking (apart from near-ties at float32 resolution).
    key = ((x.double()[:, None] - x.double()[None]) ** 2).sum(-1).fill_diagonal_(float("inf"))
    reference = key.argsort(dim=1, stable=True)[:, :8]
    assert (idx[:, 0] == reference[:, 0]).float().mean() > 0.9
