"""``dmlkit.upgrade.rank_merge``: a search of a partly backfilled gallery (old part with the old query, new
part with the new query, rankings merged) equals a brute-force ranking of the whole mixed distance matrix,
ties by gallery index, on data built to have many exact ties."""

from __future__ import annotations

import pytest
import torch

from dmlkit import metrics, search
from dmlkit.errors import ConfigError, DataError
from dmlkit.upgrade import rank_merge
from dmlkit.upgrade.rank_merge import merge_topk, merged_search, mixed_gallery


def tied_unit_rows(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """Rows with four entries ±1 and the rest 0: norm 2 exactly, so cosine similarities are multiples of
    1/4, computed exactly in float32 — many exact ties."""
    rows = torch.zeros(n, d)
    positions = torch.rand(n, d, generator=gen).argsort(dim=1)[:, :4]
    signs = torch.randint(0, 2, (n, 4), generator=gen).float() * 2 - 1
    return rows.scatter_(1, positions, signs)


def tied_int_rows(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """Small integer rows: squared euclidean distances are exact small integers — many exact ties."""
    return torch.randint(-2, 3, (n, d), generator=gen).float()


def brute_force(
    query_old: torch.Tensor,
    query_new: torch.Tensor,
    gallery_old: torch.Tensor,
    gallery_new: torch.Tensor,
    backfilled: torch.Tensor,
    k: int,
    distance: str,
    leave_one_out: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The full ``nq × n_gallery`` mixed matrix in float64 (column g from the old pair unless g is
    backfilled), sorted by (distance, gallery index); excluded and missing slots are (worst, -1)."""

    def matrix(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        q, g = q.double(), g.double()
        if distance == "cosine":
            return torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(g, dim=1).T
        return (q[:, None, :] - g[None, :, :]).pow(2).sum(-1).sqrt()

    full = torch.where(backfilled[None, :], matrix(query_new, gallery_new), matrix(query_old, gallery_old))
    key = -full if distance == "cosine" else full.clone()
    if leave_one_out:
        key.fill_diagonal_(float("inf"))
    order = key.argsort(dim=1, stable=True)  # columns are in index order, so ties keep the lower index
    worst = float("-inf") if distance == "cosine" else float("inf")
    valid = key.gather(1, order) < float("inf")
    indices = torch.where(valid, order, -1)
    values = torch.where(valid, full.gather(1, order), worst)
    n = full.shape[1]
    if k > n:
        pad = k - n
        indices = torch.cat([indices, indices.new_full((len(indices), pad), -1)], dim=1)
        values = torch.cat([values, values.new_full((len(values), pad), worst)], dim=1)
    return values[:, :k], indices[:, :k]


def brute_relevant(
    query_labels: torch.Tensor, gallery_labels: torch.Tensor, leave_one_out: bool
) -> torch.Tensor:
    same = query_labels[:, None] == gallery_labels[None, :]
    return same.sum(dim=1) - (1 if leave_one_out else 0)


def tied_case(distance: str, leave_one_out: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    make = tied_unit_rows if distance == "cosine" else tied_int_rows
    n_gallery, n_query = 40, (40 if leave_one_out else 23)
    gallery_old, gallery_new = make(n_gallery, 8, gen), make(n_gallery, 6, gen)
    gallery_old[30:36] = gallery_old[0:6]  # duplicated rows: exact ties inside a part
    gallery_new[30:36] = gallery_new[0:6]
    if leave_one_out:
        query_old, query_new = gallery_old.clone(), gallery_new.clone()
    else:
        query_old, query_new = make(n_query, 8, gen), make(n_query, 6, gen)
    backfilled = torch.rand(n_gallery, generator=gen) < 0.3
    gallery_labels = torch.randint(0, 5, (n_gallery,), generator=gen)
    query_labels = gallery_labels if leave_one_out else torch.randint(0, 5, (n_query,), generator=gen)
    return query_old, query_new, gallery_old, gallery_new, backfilled, query_labels, gallery_labels


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("leave_one_out", [True, False])
@pytest.mark.parametrize("k", [3, 20, 60])
def test_merged_search_equals_brute_force_with_ties(distance, leave_one_out, k):
    qo, qn, go, gn, backfilled, ql, gl = tied_case(distance, leave_one_out)
    n_old = int((~backfilled).sum())
    assert 0 < int(backfilled.sum()) < 20 and n_old < 40  # k=20 exceeds the new part, k=60 the gallery
    found = merged_search(
        qo,
        qn,
        go,
        gn,
        backfilled,
        k=k,
        distance=distance,
        query_labels=ql,
        gallery_labels=None if leave_one_out else gl,
        leave_one_out=leave_one_out,
    )
    values, indices = brute_force(qo, qn, go, gn, backfilled, k, distance, leave_one_out)
    # The data has ties (else the tie-break is not tested) ...
    finite = values[:, :-1].isfinite()
    assert bool(((values[:, 1:] == values[:, :-1]) & finite).any())
    assert torch.equal(found.topk_indices, indices)
    torch.testing.assert_close(found.topk_distances.double(), values, rtol=0, atol=1e-6)
    assert found.topk_indices.shape == (len(qo), k)
    if k > 40:
        assert bool((found.topk_indices == -1).any())
    assert torch.equal(found.num_relevant, brute_relevant(ql, gl, leave_one_out))
    assert torch.equal(found.gallery_labels, gl) and torch.equal(found.query_labels, ql)
    assert found.k == k and found.leave_one_out == leave_one_out and found.backend == "torch"


@pytest.mark.parametrize("leave_one_out", [True, False])
@pytest.mark.parametrize("side", ["old", "new"])
def test_one_part_equals_the_plain_search(leave_one_out, side):
    """t = 0 is the old search alone, t = 1 the new search alone: the same RetrievalResults as
    dmlkit.search.search (string labels, to check the vocabulary is kept)."""
    gen = torch.Generator().manual_seed(1)
    n_gallery, n_query = 50, (50 if leave_one_out else 20)
    gallery = {
        "old": torch.randn(n_gallery, 8, generator=gen),
        "new": torch.randn(n_gallery, 5, generator=gen),
    }
    if leave_one_out:
        query = dict(gallery)
    else:
        query = {"old": torch.randn(n_query, 8, generator=gen), "new": torch.randn(n_query, 5, generator=gen)}
    names = ["ant", "bee", "cat", "dog"]
    gl = [names[i] for i in torch.randint(0, 4, (n_gallery,), generator=gen)]
    ql = gl if leave_one_out else [names[i] for i in torch.randint(0, 4, (n_query,), generator=gen)]
    backfilled = torch.full((n_gallery,), side == "new")
    given = {
        f"{what}_{s}": (source[s] if s == side else None)
        for what, source in (("query", query), ("gallery", gallery))
        for s in ("old", "new")
    }
    k = metrics.choose_k(["recall@1", "map@r"], ql, None if leave_one_out else gl)
    found = merged_search(
        given["query_old"],
        given["query_new"],
        given["gallery_old"],
        given["gallery_new"],
        backfilled,
        k=k,
        distance="euclidean",
        query_labels=ql,
        gallery_labels=None if leave_one_out else gl,
        leave_one_out=leave_one_out,
    )
    plain = search.search(
        query[side],
        None if leave_one_out else gallery[side],
        k=k,
        distance="euclidean",
        query_labels=ql,
        gallery_labels=None if leave_one_out else gl,
    )
    for name in ("topk_indices", "topk_distances", "num_relevant", "query_ids", "gallery_ids"):
        assert torch.equal(getattr(found, name), getattr(plain, name)), name
    assert torch.equal(found.query_labels, plain.query_labels)
    assert torch.equal(found.gallery_labels, plain.gallery_labels)
    assert found.label_values == plain.label_values == names
    assert found.leave_one_out == plain.leave_one_out and found.k == plain.k
    assert found.to_dict(neighbors=True) == plain.to_dict(neighbors=True)
    scored, reference = (
        metrics.compute(found, ["recall@1", "map@r"]),
        metrics.compute(plain, ["recall@1", "map@r"]),
    )
    assert scored.metrics == reference.metrics and scored.per_class == reference.per_class


@pytest.mark.parametrize("leave_one_out", [True, False])
def test_faiss_flat_equals_torch_without_ties(leave_one_out):
    pytest.importorskip("faiss")
    gen = torch.Generator().manual_seed(2)
    n = 60
    go, gn = torch.randn(n, 8, generator=gen), torch.randn(n, 8, generator=gen)
    qo, qn = (
        (go, gn) if leave_one_out else (torch.randn(25, 8, generator=gen), torch.randn(25, 8, generator=gen))
    )
    gl = torch.randint(0, 4, (n,), generator=gen)
    ql = gl if leave_one_out else torch.randint(0, 4, (25,), generator=gen)
    backfilled = torch.rand(n, generator=gen) < 0.5
    kwargs = dict(
        k=15, query_labels=ql, gallery_labels=None if leave_one_out else gl, leave_one_out=leave_one_out
    )
    exact = merged_search(qo, qn, go, gn, backfilled, **kwargs)
    flat = merged_search(qo, qn, go, gn, backfilled, backend="faiss-flat", **kwargs)
    assert flat.backend == "faiss-flat"
    assert torch.equal(flat.topk_indices, exact.topk_indices)
    torch.testing.assert_close(flat.topk_distances, exact.topk_distances, rtol=0, atol=1e-5)
    assert torch.equal(flat.num_relevant, exact.num_relevant)


def test_large_gallery_small_k_merges_only_top_lists(monkeypatch):
    """The merge only ever sees n_query × k candidates per part (never n_query × n_gallery), and the
    result on a 20k-item gallery still equals the brute-force ranking."""
    gen = torch.Generator().manual_seed(3)
    n, nq, k = 20_000, 64, 5
    go, gn = torch.randn(n, 8, generator=gen), torch.randn(n, 6, generator=gen)
    qo, qn = torch.randn(nq, 8, generator=gen), torch.randn(nq, 6, generator=gen)
    backfilled = torch.rand(n, generator=gen) < 0.4
    widths: list[tuple[int, ...]] = []
    real = rank_merge.merge_topk

    def spy(da, ia, db, ib, k, distance):
        widths.extend([tuple(da.shape), tuple(db.shape)])
        return real(da, ia, db, ib, k, distance)

    monkeypatch.setattr(rank_merge, "merge_topk", spy)
    found = merged_search(qo, qn, go, gn, backfilled, k=k)
    assert widths == [(nq, k), (nq, k)]
    values, indices = brute_force(qo, qn, go, gn, backfilled, k, "cosine", False)
    assert torch.equal(found.topk_indices, indices)
    torch.testing.assert_close(found.topk_distances.double(), values, rtol=0, atol=1e-5)
    assert found.num_relevant is None  # no labels, no R


def test_merge_topk_by_hand():
    inf = float("inf")
    # similarities: descending, ties by the lower index, empty slots (-1) last
    d_a = torch.tensor([[0.75, 0.5, -inf], [0.25, 0.125, 0.0]])
    i_a = torch.tensor([[7, 2, -1], [4, 5, 6]])
    d_b = torch.tensor([[0.75, 0.5], [-inf, -inf]])
    i_b = torch.tensor([[3, 9], [-1, -1]])
    values, indices = merge_topk(d_a, i_a, d_b, i_b, 6, "cosine")
    assert indices.tolist() == [[3, 7, 2, 9, -1, -1], [4, 5, 6, -1, -1, -1]]
    assert values.tolist() == [[0.75, 0.75, 0.5, 0.5, -inf, -inf], [0.25, 0.125, 0.0, -inf, -inf, -inf]]
    # distances: ascending; k smaller than the candidates cuts; k larger pads
    values, indices = merge_topk(
        torch.tensor([[1.0, 3.0]]),
        torch.tensor([[8, 1]]),
        torch.tensor([[1.0, 2.0]]),
        torch.tensor([[5, 0]]),
        3,
        "euclidean",
    )
    assert indices.tolist() == [[5, 8, 0]] and values.tolist() == [[1.0, 1.0, 2.0]]
    values, indices = merge_topk(
        torch.zeros(1, 0),
        torch.zeros(1, 0, dtype=torch.long),
        torch.tensor([[0.5]]),
        torch.tensor([[2]]),
        3,
        "euclidean",
    )
    assert indices.tolist() == [[2, -1, -1]] and values.tolist() == [[0.5, inf, inf]]


def test_mixed_gallery():
    old = torch.arange(12.0).view(4, 3)
    new = -torch.arange(12.0).view(4, 3)
    mixed = mixed_gallery(old, new, torch.tensor([True, False, False, True]))
    assert mixed.tolist() == [[-0.0, -1.0, -2.0], [3.0, 4.0, 5.0], [6.0, 7.0, 8.0], [-9.0, -10.0, -11.0]]
    with pytest.raises(ConfigError, match=r"gallery_old has 3.*gallery_new 2"):
        mixed_gallery(old, new[:, :2], torch.zeros(4, dtype=torch.bool))
    with pytest.raises(DataError, match="backfilled"):
        mixed_gallery(old, new, torch.zeros(3, dtype=torch.bool))


def test_merged_search_errors():
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(10, 4, generator=gen)
    half = torch.arange(10) < 5
    with pytest.raises(ConfigError, match="query_new"):
        merged_search(g, None, g, g, half, k=3)
    with pytest.raises(ConfigError, match="gallery_old"):
        merged_search(g, g, None, g, half, k=3)
    with pytest.raises(DataError, match="leave-one-out"):
        merged_search(g[:7], g[:7], g, g, half, k=3, leave_one_out=True)
    with pytest.raises(DataError, match="backfilled"):
        merged_search(g, g, g, g, half.long(), k=3)
    with pytest.raises(ConfigError, match="gallery_labels"):
        merged_search(g, g, g, g, half, k=3, query_labels=torch.zeros(10, dtype=torch.long))
    # nothing backfilled: the new query and gallery are not needed
    found = merged_search(g, None, g, None, torch.zeros(10, dtype=torch.bool), k=3)
    assert found.topk_indices.shape == (10, 3)
