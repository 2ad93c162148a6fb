"""The fused fast paths of the pair losses against their plain autograd formulas (float64).

Covers the code paths that the PML reference tests reach only partly: the sort-based same-label search
and the binary-search all-triplets count (used above a size threshold, forced here by monkeypatching
the thresholds) and listed triplets with repeats. (The distances' own fused backward pass is tested in
tests/test_distances.py.)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dmlkit.losses.pair as pair
import dmlkit.tuples as tuples_module
from dmlkit import losses
from dmlkit.losses.base import PairLoss
from dmlkit.tuples import Batch, to_triplets
from tests_support import plain_matrix


def batch(n: int, ref: bool, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, dtype=torch.float64, generator=g)
    labels = torch.randint(0, 5, (n,), generator=g)
    if not ref:
        return x, labels, None, None
    return (
        x,
        labels,
        torch.randn(2 * n, 6, dtype=torch.float64, generator=g),
        torch.randint(0, 6, (2 * n,), generator=g),
    )


@pytest.mark.parametrize("small_matrix", [1 << 16, 0])  # 0: the sort-based same-label search
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"distance": "cosine", "pos_margin": 0.9, "neg_margin": 0.1},
        {"reduction": "mean", "neg_margin": 1.45},
        {
            "reduction": "sum",
            "distance": "squared_euclidean",
            "normalize_embeddings": False,
            "neg_margin": 6.0,
        },
    ],
)
@pytest.mark.parametrize("ref", [False, True])
def test_contrastive_all_pairs_matches_pair_lists(
    monkeypatch, small_matrix: int, kwargs: dict, ref: bool
) -> None:
    monkeypatch.setattr(tuples_module, "_SMALL_MATRIX", small_matrix)
    loss = losses.build("contrastive", **kwargs)
    x, labels, r, rl = batch(30, ref)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    fused = loss(x1, labels, None, r, rl)
    fused_stats = loss.last_stats
    plain = PairLoss.compute_loss(loss, Batch(x2, labels, r, rl))  # gathers over the listed pairs
    assert fused_stats == loss.last_stats
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-14)
    fused.backward()
    plain.backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-14)


def triplet_reference(loss, x, labels, indices, r, rl) -> tuple[torch.Tensor, int, int]:
    a, p, n = to_triplets(indices, labels, rl, "all")
    mat = plain_matrix(x, r, str(loss.distance), loss.normalize_embeddings)
    ap, an = mat[a, p], mat[a, n]
    hinge = F.relu((an - ap if loss.is_similarity else ap - an) + loss.margin)
    return loss.reduce(hinge), a.numel(), int((hinge > 0).sum())


@pytest.mark.parametrize("dense", [1 << 22, 0])  # 0: the binary-search count
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"distance": "cosine", "margin": 0.1},
        {"reduction": "mean"},
        {"reduction": "sum", "distance": "squared_euclidean", "normalize_embeddings": False, "margin": 1.0},
    ],
)
@pytest.mark.parametrize("ref", [False, True])
@pytest.mark.parametrize("mined", [False, True])
def test_triplet_fused_paths_match_listed_formula(
    monkeypatch, dense: int, kwargs: dict, ref: bool, mined: bool
) -> None:
    monkeypatch.setattr(pair, "_DENSE_TRIPLETS", dense)
    loss = losses.build("triplet", **kwargs)
    x, labels, r, rl = batch(24, ref)
    indices = None
    if mined:  # a random subset of the triplets, some repeated
        a, p, n = to_triplets(None, labels, rl, "all")
        pick = torch.randint(0, a.numel(), (a.numel() // 3,), generator=torch.Generator().manual_seed(1))
        indices = (a[pick], p[pick], n[pick])
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    value = loss(x1, labels, indices, r, rl)
    expected, num_triplets, num_active = triplet_reference(loss, x2, labels, indices, r, rl)
    assert loss.last_stats == {"num_triplets": num_triplets, "num_active_triplets": num_active}
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-14)
    value.backward()
    expected.backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-14)


def test_triplet_without_triplets_is_zero() -> None:
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    value = losses.build("triplet")(x, torch.arange(4))  # no positives
    assert float(value.detach()) == 0.0
    value.backward()
    assert torch.count_nonzero(x.grad) == 0
