"""Exact chunked k-NN against a numpy full-matrix implementation with stable (index) tie-breaking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dmlkit.errors import ConfigError, DataError
from dmlkit.search import knn
from dmlkit.search.torch_backend import topk_stable

DISTANCES = ("cosine", "dot", "euclidean", "squared_euclidean")


def numpy_matrix(q: np.ndarray, g: np.ndarray, distance: str) -> np.ndarray:
    q, g = q.astype(np.float64), g.astype(np.float64)
    if distance == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
        return q @ g.T
    if distance == "dot":
        return q @ g.T
    squared = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    return squared if distance == "squared_euclidean" else np.sqrt(squared)


def numpy_knn(q, g, k, distance, excluded=None):
    mat = numpy_matrix(q, g, distance)
    similarity = distance in ("cosine", "dot")
    key = -mat if similarity else mat.copy()
    if excluded is not None:
        key[excluded] = np.inf
    order = np.argsort(key, axis=1, kind="stable")[:, :k]
    dist = np.take_along_axis(mat, order, axis=1)
    if excluded is not None:
        empty = np.take_along_axis(excluded, order, axis=1)
        order = np.where(empty, -1, order)
        dist = np.where(empty, -np.inf if similarity else np.inf, dist)
    return dist, order


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(37, 8, generator=gen, dtype=torch.float64), torch.randn(
        53, 8, generator=gen, dtype=torch.float64
    )


@pytest.mark.parametrize("distance", DISTANCES)
def test_knn_matches_numpy(data, distance):
    q, g = data
    dist, idx = knn(q, g, 9, distance)
    ref_dist, ref_idx = numpy_knn(q.numpy(), g.numpy(), 9, distance)
    assert idx.dtype == torch.int64 and idx.shape == (37, 9)
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    np.testing.assert_allclose(dist.numpy(), ref_dist, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("distance", ["dot", "squared_euclidean", "euclidean"])
def test_ties_are_broken_by_gallery_index(distance):
    # Small integers make every score exact, so many scores are exactly equal.
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(-1, 2, (40, 3), generator=gen).float()
    g = torch.randint(-1, 2, (60, 3), generator=gen).float()
    for chunk_size in (None, 1, 7):
        dist, idx = knn(q, g, 12, distance, chunk_size=chunk_size)
        ref_dist, ref_idx = numpy_knn(q.numpy(), g.numpy(), 12, distance)
        np.testing.assert_array_equal(idx.numpy(), ref_idx)
        np.testing.assert_allclose(dist.numpy(), ref_dist, rtol=1e-6)


def test_topk_stable_matches_stable_argsort():
    gen = torch.Generator().manual_seed(2)
    score = torch.randint(0, 4, (50, 30), generator=gen).float()
    for k in (1, 5, 29, 30):
        values, indices = topk_stable(score, k)
        ref = np.argsort(-score.numpy(), axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(indices.numpy(), ref)
        assert torch.equal(values, score.gather(1, indices))


@pytest.mark.parametrize("distance", DISTANCES)
def test_chunked_equals_unchunked(data, distance):
    # BLAS picks kernels by matrix shape, so scores can differ in the last bit between chunk sizes:
    # the neighbours are identical, the distances equal to rounding.
    q, g = data
    full = knn(q, g, 10, distance, chunk_size=1000)
    for chunk_size in (1, 4, 36):
        chunked = knn(q, g, 10, distance, chunk_size=chunk_size)
        assert torch.equal(full[1], chunked[1])
        torch.testing.assert_close(full[0], chunked[0], rtol=1e-12, atol=1e-12)


def test_exclusions_by_id_group_and_callable(data):
    q, g = data
    gen = np.random.default_rng(3)
    q_ids, g_ids = gen.integers(0, 20, 37), gen.integers(0, 20, 53)
    q_groups, g_groups = gen.integers(0, 5, 37), gen.integers(0, 5, 53)
    excluded = (q_ids[:, None] == g_ids[None, :]) | (q_groups[:, None] == g_groups[None, :])
    ref_dist, ref_idx = numpy_knn(q.numpy(), g.numpy(), 50, "euclidean", excluded)
    dist, idx = knn(
        q, g, 50, "euclidean", exclude_self_ids=(q_ids, g_ids), ignore=(q_groups, g_groups), chunk_size=5
    )
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    np.testing.assert_allclose(dist.numpy(), ref_dist, rtol=1e-9)
    assert (idx == -1).any()  # some queries have fewer than 50 retrievable items

    mask = torch.from_numpy(excluded)

    def ignore(qi: torch.Tensor, gi: torch.Tensor) -> torch.Tensor:
        return mask[qi][:, gi]

    dist2, idx2 = knn(q, g, 50, "euclidean", ignore=ignore, chunk_size=6)
    assert torch.equal(idx, idx2)
    torch.testing.assert_close(dist, dist2, rtol=1e-12, atol=1e-12)


def test_exclude_self_by_position_and_padding():
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(4))
    dist, idx = knn(x, x, 7, "cosine", exclude_self_ids=True)
    assert idx.shape == (5, 7)
    assert not (idx[:, :4] == torch.arange(5)[:, None]).any()
    assert (idx[:, 4:] == -1).all() and torch.isneginf(dist[:, 4:]).all()
    assert torch.isfinite(dist[:, :4]).all()
    dist, idx = knn(x, x, 7, "euclidean", exclude_self_ids=True)
    assert torch.isposinf(dist[:, 4:]).all()


def test_numpy_float32_input_and_device():
    gen = np.random.default_rng(5)
    q, g = gen.standard_normal((6, 3)).astype(np.float32), gen.standard_normal((9, 3)).astype(np.float32)
    dist, idx = knn(q, g, 3, "euclidean", device="cpu")
    ref_dist, ref_idx = numpy_knn(q, g, 3, "euclidean")
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    np.testing.assert_allclose(dist.numpy(), ref_dist, rtol=1e-5)
    assert dist.dtype == torch.float32


def test_bad_inputs():
    x = torch.randn(4, 3)
    with pytest.raises(DataError, match="gallery is empty"):
        knn(x, torch.zeros(0, 3), 1)
    with pytest.raises(DataError, match="dimensions differ"):
        knn(x, torch.randn(4, 2), 1)
    with pytest.raises(DataError, match="NaN or infinite"):
        knn(x, torch.tensor([[0.0, float("nan"), 1.0]]), 1)
    with pytest.raises(DataError, match="floating-point"):
        knn(x, torch.ones(2, 3, dtype=torch.int64), 1)
    with pytest.raises(ConfigError, match="k must be"):
        knn(x, x, 0)
    with pytest.raises(ConfigError, match="chunk_size"):
        knn(x, x, 1, chunk_size=0)
    with pytest.raises(ConfigError, match="distance"):
        knn(x, x, 1, "manhattan")
    with pytest.raises(ConfigError, match="ignore callable"):
        knn(x, x, 1, ignore=lambda qi, gi: torch.zeros(len(qi), len(gi)))
